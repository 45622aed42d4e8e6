"""``kiln verify ENGINE_DIR``: check an engine dir against its manifest, on any machine (or a
kiln checkpoint against the rank file checksums its config.json recorded).

Reads and validates ``config.json``, checks that every rank of the mapping lists files, then
checks every listed file of every rank: present, the manifest's size, the manifest's sha256
(whether this machine could run the engine is not checked: ``kiln run`` does that), the other
files the build wrote (tokenizer files, generation config: their sha256), and that the
tokenizer loads as ``LLM`` loads it (``tokenizer.json`` present and readable). Prints one line
per file (``-q``: the summary only; a tokenizer problem: always), then a summary; exit 0 when
all is good, else exit 2 with a one-line error naming the first problem.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import kiln
from kiln.cli.context import CliContext, PathArg
from kiln.dirs import (
    ENGINE_KEYS,
    DirKind,
    absent,
    classify_dir,
    dir_kind,
    near_path,
    only_child_of_kind,
    read_config,
    special_file,
)
from kiln.engine import (
    DIGEST_KEY,
    EngineError,
    EngineManifest,
    file_problem,
    manifest_edit,
    read_manifest_data,
)
from kiln.errors import UNREADABLE_JSON, USER_TEXT, counted, json_type
from kiln.hashing import other_file_problems
from kiln.runtime.compat import kiln_version_problem
from kiln.sizes import size_text

log = logging.getLogger(__name__)


def manifest_problems(manifest: EngineManifest) -> list[str]:
    """What the manifest itself lacks: a rank of the mapping without files, a file without a
    checksum."""
    ranks = range(manifest.mapping.world_size)
    problems = [f"rank {r}: no files listed" for r in ranks if not manifest.rank_files.get(r)]
    problems += [f"rank {r}: listed, but the mapping has {len(ranks)} ranks"
                 for r in sorted(manifest.rank_files) if r not in ranks]
    problems += [f"{name}: no checksum recorded" for files in manifest.rank_files.values()
                 for name in files if name not in manifest.checksums]
    return problems


def tokenizer_problem(engine_dir: Path) -> str | None:
    """Why the engine dir's tokenizer does not load (the check ``LLM`` makes), or None."""
    from kiln.runtime.errors import TokenizerError
    from kiln.runtime.tokenizer import load_tokenizer

    try:
        load_tokenizer(engine_dir)
    except TokenizerError as e:
        return str(e).removeprefix(f"{engine_dir}{os.sep}")
    return None


_REPAIRS = {
    DirKind.ENGINE: "rebuild the engine dir with kiln build",
    DirKind.KILN_CHECKPOINT: "write the kiln checkpoint again with kiln convert_checkpoint",
}


def _repairs(directory: Path, data: dict[str, Any] | None) -> str:
    """The repair of a ``config.json`` too damaged to verify by: the command that makes the
    directory's kind where its manifest keys or its files tell the kind (a trial's checkpoint
    had been told of kiln build too), else both."""
    kind = _likely_kind(directory, data)
    if kind in _REPAIRS:
        return _REPAIRS[kind]
    return ("rebuild an engine dir with kiln build, write a kiln checkpoint again with "
            "kiln convert_checkpoint")


def _likely_kind(directory: Path, data: dict[str, Any] | None) -> DirKind | None:
    """An engine dir when ``data`` has an engine manifest's keys or the directory holds an
    onnx or TensorRT engine file or a torch engine's packed rank file; a kiln checkpoint when
    its ``rank0.safetensors`` is a plain one; else None."""
    from kiln.errors import KilnError
    from kiln.tensorio import read_header

    if data is not None and not ENGINE_KEYS.isdisjoint(data):
        return DirKind.ENGINE
    if any(directory.glob("rank0*.onnx")) or any(directory.glob("rank0*.engine")):
        return DirKind.ENGINE
    rank0 = directory / "rank0.safetensors"
    if not rank0.is_file():
        return None
    try:
        _, metadata = read_header(rank0)
    except (KilnError, OSError):
        return None
    # (the torch backend's packed files carry it: kiln.engine.torch_files)
    return DirKind.ENGINE if "kiln_torch_format" in metadata else DirKind.KILN_CHECKPOINT


