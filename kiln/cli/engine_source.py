"""``--engine_dir`` or ``--model_dir``: the engine a command runs (kiln run, bench, eval).

``--engine_dir`` names a built engine. ``--model_dir`` names a Hugging Face checkpoint (a
local dir or a hub id) that the build cache (:mod:`kiln.build_cache`) converts and builds
first, or finds built; every option that decides that engine passes through: the conversion's
(``--revision``, ``--dtype``, ``--tp_size``, ``--pp_size``, ``--allow_pickle``), every ``kiln
build`` option but its dirs and ``--overwrite`` (``--backend`` defaults to this machine's best),
and the cache's own (``--cache_dir``, ``--max_cache_size``).

Contract:
- Exactly one of the two. Neither or both is a usage error (one line, exit 2) saying what each
  does; so are options that decide a build given beside ``--engine_dir`` (its engine is built
  already), named rather than ignored. Checked while the command line is parsed
  (:class:`EngineSourceCommand`), so before torch is imported.
- :func:`held_engine` gives the command its engine dir, held (:func:`kiln.build_cache.
  hold_engine`) until the command ends: ``--overwrite`` refuses to replace it
  (:mod:`kiln.dir_locks`), and ``kiln cache prune`` and eviction skip one in the build cache
  (``--model_dir``'s, or an ``--engine_dir`` inside it).
- :func:`model_options` / :func:`engine_from_options`: the same options with ``--model_dir``
  required (``kiln cache build``).

Imports stay light (``kiln run --help`` loads no torch, onnx or onnxruntime).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from kiln.cli.build import build as build_command
from kiln.cli.context import CliContext, IntRange, MemorySize, PathArg
from kiln.config import DTYPES
from kiln.converters.options import ConvertOptions
from kiln.engine import BACKENDS
from kiln.errors import limits_as_options

# kiln build's options that the cache sets itself (its own dirs; dtype goes to the conversion)
_NOT_FROM_BUILD = ("checkpoint_dir", "output_dir", "overwrite", "dtype", "backend")
_CONVERT = ("revision", "dtype", "tp_size", "pp_size", "allow_pickle")
_CACHE = ("cache_dir", "max_cache_size")
# Every option that decides (or places) --model_dir's engine, --model_dir itself aside.
MODEL_ONLY = (*_CONVERT, "backend",
              *(p.name for p in build_command.params if p.name not in _NOT_FROM_BUILD), *_CACHE)
CACHE_DIR_HELP = ("Cache root [default: $KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else "
                  "~/.cache/kiln]; entries live in its engines/.")
_GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _model_params(model_dir_required: bool, exclude: tuple[str, ...] = (),
                  prefix: str = "") -> tuple[click.Option, list[click.Parameter]]:
    """(``--model_dir``, the options that decide its engine), in the order help shows them;
    ``prefix`` goes before each help text."""
    fields = {f.name: f for f in dataclasses.fields(ConvertOptions)}

    def convert(name: str) -> dict:
        return {"default": fields[name].default, "help": prefix + fields[name].metadata["help"]}

    model_dir = click.Option(["--model_dir"], required=model_dir_required,
                             help="HF checkpoint: a local directory or a hub id (org/name); "
                                  "converted and built through the build cache.")
    params: list[click.Parameter] = [
        click.Option(["--revision"], **convert("revision")),
        click.Option(["--dtype"], type=click.Choice(("auto", *DTYPES)), show_default=True,
                     **convert("dtype")),
        click.Option(["--tp_size"], type=IntRange(min=1), show_default=True,
                     **convert("tp_size")),
        click.Option(["--pp_size"], type=IntRange(min=1), show_default=True,
                     **convert("pp_size")),
        click.Option(["--allow-pickle", "--allow_pickle", "allow_pickle"], is_flag=True,
                     **convert("allow_pickle")),
        click.Option(["--backend"], type=click.Choice(BACKENDS),
                     help=f"{prefix}Engine backend [default: torch where torch sees a CUDA GPU, "
                          f"else onnx]."),
    ]
    for param in build_command.params:  # kiln build's own option objects: one definition
        if param.name not in _NOT_FROM_BUILD and param.name not in exclude:
            param = copy.copy(param)
            param.help = prefix + (param.help or "")
            params.append(param)
    params += [
        click.Option(["--cache_dir"], type=PathArg(file_okay=False, path_type=Path),
                     help=prefix + CACHE_DIR_HELP),
        click.Option(["--max_cache_size"], type=MemorySize(),
                     help=f"{prefix}After a build, evict least recently used entries until the "
                          f"cache holds at most this (20GB)."),
    ]
    return model_dir, params


def _add_params(func: Callable, first: list[click.Parameter],
                last: list[click.Parameter]) -> Callable:
    """Add ``first`` before and ``last`` after the options declared so far (click.command shows
    ``__click_params__`` in reverse order of declaration)."""
    declared = getattr(func, "__click_params__", [])
    func.__click_params__ = [*reversed(last), *declared, *reversed(first)]
    return func


def model_options(func: Callable) -> Callable:
    """``--model_dir`` (required) and what decides its engine (module docstring), for ``kiln
    cache build``. :func:`engine_from_options` takes them."""
    model_dir, params = _model_params(model_dir_required=True)
    return _add_params(func, [model_dir, *params], [])


def engine_command(name: str, engine_help: str, exclude: tuple[str, ...] = ()) -> Callable:
    """``click.command(name)`` with ``--engine_dir`` (``engine_help``) and ``--model_dir`` first,
    then the command's own options, then the ones that decide ``--model_dir``'s engine but
    ``exclude`` (those the command sets itself: :func:`held_engine`'s ``fixed``)."""

    def decorate(func: Callable) -> click.Command:
        engine_dir = click.Option(["--engine_dir"], type=PathArg(path_type=Path),
                                  help=engine_help)
        model_dir, params = _model_params(False, exclude, prefix="With --model_dir: ")
        _add_params(func, [engine_dir, model_dir], params)
        return click.command(name, cls=EngineSourceCommand)(func)

    return decorate


class EngineSourceCommand(click.Command):
    """A command run on ``--engine_dir`` or ``--model_dir``: checks the pair when its command
    line is parsed (module docstring)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        check_engine_source(ctx)
        return rest


def check_engine_source(ctx: click.Context) -> None:
    """Raise a :class:`click.UsageError` unless exactly one of --engine_dir and --model_dir is
    given, and no option that decides a build comes with --engine_dir."""
    engine_dir, model_dir = ctx.params.get("engine_dir"), ctx.params.get("model_dir")
    if engine_dir is None and model_dir is None:
        raise click.UsageError("give --engine_dir ENGINE_DIR (an engine built by kiln build) or "
                               "--model_dir HF_DIR|HUB_ID (a Hugging Face checkpoint, converted "
                               "and built through the build cache)", ctx)
    if engine_dir is not None and model_dir is not None:
        raise click.UsageError("give --engine_dir or --model_dir, not both: --engine_dir runs a "
                               "built engine, --model_dir builds one through the build cache",
                               ctx)
    if engine_dir is None:
        return
    given = [p.opts[-1] for p in ctx.command.params
             if p.name in MODEL_ONLY and ctx.get_parameter_source(p.name) in _GIVEN]
    if given:
        one = len(given) == 1
        names = given[0] if one else f"{', '.join(given[:-1])} and {given[-1]}"
        raise click.UsageError(f"{names} appl{'ies' if one else 'y'} to --model_dir only: "
                               f"{'it decides' if one else 'they decide'} the engine the build "
                               f"cache builds (or where it keeps it); --engine_dir's engine is "
                               f"built already: drop {'it' if one else 'them'}, or give "
                               f"--model_dir instead of --engine_dir", ctx)


@contextlib.contextmanager
def held_engine(obj: CliContext, options: dict[str, Any], executor: Any,
                check: Callable[[Any, Path], None] | None = None,
                **fixed: Any) -> Iterator[Path]:
    """The engine dir a command of :func:`engine_command` runs, held for the body: its
    ``--engine_dir``, or ``--model_dir``'s cached engine (built first if need be, with the
    options given and ``fixed``). Removes those options from ``options`` (the rest are the
    command's own). Before a build, the engine it would make is checked against this machine
    with ``executor`` (the command's ExecutorOptions), then with ``check`` (the command's own
    checks of its manifest, and of the checkpoint dir its tokenizer comes from), so a refusal
    comes before the build, not after it. A ``--model_dir`` engine's limits are the options
    given: inside, advice on them names those options (:func:`kiln.errors.limits_as_options`:
    ``pass a smaller --max_seq_len``, not ``rebuild with``)."""
    from kiln.build_cache.api import cached_engine, hold_engine
    from kiln.runtime.loader import check_runnable

    def check_all(manifest: Any, tokenizer_dir: Path) -> None:
        check_runnable(manifest, executor)
        if check is not None:
            check(manifest, tokenizer_dir)

    engine_dir = options.pop("engine_dir")
    model_dir, model = _engine_request(options)
    if engine_dir is not None:
        with hold_engine(engine_dir) as path:
            yield path
        return
    with limits_as_options(), cached_engine(model_dir, progress=obj.progress, check=check_all,
                                            **model, **fixed) as path:
        yield path  # its limits are the options given: advice names them as such


def engine_from_options(obj: CliContext, options: dict[str, Any]) -> Path:
    """Call :func:`kiln.build_cache.engine_for_model` with :func:`model_options`' values
    (removed from ``options``)."""
    from kiln.build_cache import engine_for_model

    model_dir, model = _engine_request(options)
    return engine_for_model(model_dir, progress=obj.progress, **model)


def _engine_request(options: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(model_dir, engine_for_model's keyword arguments), popped from ``options``."""
    from kiln.plugins import PLUGINS

    model_dir = options.pop("model_dir")
    given = {name: options.pop(name) for name in MODEL_ONLY if name in options}
    plugins = {name: given.pop(spec.option) for name, spec in PLUGINS.items()
               if spec.option in given}
    return model_dir, {**given, "plugins": plugins}
