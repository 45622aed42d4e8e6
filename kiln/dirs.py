"""What kind of directory a path is: an HF checkpoint, a kiln checkpoint or an engine dir.

Each command takes one kind (``convert_checkpoint`` an HF checkpoint, ``build`` a kiln
checkpoint, ``run``/``bench`` an engine dir). Given another kind, its error says which kind it
was given and the command that makes the kind it needs, instead of failing on a missing key.

Contract: :func:`dir_kind` classifies a parsed ``config.json`` by its keys, nothing else:

- engine dir: ``format_version`` and any of ``backend``, ``rank_files``, ``limits`` (the
  manifest, :mod:`kiln.engine`; any one, so a damaged manifest is still called one);
- kiln checkpoint: ``format_version``, ``decoder`` and ``mapping`` (:mod:`kiln.checkpoint`);
- HF checkpoint: ``model_type`` or ``architectures`` (transformers writes both);
- anything else: :attr:`DirKind.OTHER`.

:func:`wrong_kind` turns a kind other than the wanted one into that one-line message. Non-goal:
validating a directory; the owner of each format does that once the kind is right.
"""

from __future__ import annotations

import difflib
import errno
import itertools
import json
import os
import stat
from enum import Enum
from pathlib import Path
from typing import Any

from kiln.errors import UNREADABLE_JSON, USER_TEXT, json_type, named_as_flags, option

ENGINE_KEYS = frozenset({"backend", "rank_files", "limits"})  # none is in a kiln checkpoint


class DirKind(Enum):
    HF_CHECKPOINT = "a Hugging Face checkpoint"
    KILN_CHECKPOINT = "a kiln checkpoint"
    ENGINE = "an engine dir"
    OTHER = "not a checkpoint or engine dir"


def dir_kind(config: Any) -> DirKind:
    """The kind of directory whose ``config.json`` parsed to ``config``."""
    if not isinstance(config, dict):
        return DirKind.OTHER
    if "format_version" in config and not ENGINE_KEYS.isdisjoint(config):
        return DirKind.ENGINE
    if {"format_version", "decoder", "mapping"} <= config.keys():
        return DirKind.KILN_CHECKPOINT
    if "model_type" in config or "architectures" in config:
        return DirKind.HF_CHECKPOINT
    return DirKind.OTHER


def classify_dir(path: str | Path) -> DirKind:
    """The kind of directory ``path`` is, from its ``config.json`` (OTHER if none is readable)."""
    try:
        return dir_kind(json.loads((Path(path) / "config.json").read_text(USER_TEXT)))
    except (OSError, *UNREADABLE_JSON):
        return DirKind.OTHER


def wrong_kind(path: str | Path, config: Any, wanted: DirKind) -> str | None:
    """The one-line error for a directory of another kind than ``wanted`` (None if it is that
    kind, or unrecognizable: then the caller's own checks say what is wrong). Its advice names
    the commands inside a kiln command, the Python functions from Python (a caller of
    ``LLM(model=engine_dir)`` had been told to run ``kiln run --engine_dir``)."""
    found = dir_kind(config)
    if found in (wanted, DirKind.OTHER):
        return None
    steps = _CLI_STEPS if named_as_flags() else _API_STEPS

    def step(index: int, given: str | Path = path) -> str:
        shown = str(given) if named_as_flags() else repr(os.fspath(given))
        return steps[index].format(path=shown, ckpt="<checkpoint_dir>", engine="<engine_dir>")

    convert, build, run, cached = (step(index) for index in range(4))
    todo = {
        (DirKind.HF_CHECKPOINT, DirKind.KILN_CHECKPOINT): f"convert it first with {convert}",
        (DirKind.HF_CHECKPOINT, DirKind.ENGINE):
            f"{cached}; or convert it first with {convert}, then build with "
            f"{step(1, '<checkpoint_dir>')}",
        (DirKind.KILN_CHECKPOINT, DirKind.ENGINE): f"build it first with {build}",
        (DirKind.KILN_CHECKPOINT, DirKind.HF_CHECKPOINT):
            f"it is converted already; build it with {build}",
        (DirKind.ENGINE, DirKind.KILN_CHECKPOINT):
            f"it is built already; run it with {run}, or give the kiln checkpoint it was "
            f"built from ({_built_from(config)})",
        (DirKind.ENGINE, DirKind.HF_CHECKPOINT): f"it is built already; run it with {run}",
    }[found, wanted]
    return f"{path} is {found.value}, not {wanted.value}: {todo}"


