"""PyTorch references of the quantized projections (the CPU path, and the oracle of the GPU
kernels in :mod:`kiln.plugins.quant_linear.triton_kernels`).

Contract, shared with the kernels (tested against each other on the GPU). Every function takes
activations ``x [M, K]`` (float16, bfloat16 or float32, rows contiguous), returns ``y [M, N]``
in x's dtype, accumulates in float32 (exact int32 for INT8 W8A8), adds ``bias [N]`` (x's
dtype) last, and is safe to capture in a CUDA graph (no host reads). Scales are float32 device
tensors; a scalar scale is a 0-dim or 1-element tensor. Weights use the engine layouts of
:mod:`kiln.plugins.quant_linear.layout`. A ``pre_quant_scale`` (smoothing) is not applied here:
the caller multiplies the input first, as the reference decoder does.

- ``fp8_linear(x, weight, weight_scale, input_scale, bias=None, out_dtype=None)``: FP8 W8A8
  (e4m3). ``weight`` float8_e4m3fn [N, K], ``weight_scale`` scalar or [N]. The input is quantized
  as ``q = fp8(clamp(x / s, -448, 448))`` (round to nearest even) with the static
  ``input_scale`` ``s``, or, when ``input_scale`` is None, per token (row) with
  ``s = amax(|x_row|) / 448`` (1 for an all-zero row; computed as amax times float32(1 / 448)).
  ``y = (q * s) @ (weight * weight_scale).T``. An ``x`` of dtype float8_e4m3fn is that ``q``
  already (quantized by the kernel before, under the static ``input_scale``: the norm's or the
  gated MLP's ``quant_scale``); ``y`` is then in ``out_dtype``.
- ``fp8_takes_quantized(m, n, k, weight_scale, input_scale, dtype)``: whether ``fp8_linear`` on
  ``m`` rows of ``dtype`` would quantize them in a pass of their own, which the kernel before it
  can do instead (a static ``input_scale``, and ``m`` above ``FP8_TRITON_MAX_M``: fewer rows go
  to kernels that quantize as they read).
- ``int8_w8a8_linear(x, weight, weight_scale, input_scale, bias=None)``: INT8 SmoothQuant.
  ``weight`` int8 [N, K], ``weight_scale`` [N]; ``q = clamp(round_half_even(x / s), -128, 127)``
  with the static scalar ``input_scale`` (None: per token, ``amax / 127``);
  ``y = (q @ weight.T)`` in int32, times ``s * weight_scale[n]``.
- ``int8_weight_only_linear(x, weight, weight_scale, bias=None)``: W8A16.
  ``y = x @ (weight * weight_scale[:, None]).T``.
- ``int4_weight_only_linear(x, weight, weight_scale, group_size, bias=None)``: W4A16.
  ``weight`` uint8 [N, K/2] in the split-group layout or int32 [N/16, K/64, 32, 4] in the MMA
  fragment layout (:mod:`kiln.plugins.quant_linear.layout`), ``weight_scale``
  [N, K / group_size];
  ``y = x @ (values * scale of the value's group).T``.

Each takes a keyword ``epilogue`` (:mod:`kiln.plugins.gemv.epilogue`: silu * up, or rotary
into the KV cache) and then returns the epilogue's result on ``y`` instead of ``y``; the
kernels fuse it into their one-row GEMVs, the references apply it after.

The one-token GEMVs quantize with ``x * (1 / s)`` (one float32 reciprocal per call) instead
of ``x / s``: within an ulp of the quotient, so an element rounds one step the other way only
where ``x / s`` lies within an ulp of a rounding tie (measured on an H200: 28 elements in 120
Llama-8B-shaped FP8 calls). Their tests hold them to this rule.

Numerics match :class:`kiln.reference.ReferenceDecoder` up to where each rounds to the model
dtype (the reference dequantizes weights and fake-quantizes activations into the model dtype
and multiplies there; here products accumulate in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.plugins.gemv.epilogue import Epilogue
from kiln.plugins.quant_linear import FP8_TRITON_MAX_M
from kiln.plugins.quant_linear.layout import unpack_engine_int4

FP8_MAX = 448.0
INT8_MAX = 127.0


def _per_token_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """amax / qmax, as amax times the float32 reciprocal of qmax: what torch's division by a
    Python scalar computes on a GPU, and what the kernels compute (one definition on every
    device; a one-ulp difference in a scale flips roundings)."""
    amax = x.float().abs().amax(dim=1, keepdim=True)
    inv = torch.tensor(1.0 / qmax, dtype=torch.float32)
    return torch.where(amax > 0, amax * inv.to(amax.device), torch.ones_like(amax))


def quantize_fp8_input(x: torch.Tensor, input_scale: torch.Tensor | None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [M, K], scale [] or [M, 1] float32) of the activations."""
    s = _per_token_scale(x, FP8_MAX) if input_scale is None else input_scale.float().reshape(())
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def quantize_int8_input(x: torch.Tensor, input_scale: torch.Tensor | None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [M, K], scale [] or [M, 1] float32) of the activations."""
    s = _per_token_scale(x, INT8_MAX) if input_scale is None else input_scale.float().reshape(())
    return torch.round(x.float() / s).clamp(-128, INT8_MAX).to(torch.int8), s


def _finish(acc: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
            epilogue: Epilogue | None = None) -> torch.Tensor:
    if bias is not None:
        acc = acc + bias.float()
    y = acc.to(dtype)
    return y if epilogue is None else epilogue.apply(y)


def fp8_takes_quantized(m: int, n: int, k: int, weight_scale: torch.Tensor,
                        input_scale: torch.Tensor | None, dtype: torch.dtype) -> bool:
    return input_scale is not None and m > FP8_TRITON_MAX_M


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None, *,
               epilogue: Epilogue | None = None) -> torch.Tensor:
    if x.dtype == torch.float8_e4m3fn:
        q, s, dtype = x, _static_scale(input_scale, out_dtype), out_dtype
    else:
        (q, s), dtype = quantize_fp8_input(x, input_scale), x.dtype
    ws = weight_scale.float()
    w = weight.float() * (ws.reshape(-1, 1) if ws.numel() > 1 else ws.reshape(()))
    return _finish(F.linear(q.float() * s, w), bias, dtype, epilogue)


def _static_scale(input_scale: torch.Tensor | None, out_dtype: torch.dtype | None) -> torch.Tensor:
    """The scale of an input quantized already (fp8_linear's contract)."""
    if input_scale is None or out_dtype is None:
        raise ValueError("fp8_linear: an FP8 x was quantized with the static input_scale, and "
                         "needs it and out_dtype")
    return input_scale.float().reshape(())


def int8_w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     input_scale: torch.Tensor | None, bias: torch.Tensor | None = None, *,
                     epilogue: Epilogue | None = None) -> torch.Tensor:
    q, s = quantize_int8_input(x, input_scale)
    # int32-exact: |products| < 2^14 and K < 2^10 terms per float64 mantissa bit is far inside
    acc = (q.double() @ weight.double().T).float()
    return _finish(acc * s * weight_scale.float()[None, :], bias, x.dtype, epilogue)


def int8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, *,
                            epilogue: Epilogue | None = None) -> torch.Tensor:
    w = weight.float() * weight_scale.float()[:, None]
    return _finish(F.linear(x.float(), w), bias, x.dtype, epilogue)


def int4_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            group_size: int, bias: torch.Tensor | None = None, *,
                            epilogue: Epilogue | None = None) -> torch.Tensor:
    values = unpack_engine_int4(weight, group_size).float()  # either engine layout
    n, k = values.shape
    w = (values.view(n, k // group_size, group_size) * weight_scale.float()[:, :, None]).view(n, k)
    return _finish(F.linear(x.float(), w), bias, x.dtype, epilogue)
