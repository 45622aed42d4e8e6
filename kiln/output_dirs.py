"""Writing an output directory (kiln checkpoint or engine dir) without ever losing a user's file.

Contract:
- :func:`check_output` runs before any work. It refuses an output dir that is, contains or lies
  inside one of the command's input dirs, and an existing one unless ``overwrite``. With
  ``overwrite`` it replaces only an empty directory or one kiln itself wrote of the kind the
  command writes (``writes``: a kiln checkpoint or engine manifest in ``config.json`` and
  nothing but the files kiln writes beside it; a build's ``--overwrite`` never replaces a
  checkpoint that took a long calibration); never a filesystem root, the home directory, the
  current directory or anything inside a build cache entry; nor a name past ``NAME_MAX``; nor
  a directory a process holds loaded (:mod:`kiln.dir_locks`: ``kiln serve`` or an ``LLM``
  running that engine dir), checked again at the replacement.
- :func:`atomic_dir` writes into a temporary directory beside the target and renames it into
  place only when the body succeeds; the old output is moved aside first and restored if the
  rename fails, so it survives any failure. What it replaces is logged at the default level.
- The Python entry points take ``output_dir`` through :func:`output_path`: a str or
  os.PathLike, not empty, not ``-`` (nor ``Path("-")``; the str ``"./-"`` names a directory
  "-"), as the CLI's ``--output_dir``. A full disk (or quota) while writing is an
  :class:`OutputError` naming the target and the fix; nothing is left behind.
- New directories get the user's umask (``tempfile.mkdtemp`` alone would make them 0700). An
  unwritable parent is refused before any work; parents created for a write that then failed
  are removed again; temporary dirs left by a killed kiln process (their names carry its pid)
  are removed, with a warning, by the next write of the same target.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from kiln.checkpoint import CONFIG_NAME as MANIFEST_NAME
from kiln.checkpoint import TOKENIZER_FILES, rank_file
from kiln.dir_locks import check_unused, replacing
from kiln.dirs import expand_home
from kiln.engine import (
    ENGINE_FILE,  # rank files of a checkpoint or engine dir
    manifest_edit,
)
from kiln.errors import (
    UNREADABLE_JSON,
    USER_TEXT,
    OutputError,
    OutputExistsError,
    check_path,
    option,
)
from kiln.hashing import sha256_file

log = logging.getLogger(__name__)
ACCURACY_NAME = "accuracy.json"  # kiln quantize's accuracy gate figures, beside config.json
ENGINE_KIND, CHECKPOINT_KIND = "kiln engine dir", "kiln checkpoint"  # what a command writes
NAME_MAX = 255  # bytes of one file name: ext4, xfs, btrfs, tmpfs, APFS
FULL = (errno.ENOSPC, errno.EDQUOT)  # a write that does not fit: no space left, a quota


def check_output(output_dir: Path, overwrite: bool, inputs: Sequence[Path] = (),
                 writes: str | None = None) -> None:
    """Refuse an unsafe ``output_dir`` before any work is done (module docstring); ``writes``:
    the kind of directory the command writes (``ENGINE_KIND`` or ``CHECKPOINT_KIND``)."""
    check_path("output_dir", output_dir, OutputError, "give the directory to write")
    output_dir = expand_home(output_dir, "output_dir", OutputError)
    long = next((part for part in output_dir.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is not None:
        raise OutputError(f"{option('output_dir', output_dir)}: the name {long[:40]}... is "
                          f"{len(os.fsencode(long))} bytes; file systems take at most "
                          f"{NAME_MAX}: choose a shorter one")
    out = output_dir.resolve()
    for source in inputs:
        _check_apart(output_dir, out, Path(source))
    _check_outside_cache_entries(output_dir, out)
    if not (output_dir.exists() or output_dir.is_symlink()):
        _check_writable(output_dir)
        return
    if output_dir.is_symlink():
        raise OutputError(f"{output_dir}: is a symbolic link; kiln does not replace links: pass "
                          f"the directory it points to ({out}) or a new path")
    if not output_dir.is_dir():
        raise OutputError(f"{output_dir}: exists and is not a directory; choose another "
                          f"{option('output_dir')}")
    protected = {Path(out.anchor): "the filesystem root", Path.home().resolve(): "your home "
                 "directory", Path.cwd().resolve(): "the current directory"}
    if out in protected:
        raise OutputError(f"{output_dir}: is {protected[out]}; kiln never replaces it, choose a "
                          f"new {option('output_dir')}")
    if not overwrite:
        raise OutputExistsError(f"{output_dir}: already exists; pass {option('overwrite', True)} "
                                f"to replace it (only a directory kiln wrote is replaced)")
    _check_kind(output_dir, describe_replaceable(output_dir), writes)
    _check_writable(output_dir)
    check_unused(output_dir)  # a process holds it loaded (kiln serve, an LLM): refused


def output_path(output_dir: str | os.PathLike) -> Path:
    """A Python caller's ``output_dir`` as a path, refused (:class:`OutputError`, one line) if
    it is not a str or os.PathLike, is empty, or is ``-`` (:func:`kiln.errors.check_path`;
    ``"./-"`` names a directory "-"). The entry points check it before ``Path()``, which reads
    "" as the current directory (a trial had been told of output_dir='.')."""
    check_path("output_dir", output_dir, OutputError, "give the directory to write",
               directory=True)
    return expand_home(output_dir, "output_dir", OutputError)


def _check_outside_cache_entries(output_dir: Path, out: Path) -> None:
    """Refuse an output that is or lies inside an entry of a kiln build cache: the cache would
    go on serving what a user's build put there under the key of another model (a trial's
    ``kiln build --output_dir $KILN_CACHE_DIR/engines/NAME/engine --overwrite``; the entry
    itself had been told only that it holds 'engine', 'entry.json' and no manifest)."""
    from kiln.build_cache.store import entry_holding

    if (entry := entry_holding(out)) is not None:
        where = "is" if entry == out else "lies inside"
        raise OutputError(f"{option('output_dir', output_dir)} {where} {entry}, an entry of "
                          f"kiln's build cache, which manages it (kiln run --model_dir and kiln "
                          f"cache build make its engines, kiln cache prune removes them): choose "
                          f"a directory outside the cache")


def _check_writable(output_dir: Path) -> None:
    """The nearest existing parent must take new entries (the output is renamed into it)."""
    parent = output_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{output_dir}: cannot be written, {parent} is a file, not a "
                          f"directory; choose another {option('output_dir')}")
    if not os.access(parent, os.W_OK | os.X_OK) or \
            cannot_create_in(parent):
        raise OutputError(f"{output_dir}: cannot be written, {parent} is not a writable "
                          f"directory (permissions, or a read-only file system); choose another "
                          f"{option('output_dir')}")


def cannot_create_in(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory`` (None if it can): the one sure check, since
    permission bits say nothing about read-only or pseudo file systems (/sys) or root."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".kiln-probe-", dir=directory)
    except OSError as e:
        if e.errno == errno.ENOENT and directory.is_dir():  # /proc answers "no such file"
            return "it takes no new files: a pseudo file system, as /proc is"
        return e.strerror or str(e)
    os.close(handle)
    os.unlink(probe)
    return None


def _check_apart(output_dir: Path, out: Path, source: Path) -> None:
    src = source.resolve()  # (expanded by its caller: kiln.dirs.expand_home)
    if out == src:
        relation = "is"
    elif out.is_relative_to(src):
        relation = "lies inside"
    elif src.is_relative_to(out):
        relation = "contains"
    else:
        return
    raise OutputError(f"{option('output_dir', output_dir)} {relation} the input {source}; "
                      f"writing there would destroy the input: choose a directory outside it")


def describe_replaceable(directory: Path, damaged_ranks: bool = False) -> str:
    """What kiln output ``directory`` holds ("empty directory", "kiln engine dir ...");
    raises :class:`OutputError` naming what is in the way if kiln did not write it. A rank file
    must be the one the manifest describes (:func:`_rank_file_as_recorded`: recorded sizes and
    sha256, a checkpoint's header), so a user's file under a rank file's name is not taken
    for kiln's, and a manifest edited since kiln wrote it (its digest) holds the user's edit;
    ``damaged_ranks``: take a rank file the manifest names as kiln's even so, and an edited
    manifest (the build cache, which removes and rebuilds its damaged entries)."""
    entries = sorted(p.name for p in directory.iterdir())
    if not entries:
        return "empty directory"
    manifest = directory / MANIFEST_NAME
    data = _read_manifest(manifest)
    kind = _kiln_kind(data)
    if kind is None:
        raise OutputError(f"{directory}: holds {_few(entries)} and no kiln checkpoint or engine "
                          f"manifest; kiln only replaces directories it wrote: move them away or "
                          f"choose another {option('output_dir')}")
    if not damaged_ranks and manifest_edit(data) is not None:
        since = "the build" if kind == ENGINE_KIND else "kiln wrote it"
        raise OutputError(f"{directory}: is a {kind} whose {MANIFEST_NAME} was edited since "
                          f"{since} (it no longer matches the digest recorded in it), and "
                          f"{option('overwrite', True)} would lose the edit; undo it, or choose "
                          f"another {option('output_dir')} (or, to drop the edit, delete "
                          f"{directory} yourself)")
    written = manifest.stat().st_mtime_ns
    ranks = _rank_files(data)
    foreign = [n for n in entries
               if not _written_with(directory / n, data, ranks, written, damaged_ranks)]
    if foreign:
        raise OutputError(f"{directory}: is a {kind} but also holds {_few(foreign)}, which kiln "
                          f"did not write (or which changed after it wrote the directory); move "
                          f"them away or choose another {option('output_dir')} (if kiln verify "
                          f"called them damaged, delete {directory} yourself)")
    return kind


def _check_kind(directory: Path, kind: str, writes: str | None) -> None:
    """Refuse to replace a kiln directory of another kind than the one being written."""
    if writes is not None and kind in (ENGINE_KIND, CHECKPOINT_KIND) and kind != writes:
        raise OutputError(f"{directory}: is a {kind}, and this command writes a {writes}; "
                          f"{option('overwrite', True)} replaces only its own kind: choose another "
                          f"{option('output_dir')} (or delete that one yourself)")


def _rank_files(data: dict) -> set[str]:
    """The rank files a manifest says its directory holds: an engine's ``rank_files``, a
    checkpoint's ``rank{r}.safetensors`` for each rank of its mapping (empty if malformed)."""
    listed = data.get("rank_files")
    if isinstance(listed, dict):  # an engine dir
        return {n for files in listed.values() if isinstance(files, list) for n in files
                if isinstance(n, str)}
    mapping = data.get("mapping")
    sizes = [mapping.get(k) for k in ("tp_size", "pp_size")] if isinstance(mapping, dict) else []
    if len(sizes) != 2 or not all(isinstance(n, int) and 0 < n <= 4096 for n in sizes):
        return set()
    return {rank_file(r) for r in range(sizes[0] * sizes[1])}


def _written_with(path: Path, data: dict, ranks: set[str], written: int,
                  damaged_ranks: bool = False) -> bool:
    """Whether kiln wrote ``path`` with the manifest ``data`` beside it (written at
    ``written``, in ns; ``ranks``: :func:`_rank_files`): a rank file the manifest names, of the
    size it records (a checkpoint's: a safetensors file; any, with ``damaged_ranks``), or one
    of the manifest's ``other_files`` with the sha256 recorded there; never a folder or a link
    (a user's ``special_tokens_map.json``, or a chat template edited after the build, is not
    kiln's). A manifest of an older kiln records no other files: then a name kiln writes
    (tokenizer and accuracy files) no newer than the manifest, which kiln writes last
    (tokenizer copies keep their source's time)."""
    name = path.name
    if name == MANIFEST_NAME:
        return True
    if path.is_symlink() or not path.is_file():  # a user's folder or link under a kiln name
        return False
    if ENGINE_FILE.fullmatch(name):
        return name in ranks and (damaged_ranks or _rank_file_as_recorded(path, data))
    try:
        if "other_files" in data:  # not a mapping of names to digests: edited, nothing matches
            recorded = data["other_files"] if isinstance(data["other_files"], dict) else {}
            return name in recorded and sha256_file(path) == recorded[name]
        return name in (ACCURACY_NAME, *TOKENIZER_FILES) and path.lstat().st_mtime_ns <= written
    except OSError:
        return False


def _rank_file_as_recorded(path: Path, data: dict) -> bool:
    """Whether rank file ``path`` is as kiln wrote it: the size an engine manifest records and,
    with its sha256 ``checksums``, those bytes (hashed once per overwrite: a same-size edit of
    an engine file is the user's); for a checkpoint (no sizes recorded), a safetensors file
    (its 8-byte header length and JSON header) holding the tensors the manifest implies for
    that rank, no more and no less, and ending where its header says (a trial's own adapter
    file saved under ``rank0.safetensors`` had been replaced), or where the manifest records
    ``rank_checksums``, the bytes kiln wrote (a trial's same-size edit had been replaced). A
    manifest of an older kiln records no sizes: then any file of the name."""
    try:
        size = path.stat().st_size
        sizes = data.get("sizes")
        if isinstance(sizes, dict) and path.name in sizes:
            digests = data.get("checksums")
            digest = digests.get(path.name) if isinstance(digests, dict) else None
            return sizes[path.name] == size and (not isinstance(digest, str)
                                                 or _digest(path) == digest.lower())
        if path.suffix != ".safetensors":
            return True
        recorded = data.get("rank_checksums")
        if isinstance(recorded, dict) and isinstance(recorded.get(path.name), str):
            # what kiln wrote, byte for byte: a user's edit of the same size, or a damaged
            # copy, is not replaced (kiln verify names it; the user moves it away)
            return _digest(path) == recorded[path.name].lower()
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= min(size - 8, 100 << 20):
                return False
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            return False
        header.pop("__metadata__", None)
        expected = _checkpoint_rank_names(data, path.name)
        return expected is None or (set(header) == expected
                                    and 8 + length + _data_end(header) == size)
    except (OSError, *UNREADABLE_JSON):
        return False


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime ns) -> sha256