# wrong_kind's steps (convert, build, run, the build cache's way) in a kiln command's words and
# in Python's; {path} is the directory given, {ckpt} and {engine} placeholders.
_CLI_STEPS = (
    "kiln convert_checkpoint --model_dir {path} --output_dir {ckpt}",
    "kiln build --checkpoint_dir {path} --output_dir {engine}",
    "kiln run --engine_dir {path} (kiln bench, eval and serve take --engine_dir too)",
    "kiln run, bench, eval and serve take it as --model_dir {path} (LLM(model=...)), which "
    "converts and builds it through the build cache",
)
_API_STEPS = (
    "kiln.convert_checkpoint({path}, {ckpt!r})",
    "kiln.build({path}, {engine!r})",
    "LLM({path})",
    "LLM(model={path}) takes it, converting and building it through the build cache "
    "(kiln.engine_for_model({path}) returns the engine dir it builds)",
)


def _built_from(manifest: dict[str, Any]) -> str:
    source = manifest.get("source")
    checkpoint = source.get("checkpoint_dir") if isinstance(source, dict) else None
    return option("checkpoint_dir", checkpoint) if checkpoint else \
        f"its {option('checkpoint_dir')}"


# Per kind, for read_config's errors: its article, what the directory is called, which one to
# pass, how to repair a damaged one.
_MADE_BY = {
    DirKind.HF_CHECKPOINT: ("an", "HF checkpoint directory",
                            "pass the directory holding the model's config.json and weights",
                            "download the checkpoint again"),
    DirKind.KILN_CHECKPOINT: ("a", "kiln checkpoint directory",
                              "pass the output_dir of kiln convert_checkpoint",
                              "re-run kiln convert_checkpoint"),
    DirKind.ENGINE: ("an", "engine directory", "pass the output_dir of kiln build",
                     "rebuild with kiln build"),
}


def only_child_of_kind(directory: Path, *wanted: DirKind, most: int = 64) -> Path | None:
    """The one subdirectory of ``directory`` of a kind in ``wanted``, if exactly one (a build
    cache entry given for its ``engine`` dir, a model's parent for the model); None otherwise,
    or when ``directory`` holds over ``most`` entries (no long scans for a hint)."""
    try:
        children = list(itertools.islice(directory.iterdir(), most + 1))
    except OSError:
        return None
    if len(children) > most:
        return None
    found = [c for c in children if c.is_dir() and classify_dir(c) in wanted]
    return found[0] if len(found) == 1 else None


def _near_names(directory: Path) -> str | None:
    """A directory whose path is close to ``directory``'s (a typo in its name or in a parent's,
    case included), as a path, or None."""
    near = near_path(directory)
    return None if near is None else str(near)


def near_path(path: Path, dirs_only: bool = True, depth: int = 3) -> Path | None:
    """An existing path close to ``path`` (a typo in its name or in a parent's, case included):
    a directory, or with ``dirs_only`` False a file too; None if there is none."""
    exists = Path.is_dir if dirs_only else Path.exists
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():  # a typo further up: find the parent first
        near_parent = near_path(parent, True, depth - 1) if depth and parent != path else None
        if near_parent is None:
            return None
        if exists(near_parent / path.name):
            return near_parent / path.name
        parent, path = near_parent, near_parent / path.name
    try:  # the first entries only: a huge parent is not worth the wait
        names = [p.name for p in itertools.islice(parent.iterdir(), 10000) if exists(p)]
    except OSError:  # not readable
        return None
    lower = {name.lower(): name for name in names}
    close = difflib.get_close_matches(path.name.lower(), list(lower), n=1, cutoff=0.75)
    return path.with_name(lower[close[0]]) if close else None


def special_file(path: Path) -> str | None:
    """What ``path`` is where it exists and is neither a directory nor a regular file: "a
    character device" (``/dev/null`` had been "no such engine directory"), "a block device",
    "a named pipe", "a socket"; else None."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):  # absent, unreadable, or a name the OS refuses
        return None
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def unknown_home(text: str) -> str | None:
    """Why a path's leading ``~`` or ``~user`` names no home directory (``~nouser/x``: "starts
    with ~nouser, but there is no user nouser"), else None. (``Path.expanduser`` raises
    RuntimeError there: a retest's ``--cache_dir ~nouser/x`` had been its traceback.)"""
    if not text.startswith("~") or os.path.expanduser(text) != text:
        return None
    user = text[1:].split("/", 1)[0].split(os.sep, 1)[0]
    return f"starts with ~{user}, but there is no user {user}" if user else \
        "starts with ~, but no home directory is known (HOME is unset)"


def expand_home(value: str | os.PathLike, name: str, error: type[Exception],
                flag: str | None = None) -> Path:
    """``value`` as a path with its leading ``~`` or ``~user`` expanded (``Path.expanduser``),
    or ``error`` (one line naming the option ``name``, :func:`kiln.errors.option`; ``flag``: its
    flag where that is not ``--name``) where that names no home directory (:func:`unknown_home`).
    Every user-given path goes through this, not ``expanduser``, which raises RuntimeError
    there: a retest's ``--model_dir ~nouser/x`` (and ``LLM(model=...)``, ``kiln.build``,
    ``kiln.convert_checkpoint``) had been its traceback."""
    text = os.fspath(value)
    if isinstance(text, str) and (problem := unknown_home(text)) is not None:
        raise error(f"{option(name, value, flag)} {problem}; give another path")
    return Path(text).expanduser()


