"""PyTorch reference of the Triton fused residual-add + norm kernel.

The norm itself is the norm plugin's reference (:func:`kiln.plugins.norm.reference.norm`).

Contract, shared with :mod:`kiln.plugins.norm.triton_kernels`:

``add_norm(x, residual, weight, bias, eps, *, rms, out=None) -> (normed, residual)``

- ``x`` [T, H] (rows may be strided). ``residual`` [T, H] contiguous, or None.
- With a residual: ``residual += x`` in place (rounded to the residual's dtype, as the
  unfused model does), and the norm is taken of the updated residual. Without one, the norm
  is taken of ``x`` and ``x`` is returned as the residual (no copy).
- ``rms``: RMSNorm ``(r * rsqrt(mean(r^2) + eps))`` rounded to the dtype, times ``weight``
  (HF Llama's order of roundings); else LayerNorm ``(r - mean) * rsqrt(var + eps) * weight +
  bias`` (``bias`` may be None). Statistics in float32.
- ``out``: where ``normed`` goes (may alias ``x`` when there is no residual: in-place norms of a
  strided slice, as q/k norms use); a new tensor when None.
- ``quant_scale`` (a static FP8 input scale, a float32 scalar tensor): ``normed`` is the FP8
  projection's input quantized already, float8_e4m3fn: the normed row in the model dtype
  (as above), then ``fp8(clamp(row / quant_scale, -448, 448))``, round to nearest even
  (:func:`kiln.plugins.quant_linear.triton_reference.quantize_fp8_input`). ``out`` must be None.
- ``residual_early``: a promise that the kernel just before this one on the stream does not
  write the residual (a decoder's residual stream: the norm two or more kernels back writes
  it), so that a kernel launched with programmatic dependent launch may read it before
  waiting for that kernel (:mod:`kiln.plugins.norm.triton_kernels`). No effect on the result.
"""

from __future__ import annotations

import torch

from kiln.config import NormType
from kiln.plugins.norm.reference import norm
from kiln.plugins.quant_linear.triton_reference import quantize_fp8_input


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             bias: torch.Tensor | None, eps: float, *, rms: bool,
             out: torch.Tensor | None = None, quant_scale: torch.Tensor | None = None,
             residual_early: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    del residual_early  # a scheduling promise (the contract above); nothing to schedule here
    if quant_scale is not None and out is not None:
        raise ValueError("add_norm: quant_scale makes a new FP8 output; out must be None")
    if residual is not None:
        residual.add_(x)
        r = residual
    else:
        r = x
    normed = norm(r, weight, bias, NormType.RMSNORM if rms else NormType.LAYERNORM, eps)
    if quant_scale is not None:
        return quantize_fp8_input(normed, quant_scale)[0], r
    if out is None:
        return normed, r
    out.copy_(normed)
    return out, r