class _OneEngineDir(click.Command):
    """The engine dir given once, as an argument or as ``--engine_dir``: checked with the
    parsing, so that a usage error imports nothing heavy."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        if (ctx.params.get("engine_dir") is None) == (ctx.params.get("engine_dir_option") is None):
            raise click.UsageError("give the engine dir or kiln checkpoint once: kiln verify "
                                   "DIR (or --engine_dir DIR)", ctx)
        return rest


@click.command("verify", cls=_OneEngineDir)
@click.argument("engine_dir", type=PathArg(path_type=Path), required=False, metavar="ENGINE_DIR")
@click.option("--engine_dir", "engine_dir_option", type=PathArg(path_type=Path),
              help="The engine dir, as the other commands take it (or give it alone).")
@click.pass_obj
def verify(obj: CliContext, engine_dir: Path | None, engine_dir_option: Path | None) -> None:
    """Check an engine dir against its manifest: files, sizes and checksums of every rank
    (a kiln checkpoint: its rank files against the sha256 its config.json recorded)."""
    from tqdm import tqdm

    from kiln.progress import progress_bar

    engine_dir = engine_dir or engine_dir_option
    either = "pass an engine dir (the output_dir of kiln build) or a kiln checkpoint (the " \
        "output_dir of kiln convert_checkpoint)"
    if engine_dir.is_file():  # (read_config's words named engine dirs alone)
        holder = engine_dir.parent  # (Path("x.txt").parent is Path("."))
        hint = f"pass the directory that holds it ({holder})" if classify_dir(holder) in \
            (DirKind.ENGINE, DirKind.KILN_CHECKPOINT) else either
        raise EngineError(f"{engine_dir}: is a file, not an engine dir or a kiln checkpoint; "
                          f"{hint}")
    if (special := special_file(engine_dir)) is not None:  # (it exists: not "no such ...")
        raise EngineError(f"{engine_dir}: is {special}, not an engine dir or a kiln checkpoint; "
                          f"{either}")
    if str(engine_dir).strip() and not engine_dir.exists():  # either kind would have been right
        near = near_path(engine_dir)
        raise EngineError(f"{engine_dir}: no such directory; "
                          + (f"did you mean {near}? " if near else "") + either)
    config_path, data = engine_dir / "config.json", None
    if config_path.is_file():
        try:  # as build, run and bench read it: a BOM is no part of the JSON
            data = json.loads(config_path.read_text(USER_TEXT))
        except UNREADABLE_JSON as e:
            raise EngineError(f"{config_path}: invalid JSON ({e}); "
                              f"{_repairs(engine_dir, None)}") from None
        if not isinstance(data, dict):
            raise EngineError(f"{config_path}: holds {json_type(data)}, not a JSON object; "
                              f"{_repairs(engine_dir, None)}")
        # {}, say: a retest's had been told only of engines
        if "format_version" not in data and dir_kind(data) is DirKind.OTHER:
            raise EngineError(f"{config_path}: no format_version, so neither an engine "
                              f"manifest nor a kiln checkpoint config; "
                              f"{_repairs(engine_dir, data)}")
    if engine_dir.is_dir() and not config_path.is_file():  # a parent, say
        inside = only_child_of_kind(engine_dir, DirKind.ENGINE, DirKind.KILN_CHECKPOINT)
        raise EngineError(f"{engine_dir / 'config.json'}: {absent(config_path)}, so {engine_dir} "
                          f"is neither an "
                          f"engine dir nor a kiln checkpoint; "
                          + (f"did you mean {inside}?" if inside else either))
    if dir_kind(data) is DirKind.KILN_CHECKPOINT:
        verify_checkpoint(obj, engine_dir)
        return
    if dir_kind(data) is DirKind.HF_CHECKPOINT:  # (read_manifest's words are run's and bench's)
        raise EngineError(f"{engine_dir}: is a Hugging Face checkpoint, not an engine dir or a "
                          f"kiln checkpoint; kiln verify checks what kiln wrote against the "
                          f"checksums it recorded: verify the kiln checkpoint kiln "
                          f"convert_checkpoint --model_dir {engine_dir} writes, or its engine")

    manifest, data = read_manifest_data(engine_dir)
    problems = [p for p in (manifest_edit(data),
                            kiln_version_problem(manifest.kiln_version, kiln.__version__))
                if p is not None]
    problems += manifest_problems(manifest)  # each said: the count below had included them
    for problem in problems:
        click.echo(f"FAIL manifest  {problem}")
    files = [(rank, name) for rank in sorted(manifest.rank_files)
             for name in manifest.rank_files[rank]]
    paths = [p for _, name in files if (p := engine_dir / name).is_file()]
    total = sum(p.stat().st_size for p in paths)
    width = max((len(name) for _, name in files), default=0)
    with progress_bar(total=total, unit="B", unit_scale=True, desc="sha256", delay=1.0,
                      show=obj.progress) as bar:
        for rank, name in files:
            problem = file_problem(engine_dir, manifest, name, checksum=True, on_block=bar.update)
            if problem is not None:
                problems.append(f"{name}: {problem}")
            if obj.verbosity >= 0 or problem is not None:
                with tqdm.external_write_mode():
                    click.echo(_line(engine_dir / name, rank, name.ljust(width), problem))
    others = other_file_problems(engine_dir, manifest.other_files)
    for problem in others:
        click.echo(f"FAIL file  {problem}")
    problems += others
    tokenizer = tokenizer_problem(engine_dir)
    if tokenizer is not None:
        problems.append(tokenizer)
        click.echo(f"FAIL tokenizer  {tokenizer}")
    sizes = "sizes and checksums" if manifest.sizes is not None else \
        "checksums (the manifest records no sizes: built by an older kiln)"
    unedited = "the manifest unedited since the build, " if DIGEST_KEY in data else \
        "(the manifest records no digest of its own: built by an older kiln, or removed, so " \
        "its edits cannot be told) "
    if problems:
        fix = "" if "rebuild" in problems[0] else "; rebuild with kiln build"
        raise EngineError(f"{engine_dir}: {counted(len(problems), 'problem')}, first: "
                          f"{problems[0]}{fix}")
    ranks = len(manifest.rank_files)
    extra = f" and {counted(len(manifest.other_files), 'other file')}" \
        if manifest.other_files else ""
    click.echo(f"{engine_dir}: ok, {unedited}{counted(len(files), 'file')} of "
               f"{counted(ranks, 'rank')}{extra}, {total / 1e9:.2f} GB: present, {sizes} "
               f"match the manifest")


def verify_checkpoint(obj: CliContext, directory: Path) -> None:
    """``kiln verify`` of a kiln checkpoint: every rank file present with the sha256 its writer
    recorded (``rank_checksums``, the check kiln build and kiln quantize make as they read),
    and the other files it wrote unchanged; one line per rank file, then a summary."""
    from tqdm import tqdm

    from kiln.checkpoint import (
        CONFIG_NAME,
        CheckpointConfig,
        check_rank_checksums,
        rank_file,
        written_by,
    )
    from kiln.errors import CheckpointError, KilnError
    from kiln.hashing import manifest_edited, sha256_file
    from kiln.progress import progress_bar

    path, data = read_config(directory, DirKind.KILN_CHECKPOINT, CheckpointError)
    config = CheckpointConfig.from_dict(data, str(path))  # (load_config, from one read)
    problems = []
    if manifest_edited(data):
        problems.append(f"{CONFIG_NAME}: edited since kiln wrote it (it no longer matches the "
                        f"digest recorded in it): undo the edit; or, for an edit made on "
                        f"purpose, remove {DIGEST_KEY} from it; or write the checkpoint again "
                        f"into a new directory")
        click.echo(f"FAIL manifest  {problems[-1]}")
    unrecorded = config.rank_checksums is None  # an older kiln's: read every value instead
    if unrecorded:
        log.warning("%s records no rank file checksums (written by a kiln before they were "
                    "recorded, or the key removed): checking each rank file's header, tensor "
                    "names and values instead (convert it again to record them)", directory)
    names = [rank_file(rank) for rank in range(config.mapping.world_size)]
    paths = [p for name in names if (p := directory / name).is_file()]
    total = sum(p.stat().st_size for p in paths)
    with progress_bar(total=total, unit="B", unit_scale=True, desc="sha256", delay=1.0,
                      show=obj.progress) as bar:
        for rank, name in enumerate(names):
            path, problem = directory / name, None
            if not path.is_file():  # the repair named, as an engine's missing file's is
                problem = f"missing (listed in config.json); copy it again, or write the " \
                          f"checkpoint again with {written_by(config)}"  # (quantize's too)
            elif unrecorded:
                problem = _content_problem(path, config, rank, bar.update)
            else:
                try:
                    check_rank_checksums(directory, config,
                                         {name: sha256_file(path, on_block=bar.update)})
                except KilnError as e:  # a damaged header says more (a truncated copy)
                    problem = _content_problem(path, config, rank, header_only=True) \
                        or str(e).removeprefix(f"{path}: ")
            if problem is not None:
                problems.append(f"{name}: {problem}")
            if obj.verbosity >= 0 or problem is not None:
                with tqdm.external_write_mode():
                    click.echo(_line(path, rank, name, problem))
    others = other_file_problems(directory, config.other_files, "kiln", "kiln wrote it",
                                 "config.json's")
    for problem in others:
        click.echo(f"FAIL file  {problem}")
    problems += others
    if problems:
        raise CheckpointError(f"{directory}: {counted(len(problems), 'problem')}, first: "
                              f"{problems[0]}")
    extra = f" and {counted(len(config.other_files), 'other file')}" \
        if config.other_files else ""
    checked = "headers, tensor names and values read (no checksums recorded)" if unrecorded \
        else "checksums match config.json"
    if DIGEST_KEY in data:  # as an engine's summary says it
        checked = f"config.json unedited since kiln wrote it, {checked}"
    click.echo(f"{directory}: ok, {counted(len(names), 'rank file')}{extra} of a kiln "
               f"checkpoint, {total / 1e9:.2f} GB: present, {checked}")


def _content_problem(path: Path, config: Any, rank: int,
                     on_read: Callable[[int], object] | None = None,
                     header_only: bool = False) -> str | None:
    """What is wrong with a checkpoint rank file by its content (what a build would refuse):
    its header, then (unless ``header_only``) its tensors' names and shapes and a NaN/Inf in
    any tensor, read one at a time; None if nothing."""
    from kiln.checkpoint import check_rank_header, read_checked, written_by
    from kiln.errors import KilnError
    from kiln.tensorio import read_header

    try:  # the repair named by its writer (retest 44c: a quantized one's had named both)
        infos, _ = read_header(path, f"write the checkpoint again with {written_by(config)}")
        if header_only:
            return None
        check_rank_header(path, config, rank, infos)  # names and shapes, as a build checks
        for name, info in infos.items():
            read_checked(name, info)
            if on_read is not None:
                on_read(info.nbytes)
    except KilnError as e:
        return str(e).removeprefix(f"{path}: ")
    return None


def _line(path: Path, rank: int, name: str, problem: str | None) -> str:
    if problem is not None:
        return f"FAIL rank {rank}  {name}  {problem}"
    return f"ok   rank {rank}  {name}  {size_text(path.stat().st_size, 'si')}"
