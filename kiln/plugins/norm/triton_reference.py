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
"""

from __future__ import annotations

import torch

from kiln.config import NormType
from kiln.plugins.norm.reference import norm


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             bias: torch.Tensor | None, eps: float, *, rms: bool,
             out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        residual.add_(x)
        r = residual
    else:
        r = x
    normed = norm(r, weight, bias, NormType.RMSNORM if rms else NormType.LAYERNORM, eps)
    if out is None:
        return normed, r
    out.copy_(normed)
    return out, r
