"""``kiln quantize``: parse and validate the options, then call :func:`kiln.quantize`.

Options, defaults and help come from :class:`kiln.quantization.options.QuantizeOptions` (the API
takes the same keywords). Imports here stay torch-free, so help and usage errors come back at
once; the quantizer is imported in the command body.
"""

from __future__ import annotations

import dataclasses

import click

from kiln.cli.context import CliContext, FloatRange, IntRange, PathArg
from kiln.quantization.config import FORMATS, GROUP_SIZES, KV_CACHE_DTYPES
from kiln.quantization.options import DEVICES, WEIGHT_SCALES, QuantizeOptions

_FIELDS = {f.name: f for f in dataclasses.fields(QuantizeOptions)}


def _kw(name: str, **extra) -> dict:
    field = _FIELDS[name]
    default = {} if field.default in (None, "") or isinstance(field.default, bool) else \
        {"default": field.default, "show_default": True}
    return {**default, "help": field.metadata["help"], **extra}


@click.command("quantize")
@click.option("--checkpoint_dir", required=True, type=PathArg(file_okay=False),
              help="The kiln checkpoint to quantize (any tp/pp; not already quantized).")
@click.option("--output_dir", required=True, type=PathArg(file_okay=False),
              help="Where to write the quantized kiln checkpoint (same tp/pp mapping).")
@click.option("--qformat", required=True, **_kw("qformat", type=click.Choice(tuple(FORMATS))))
@click.option("--kv_cache_dtype", **_kw("kv_cache_dtype", type=click.Choice(KV_CACHE_DTYPES)))
@click.option("--calib_dataset", **_kw("calib_dataset"))
@click.option("--calib_size", **_kw("calib_size", type=IntRange(min=1)))
@click.option("--calib_max_seq_length", **_kw("calib_max_seq_length", type=IntRange(min=2)))
@click.option("--smoothquant_alpha", **_kw("smoothquant_alpha",
                                           type=FloatRange(0.0, 1.0)))
# any integer: kiln.quantize refuses one the kernels do not take naming those that fit the model
@click.option("--group_size", **_kw("group_size", type=int,
                                    metavar=f"[{'|'.join(map(str, GROUP_SIZES))}]"))
@click.option("--weight_scales", **_kw("weight_scales", type=click.Choice(WEIGHT_SCALES)))
@click.option("--eval_dataset", **_kw("eval_dataset"))
@click.option("--max_ppl_ratio", **_kw("max_ppl_ratio", type=FloatRange(min=1.0)))
@click.option("--quantize_lm_head", is_flag=True, **_kw("quantize_lm_head"))
@click.option("--no_accuracy_gate", is_flag=True, **_kw("no_accuracy_gate"))
@click.option("--device", **_kw("device", type=click.Choice(DEVICES)))
@click.option("--overwrite", is_flag=True, **_kw("overwrite"))
@click.pass_obj
def quantize(obj: CliContext, **options) -> None:
    """Quantize a kiln checkpoint (fp8, int8_sq, int8_wo, int4_wo, int4_awq), with calibration
    and an accuracy gate."""
    import kiln

    out = kiln.quantize(**options, progress=obj.progress)
    if obj.verbosity >= 0:  # the result that matters, as kiln build's summary line
        click.echo(_summary(out), err=True)
    click.echo(str(out))


def _summary(out) -> str:
    from kiln.checkpoint import load_config
    from kiln.quantization.accuracy import summary

    quant = load_config(out).quantization
    accuracy = quant.accuracy
    return (f"quantized {out} ({quant.qformat}): "
            + (f"accuracy {summary(accuracy)}" if accuracy else "accuracy not measured"))