def _digest(path: Path) -> str:
    """sha256 of ``path``, hashed once for an unchanged file (an overwrite checks its target
    before the work and again before replacing it)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:  # a pause worth a word at the default level from a GB on
        log.log(logging.WARNING if stat.st_size >= 1 << 30 else logging.INFO,
                "hashing %s (%.2f GB) to replace only the bytes kiln wrote", path,
                stat.st_size / 1e9)
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def _checkpoint_rank_names(data: dict, name: str) -> set[str] | None:
    """The tensors a checkpoint manifest ``data`` implies for its rank file ``name``, or None
    where the manifest does not parse (then the header alone is checked)."""
    from kiln.checkpoint import CheckpointConfig
    from kiln.errors import KilnError

    match = re.fullmatch(r"rank(\d+)\.safetensors", name)
    try:
        config = CheckpointConfig.from_dict(data)
        return set(config.rank_tensor_names(int(match[1]))) if match else None
    except (KilnError, KeyError, TypeError, ValueError):
        return None


def _data_end(header: dict) -> int:
    """Where a safetensors header's tensor data ends (-1 for a malformed entry)."""
    try:
        return max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return -1


def _read_manifest(manifest: Path) -> dict | None:
    try:
        data = json.loads(manifest.read_text(USER_TEXT))  # as kiln reads it (a BOM)
    except (OSError, *UNREADABLE_JSON):
        return None
    return data if isinstance(data, dict) else None


