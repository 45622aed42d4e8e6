"""PyTorch reference of the Triton single-row projection (GEMV) used by batch-1 decode steps.

Contract, shared with :mod:`kiln.plugins.gemv.triton_kernels`:
``gemv(x, weight, bias=None, *, silu_input=False) -> y``

- ``x`` [1, K] (``[1, 2K]`` with ``silu_input``), ``weight`` [N, K] row-major (the packed
  ``[out, in]`` layout), ``bias`` [N] or None; ``y`` [1, N] in ``out_dtype`` (default x's
  dtype), accumulated in float32: ``out_dtype=torch.float32`` keeps the sum unrounded (a
  tensor-parallel partial sum, rounded once after the all-reduce).
- ``silu_input``: x holds a fused ``[gate | up]`` row and the product's input is
  ``silu(gate) * up`` rounded to the dtype (the gated MLP's activation, then its down
  projection, in one kernel).
- ``epilogue`` (:mod:`kiln.plugins.gemv.epilogue`): the result of that op on ``y`` is returned
  instead of ``y`` (the kernel fuses it into its store where it fits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.plugins.gated_mlp.triton_reference import silu_and_mul
from kiln.plugins.gemv.epilogue import Epilogue


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         silu_input: bool = False, epilogue: Epilogue | None = None,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if silu_input:
        x = silu_and_mul(x)
    if out_dtype is not None and out_dtype != x.dtype:
        y = wide_linear(x, weight, bias, out_dtype)
    else:
        y = F.linear(x, weight, bias)
    return y if epilogue is None else epilogue.apply(y)


def wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ weight.T + bias`` of 16-bit operands as ``out_dtype`` (float32), unrounded: on
    CUDA cuBLAS's float32 output of its float32 accumulator, elsewhere (no such kernel) in
    float32 from the start."""
    if x.is_cuda:
        y = torch.mm(x, weight.t(), out_dtype=out_dtype)
        return y if bias is None else y.add_(bias)
    return F.linear(x.to(out_dtype), weight.to(out_dtype),
                    None if bias is None else bias.to(out_dtype))