def unusable_path(path: Path) -> str | None:
    """Why nothing can be at ``path``, in words, where the OS refuses the path itself: "is a
    symbolic link loop" (``ln -s loop loop``; "is under one" for a path below it), "has a name
    longer than the file system allows (255 bytes a name)", "is longer than the file system
    allows (4096 bytes a path)"; else None (it exists, or it can be made). (A retest's
    KILN_CACHE_DIR of these had been the OS's "Too many levels of symbolic links" and "File
    name too long", a loop in ``kiln cache list`` an empty cache.)"""
    try:
        os.stat(path)
    except (OSError, ValueError) as e:  # (ValueError: a NUL, which kiln refuses before)
        code = getattr(e, "errno", None)
    else:
        return None
    if code == errno.ELOOP:
        return "is a symbolic link loop" if path.is_symlink() else \
            "is under a symbolic link loop"
    if code != errno.ENAMETOOLONG:
        return None
    name_max, path_max = _limit("PC_NAME_MAX", 255), _limit("PC_PATH_MAX", 4096)
    if max(len(os.fsencode(part)) for part in path.parts) > name_max:
        return f"has a name longer than the file system allows ({name_max} bytes a name)"
    return f"is longer than the file system allows ({path_max} bytes a path)"


def _limit(name: str, default: int) -> int:
    """The root file system's ``os.pathconf`` limit ``name``, else ``default`` (Linux's)."""
    try:
        return os.pathconf("/", name)
    except (OSError, ValueError, AttributeError):  # (no pathconf on Windows)
        return default


def absent(path: Path) -> str:
    """Why ``path``, expected to be a file, is not one, for a message: "missing", "is a
    directory, not a file" (a retest's config.json made a directory had read "missing"), "is a
    symbolic link to x, which does not exist"."""
    if path.is_symlink() and not path.exists():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if not path.exists():
        return "missing"
    return f"is {special_file(path) or 'a directory'}, not a file"


def read_config(directory: str | Path, wanted: DirKind, error: type[Exception],
                name: str | None = None, flag: str | None = None) -> tuple[Path, dict[str, Any]]:
    """``(path, parsed config.json)`` of ``directory``, which must be of kind ``wanted``.

    Every way it can fail (a file given, no such directory, no or invalid ``config.json``,
    another kind of directory) raises ``error`` with one line that says how to fix it; the
    format's owner then validates the contents. ``name``: the option ``directory`` was given
    as, which a file (or a device..., or no such directory) given is named by
    (:func:`kiln.errors.option`; ``flag``: its flag where that is not ``--name``), as the CLI's
    path checks name theirs (a retest's ``--engine_dir FILE`` had named no option).
    """
    article, noun, fix, repair = _MADE_BY[wanted]
    if not str(directory).strip():  # Path("") would be the current directory
        raise error(f"the {noun} is empty; {fix}")
    directory = Path(directory)
    path = directory / "config.json"
    given = directory if name is None else option(name, directory, flag)
    if directory.is_file():
        holder = directory.parent if str(directory.parent) else Path(".")
        hint = f"pass the directory that holds it ({holder})" \
            if classify_dir(holder) is wanted else fix
        raise error(f"{given}: is a file, not {article} {noun}; {hint}")
    if (special := special_file(directory)) is not None:
        raise error(f"{given}: is {special}, not {article} {noun}; {fix}")
    if not directory.is_dir():
        near = _near_names(directory)
        raise error(f"{given}: no such {noun}; "
                    + (f"did you mean {near}? " if near else "") + fix)
    if not path.is_file():
        inside = only_child_of_kind(directory, wanted)
        raise error(f"{path}: {absent(path)}, so {directory} is not {article} {noun}; "
                    + (f"did you mean {inside}?" if inside else fix))
    try:
        data = json.loads(path.read_text(USER_TEXT))
    except UNREADABLE_JSON as e:
        raise error(f"{path}: invalid JSON ({e}); {repair}") from None
    if not isinstance(data, dict):  # a retest's [], null, "x" and 1 had given tracebacks
        raise error(f"{path}: holds {json_type(data)}, not a JSON object; "
                    f"{repair}")
    if message := wrong_kind(directory, data, wanted):
        raise error(message)
    return path, data


def is_hub_id(text: str) -> bool:
    """``org/name`` as the Hugging Face hub validates it (no leading ``.``/``-``, no
    ``..``/``--``, ...): what kiln reads as a hub repo id when no local path of that name exists.
    A bare ``name`` is not one: it is far likelier a typo'd local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