def _kiln_kind(data: dict | None) -> str | None:
    """"kiln engine dir" / "kiln checkpoint" when ``data`` (a parsed manifest) is one kiln
    wrote, else None."""
    if data is None or not {"format_version", "kiln_version"} <= data.keys():
        return None
    if "backend" in data and "rank_files" in data:
        return ENGINE_KIND
    if "decoder" in data and "mapping" in data:
        return CHECKPOINT_KIND
    return None


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@contextmanager
def atomic_dir(target: Path, overwrite: bool, writes: str | None = None) -> Iterator[Path]:
    """A temporary directory beside ``target``, renamed onto it only if the body succeeds.

    An existing ``target`` (allowed by :func:`check_output`, for ``writes`` as there) is
    checked again, moved aside, and put back if the final rename fails; it is deleted only
    once the new output is in place.
    """
    target = Path(target)
    created = make_parents(target.parent)
    done = False
    tmp = None
    try:
        _remove_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{_stem(target)}.tmp-{os.getpid()}-",
                                    dir=target.parent))
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if not target.exists():
            tmp.rename(target)
        elif not overwrite:
            raise OutputExistsError(f"{target}: appeared while writing it; not replaced")
        else:
            _replace(target, tmp, writes)
        done = True
    except OSError as e:
        if (full := disk_full(e)) is None:
            raise
        raise OutputError(f"{target}: cannot be written ({full.strerror}); nothing was left "
                          f"half-written: free space on its file system or choose another "
                          f"{option('output_dir')}") from e
    finally:
        if tmp is not None and tmp.exists():
            _remove_tree(tmp)
        if not done:  # parents this call created, if the failure left them empty
            for parent in reversed(created):
                with contextlib.suppress(OSError):
                    parent.rmdir()


