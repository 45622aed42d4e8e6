"""Triton single-row projection (GEMV) for batch-1 decode, optionally fed by silu(gate) * up.

Same contract as :mod:`kiln.plugins.gemv.triton_reference`. At one row a projection is a pure
weight stream; cuBLAS reaches ~3.1 TB/s on the 4096-wide ones of an 8B model on an H200 and
splits K (plus a reduce kernel) for the MLP's down projection. Here each program owns
``BLOCK_N`` output rows and streams them in ``BLOCK_K`` pieces (software-pipelined loads),
accumulating ``[BLOCK_N, BLOCK_K]`` partial products in float32 and reducing once at the end.
With ``SILU`` the input row is computed on the fly from the gate/up projection, which removes
the separate activation kernel from the step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.plugins.gemv.epilogue import Epilogue
from kiln.plugins.gemv.triton_epilogue import (
    early_tiles,
    gemv_output,
    output_rows,
    row_tile,
    store_rows,
)
from kiln.plugins.pdl import enabled as pdl_enabled
from kiln.plugins.pdl.triton_kernels import prologue


@triton.jit
def _tile(acc, w, x_ptr, k0, k, SILU: tl.constexpr, DTYPE: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """``acc`` plus one tile's products: weights ``w`` [BLOCK_N, BLOCK_K] by x's columns from
    ``k0`` (with ``SILU``, silu(gate) * up of x's halves, rounded to ``DTYPE`` as the separate
    kernel stores it)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < k
    if SILU:
        gate = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + k + cols, mask=col_ok, other=0.0).to(tl.float32)
        x = (gate / (1.0 + tl.exp(-gate)) * up).to(DTYPE).to(tl.float32)
    else:
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return acc + w.to(tl.float32) * x[None, :]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, n, k, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                 EPILOGUE: tl.constexpr = 0, PAIR_HALF=0, table_ptr=None, table_stride=0,
                 index_ptr=None, slot_ptr=None, k_cache_ptr=None, v_cache_ptr=None,
                 c_stride_b=0, c_stride_h=0, c_stride_r=0, clip=0.0, k_scale_ptr=None,
                 v_scale_ptr=None, NUM_HEADS: tl.constexpr = 0, NUM_KV_HEADS: tl.constexpr = 0,
                 HEAD_DIM: tl.constexpr = 0, PAGE: tl.constexpr = 0,
                 ROTARY: tl.constexpr = False, CLIP: tl.constexpr = False,
                 QUANT: tl.constexpr = False, EARLY: tl.constexpr = 0):
    rows = output_rows(tl.program_id(0), BLOCK_N, EPILOGUE, PAIR_HALF)
    row_ok = rows < n
    w_rows = w_ptr + rows[:, None].to(tl.int64) * k
    if EARLY >= 1:  # tiles loaded before the PDL wait (row_tile)
        w_first = row_tile(w_rows, row_ok, 0, k, BLOCK_K)
    if EARLY >= 2:
        w_second = row_tile(w_rows, row_ok, BLOCK_K, k, BLOCK_K)
    prologue(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if EARLY >= 1:
        acc = _tile(acc, w_first, x_ptr, 0, k, SILU, x_ptr.dtype.element_ty, BLOCK_K)
    if EARLY >= 2:
        acc = _tile(acc, w_second, x_ptr, BLOCK_K, k, SILU, x_ptr.dtype.element_ty, BLOCK_K)
    for k0 in range(EARLY * BLOCK_K, k, BLOCK_K):
        acc = _tile(acc, row_tile(w_rows, row_ok, k0, k, BLOCK_K), x_ptr, k0, k, SILU,
                    x_ptr.dtype.element_ty, BLOCK_K)
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    store_rows(y, rows, row_ok, y_ptr, BLOCK_N, EPILOGUE, PAIR_HALF, table_ptr, table_stride,
               index_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, c_stride_b, c_stride_h, c_stride_r,
               clip, k_scale_ptr, v_scale_ptr, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE, ROTARY,
               CLIP, QUANT)


def gemv_config(n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, early tiles), from a sweep on an H200
    (GPU_NOTES.md); early tiles (0-2, a config may leave them out) are loaded before the PDL
    wait: one on ``o`` and ``down``, as the 8-bit GEMVs (``w8_gemv_config``)."""
    if n >= 16384:
        return 16, 256, 4, 4, 0
    if k >= 8192 or n <= 4096:
        return 4, 1024, 4, 3, 1
    return 8, 512, 4, 3, 0


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         silu_input: bool = False, config: tuple[int, ...] | None = None,
         epilogue: Epilogue | None = None, out_dtype: torch.dtype | None = None,
         ) -> torch.Tensor:
    """``config``: (BLOCK_N, BLOCK_K, num_warps, num_stages[, early tiles]), default
    :func:`gemv_config`; ``epilogue``: fused into the store where it fits
    (:mod:`.triton_epilogue`), else applied after; ``out_dtype``: the result's dtype (default
    x's; float32 stores the accumulator unrounded), not with an epilogue."""
    n, k = weight.shape
    if x.shape[0] != 1 or x.shape[1] != (2 * k if silu_input else k) or x.stride(-1) != 1 \
            or not weight.is_contiguous():
        raise ValueError(f"gemv: need x [1, {2 * k if silu_input else k}] with contiguous rows "
                         f"and a contiguous [N, K] weight; found x {tuple(x.shape)}")
    block_n, block_k, warps, stages, *early = config or gemv_config(n, k)
    y, epilogue_args, finish = gemv_output(epilogue, n, block_n, x, out_dtype)
    pdl = pdl_enabled(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, n, k, SILU=silu_input,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
        EARLY=early_tiles("gemv", early, pdl), num_warps=warps, num_stages=stages,
        launch_pdl=pdl, **epilogue_args)
    return finish(y)
