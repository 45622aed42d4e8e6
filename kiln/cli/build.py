"""``kiln build``: parse and validate the options, then call :func:`kiln.builder.build`.

Options and their help come from :class:`kiln.builder.options.BuildOptions`; one
``--<name>_plugin auto|enable|disable`` option per registered plugin. Imports here stay light
(options, plugin specs, backend names: no ONNX, torch or ONNX Runtime), so help and usage errors
come back at once; the builder is imported in the command body.
"""

from __future__ import annotations

import dataclasses
import re

import click

from kiln.builder.options import MIN_SEQ_LEN, BuildOptions
from kiln.cli.context import CliContext, IntRange, MemorySize, PathArg
from kiln.config import DTYPES
from kiln.engine import BACKENDS
from kiln.plugins import PLUGINS, PluginMode

# Help texts and defaults come from BuildOptions, the one definition (the API takes the same).
_FIELDS = {f.name: f for f in dataclasses.fields(BuildOptions)}
_HELP = {name: f.metadata.get("help", "") for name, f in _FIELDS.items()}
_DEFAULT = {name: f.default for name, f in _FIELDS.items()}
_TARGET = re.compile(r"^(sm\d{2,3}|cpu|cuda)$")


def _targets(ctx, param, value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    targets = tuple(t.strip().lower() for t in value.split(",") if t.strip())
    bad = [t for t in targets if not _TARGET.match(t)]
    if bad or not targets:
        raise click.BadParameter(f"{value!r}: expected compute capabilities like sm86,sm120 "
                                 f"(tensorrt) or cpu/cuda (onnx)", ctx=ctx, param=param)
    return targets


def _plugin_options(command):
    modes = [m.value for m in PluginMode]
    for spec in sorted(PLUGINS.values(), key=lambda s: s.name, reverse=True):
        command = click.option(f"--{spec.option}", default="auto", show_default=True,
                               type=click.Choice(modes),
                               help=f"{spec.summary} enable: fused form, disable: "
                                    f"{spec.decomposed_form}.")(command)
    return command


@click.command("build")
@click.option("--checkpoint_dir", required=True, type=PathArg(file_okay=False),
              help=_HELP["checkpoint_dir"])
@click.option("--output_dir", required=True, type=PathArg(file_okay=False),
              help=_HELP["output_dir"])
@click.option("--backend", default=_DEFAULT["backend"], show_default=True,
              type=click.Choice(BACKENDS), help=_HELP["backend"])
@click.option("--max_batch_size", default=_DEFAULT["max_batch_size"], show_default=True,
              type=IntRange(min=1),
              help=_HELP["max_batch_size"])
@click.option("--max_input_len", type=IntRange(min=1), help=_HELP["max_input_len"])
@click.option("--max_seq_len", type=IntRange(min=MIN_SEQ_LEN), help=_HELP["max_seq_len"])
@click.option("--max_num_tokens", type=IntRange(min=1), help=_HELP["max_num_tokens"])
@click.option("--dtype", type=click.Choice(DTYPES), help=_HELP["dtype"])
@click.option("--target", "targets", callback=_targets, help=_HELP["targets"])
@_plugin_options
@click.option("--max_build_memory", type=MemorySize(as_typed=True),
              help=_HELP["max_build_memory"])
@click.option("--workers", default=_DEFAULT["workers"], show_default=True,
              type=IntRange(min=1),
              help=_HELP["workers"])
@click.option("--overwrite", is_flag=True, help=_HELP["overwrite"])
@click.option("--allow_long_context", is_flag=True, help=_HELP["allow_long_context"])
@click.option("--gather_context_logits", is_flag=True, help=_HELP["gather_context_logits"])
@click.option("--weight_only_int8_compute", is_flag=True,
              help=_HELP["weight_only_int8_compute"])
@click.pass_obj
def build(obj: CliContext, **options) -> None:
    """Build an engine dir from a kiln checkpoint."""
    from kiln.builder import build as api_build

    plugins = {name: options.pop(spec.option) for name, spec in PLUGINS.items()}
    result = api_build(**options, plugins=plugins, progress=obj.progress)
    if obj.verbosity >= 0:
        click.echo(result.summary(), err=True)
    click.echo(str(result.output_dir))