def disk_full(error: BaseException) -> OSError | None:
    """The "no space left" or "quota exceeded" OSError that ``error`` is or was raised from,
    else None: :func:`atomic_dir` and the build cache name the directory that did not fit and
    the fix (a trial's full disk had been told "No space left on device" alone)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in FULL:
            return error
        error = error.__cause__
    return None


def _replace(target: Path, tmp: Path, writes: str | None) -> None:
    kind = describe_replaceable(target)  # it may have changed since check_output
    _check_kind(target, kind, writes)
    with replacing(target):  # loaded since check_output: refused; loaders wait for the renames
        trash = Path(tempfile.mkdtemp(prefix=f".{_stem(target)}.old-{os.getpid()}-",
                                      dir=target.parent))
        try:
            target.rename(trash / "old")
        except BaseException:
            trash.rmdir()
            raise
        try:
            tmp.rename(target)
        except BaseException:
            (trash / "old").rename(target)
            trash.rmdir()
            raise
    try:
        log.warning("replaced %s (%s) with the new output", target, kind)
    finally:
        _remove_tree(trash)


def _remove_tree(path: Path) -> None:
    """``shutil.rmtree`` that, interrupted, finishes before the interrupt goes on (deleting is
    quick): a Ctrl-C just after the new output's rename had left the old one half deleted
    beside it."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def make_parents(parent: Path) -> list[Path]:
    """mkdir -p ``parent``; the directories it created, outermost first."""
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
    return list(reversed(missing))


