"""The numerics of each qformat: quantize a weight, dequantize it, fake-quantize activations.

These functions are the definition every backend's form is checked against (through the
reference decoder, kiln/reference.py). All math is float32; stored scales are float32.

Weights keep ``torch.nn.Linear``'s ``[out, in]`` layout:

- ``int8`` (int8_wo, int8_sq): ``q = clamp(round(w / s), -128, 127)`` with ``s = amax / 127`` per
  output channel (``weight_scale`` [out]).
- ``int4`` (int4_wo, int4_awq): groups of ``group_size`` consecutive input features of one output
  channel, one scale per group (``weight_scale`` [out, in / group_size]),
  ``q = clamp(round(w / s), -8, 7)``, symmetric (no zero point), with ``s = e / -8`` where ``e``
  is the group's weight of largest magnitude (llama.cpp's Q4_0 and ONNX Runtime's symmetric
  MLAS rule): that weight is exact at -8 and the step is amax / 8. So an int4 scale is
  negative when the group's extreme is positive. On SmolLM2 (group 64) this gives perplexity
  ratio 1.25 against 1.48 for ``amax / 7`` and 1.40 for a least-squares scale that clips the
  extreme: the largest weights matter more than the mean squared error says. Stored packed two
  per byte as uint8 ``[out, in / 2]``: input feature ``2j`` in the low nibble, ``2j + 1`` in the
  high nibble, each a 4-bit two's complement value (ONNX's INT4 packing order along the input
  dim).
- ``float8_e4m3fn`` (fp8): ``q = fp8(w / s)`` with ``s = amax / 448``, per tensor (``weight_scale``
  a scalar) or per output channel.

Activations (W8A8): ``x -> dq(q(x / input_scale))`` with a static per-tensor ``input_scale``
(``amax / 448`` for fp8, ``amax / 127`` for int8), saturating and rounding half to even, as ONNX
QuantizeLinear does. A ``pre_quant_scale`` [in] (smoothing that could not be folded into a
norm) multiplies the input first. Dequantization is ``q * s``, broadcast per granularity.
"""

from __future__ import annotations

import torch

from kiln.quantization.config import Granularity, QuantConfig

QMAX = {"int8": 127.0, "int4": 7.0, "float8_e4m3fn": 448.0}
QMIN = {"int8": -128.0, "int4": -8.0, "float8_e4m3fn": -448.0}
KV_DTYPES = {"fp8": "float8_e4m3fn", "int8": "int8"}


def scale_from_amax(amax: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 scale mapping ``amax`` onto the dtype's largest value (1 where amax is 0)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / QMAX[dtype], torch.ones_like(amax))


def quantize_values(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x / scale`` rounded (half to even) and saturated into ``dtype``; int4 as int8 values."""
    y = (x.float() / scale).clamp(QMIN[dtype], QMAX[dtype])
    if dtype == "float8_e4m3fn":
        return y.to(torch.float8_e4m3fn)
    return torch.round(y).to(torch.int8)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """``dq(q(x))`` in x's dtype: what a Q/DQ pair does to an activation or a cache entry."""
    return (quantize_values(x, scale, dtype).float() * scale).to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim even -> uint8 with half the last dim (low nibble first)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dim, found {tuple(q.shape)}")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 values in [-8, 7], last dim doubled. Each byte read
    as int8 and its nibbles sign-extended by arithmetic shifts (6x the masks and ``where`` on
    two CPU cores: the CPU references unpack every INT4 weight at every step)."""
    b = packed.view(torch.int8)
    return torch.stack([(b << 4) >> 4, b >> 4], dim=-1).flatten(-2)


def weight_amax(w: torch.Tensor, granularity: Granularity, group_size: int | None) -> torch.Tensor:
    """|w| maxima at the granularity: scalar, [out], or [out, in / group_size]."""
    w = w.float().abs()
    if granularity is Granularity.PER_TENSOR:
        return w.amax()
    if granularity is Granularity.PER_CHANNEL:
        return w.amax(dim=1)
    out, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input dim {k}")
    return w.view(out, k // group_size, group_size).amax(dim=2)


def _expand(scale: torch.Tensor, shape: torch.Size, granularity: Granularity,
            group_size: int | None) -> torch.Tensor:
    """A scale broadcast to the weight's [out, in] shape."""
    if granularity is Granularity.PER_TENSOR:
        return scale
    if granularity is Granularity.PER_CHANNEL:
        return scale[:, None]
    return scale.repeat_interleave(group_size, dim=1)


def int4_group_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group int4 scales [out, in / group_size]: the group's extreme weight / -8 (module
    docstring); 1 for an all-zero group."""
    out, k = w.shape
    groups = w.float().view(out, k // group_size, group_size)
    extreme = groups.gather(2, groups.abs().argmax(dim=2, keepdim=True)).squeeze(2)
    return torch.where(extreme != 0, extreme / -8, torch.ones_like(extreme))


def quantize_weight(w: torch.Tensor, quant: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored weight, weight_scale) of a float weight [out, in] in the checkpoint's layout."""
    dtype, granularity = quant.info.weight_dtype, quant.weight_scales
    if dtype == "int4":
        if w.shape[1] % quant.group_size:
            raise ValueError(f"group_size {quant.group_size} does not divide the input dim "
                             f"{w.shape[1]}")
        scale = int4_group_scales(w, quant.group_size)
    else:
        scale = scale_from_amax(weight_amax(w, granularity, quant.group_size), dtype)
    q = quantize_values(w, _expand(scale, w.shape, granularity, quant.group_size), dtype)
    return (pack_int4(q) if dtype == "int4" else q), scale


def dequantize_weight(stored: torch.Tensor, scale: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
    """float32 [out, in] from a stored weight and its scale (the reference dequantization)."""
    values = unpack_int4(stored) if quant.info.weight_dtype == "int4" else stored
    values = values.float()
    return values * _expand(scale.float(), values.shape, quant.weight_scales, quant.group_size)


def fake_quant_weight(w: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
    """``dequantize(quantize(w))`` in float32 (what calibration searches compare against)."""
    return dequantize_weight(*quantize_weight(w, quant), quant)