def _remove_stale(target: Path) -> None:
    """Temporary dirs of ``target`` left by a kiln process that was killed (SIGKILL, OOM): the
    names carry the writer's pid; those whose process is gone are removed, and said so."""
    stem = _stem(target)
    for path in target.parent.glob(f".{glob.escape(stem)}.*-*-*"):
        match = re.fullmatch(rf"\.{re.escape(stem)}\.(tmp|old)-(\d+)-\w+", path.name)
        if match and path.is_dir() and not _alive(int(match.group(2))):
            log.warning("removing %s, left by a kiln process that is no longer running",
                        path)
            _remove_tree(path)


# bytes of a target's name that its temporary dirs carry: a name may take a file system's
# 255 bytes, and ".tmp-<pid>-<random>" must fit beside it
_STEM_BYTES = 200


def _stem(target: Path) -> str:
    """``target``'s name as the temporary dirs beside it carry it (cut to ``_STEM_BYTES``)."""
    return os.fsdecode(os.fsencode(target.name)[:_STEM_BYTES])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def copy_tokenizer(checkpoint_dir: Path, out: Path) -> dict[str, str]:
    """Copy the tokenizer files of ``checkpoint_dir`` into ``out``: their names and sha256s
    (:func:`file_digests`), for the manifest's ``other_files``."""
    copied = [name for name in TOKENIZER_FILES if (checkpoint_dir / name).is_file()]
    for name in copied:
        # the content and times (an older manifest's rule compares them), not the source's
        # permission bits: the copy gets the user's umask, as every file kiln writes
        shutil.copyfile(checkpoint_dir / name, out / name)
        source = (checkpoint_dir / name).stat()
        os.utime(out / name, ns=(source.st_atime_ns, source.st_mtime_ns))
    if "tokenizer.json" not in copied:  # kiln.runtime.tokenizer reads only that one
        log.warning("%s has no tokenizer.json; its engine will not run (kiln run, LLM and "
                    "kiln serve load one, even for token-id prompts) until it is copied in: "
                    "convert from a Hugging Face dir that has it", checkpoint_dir)
    return file_digests(out, copied)


def file_digests(directory: Path, names: Sequence[str]) -> dict[str, str]:
    """``{name: sha256}`` of files kiln wrote into ``directory``: a manifest's ``other_files``,
    by which :func:`describe_replaceable` tells them from a user's file of the same name."""
    return {name: sha256_file(directory / name) for name in sorted(names)}
