"""Triton fused residual-add + RMSNorm / LayerNorm: one read of x and the residual, one write each.

Same contract as :mod:`kiln.plugins.norm.triton_reference`. One program per row; rows up
to ``MAX_FUSED`` elements are held in registers (one pass), longer rows take two passes
(statistics, then normalize), which stays correct when ``out`` aliases ``x``. With
``quant_scale`` the normed row is stored as FP8 (the FP8 projection's quantization of its
input, by the same rule: :func:`kiln.plugins.quant_linear.triton_kernels._quantize`), so that no
separate pass reads it back to quantize it. The row's statistics are the same sums, but the
compiler may add them in another order when the store is FP8 (seen on an H200 in rows of
14336 and more; tests/plugins/test_norm_triton.py bounds it), so a value can land one FP8 step
from what the projection's pass makes of the 16-bit output: a rounding of an equally exact
norm.

Under programmatic dependent launch the one-pass kernel loads what does not depend on the
kernel before it ahead of its wait: the norm's weight and bias always, and the residual where
the caller says it may (``residual_early``). At batch-1 decode the norm runs between two
GEMVs and its loads would otherwise miss L2 behind theirs (the weight stream evicts the
residual and the norm's weight between two layers): on an H200 an FP8 8B token went from
2,445-2,449 to 2,429 us with the weight early and to 2,417 with the residual too
(benchmarks/GPU_NOTES.md, "Issue 12, seventeenth pass").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.plugins.pdl import enabled as pdl_enabled
from kiln.plugins.pdl.triton_kernels import prologue
from kiln.plugins.quant_linear.triton_kernels import _quantize

MAX_FUSED = 16384


@triton.jit
def _residual_sum(x_ptr, x_stride, res_ptr, res_stride, row, offs, mask,
                  HAS_RES: tl.constexpr):
    """One block of a row in float32: x, or x + residual (stored back into the residual)."""
    res = None
    if HAS_RES:
        res = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0)
    return _residual_add(x_ptr, x_stride, res, res_ptr, res_stride, row, offs, mask, HAS_RES)


@triton.jit
def _residual_add(x_ptr, x_stride, res, res_ptr, res_stride, row, offs, mask,
                  HAS_RES: tl.constexpr):
    """:func:`_residual_sum` of the residual's block ``res``, loaded already."""
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = (res + x).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * res_stride + offs, r, mask=mask)
        xf = r.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    return xf


@triton.jit
def _store(out_ptr, y, s_ptr, mask, QUANT: tl.constexpr, DTYPE: tl.constexpr):
    """The normed block: in the model dtype, or (QUANT) rounded to it and quantized to FP8 with
    the static scale ``*s_ptr``, as the projection's own pass would quantize that row."""
    if QUANT:
        s = tl.load(s_ptr)
        q = _quantize(y.to(DTYPE).to(tl.float32), s, s, 1, True)
        tl.store(out_ptr, q.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, b_ptr, out_ptr, out_stride,
                     s_ptr, n_cols, eps, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                     RMS: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
                     DTYPE: tl.constexpr, PDL: tl.constexpr = False,
                     EARLY_RES: tl.constexpr = False):
    """The norm's weight and bias are loaded before the PDL wait (they do not depend on the
    kernel before), and with ``EARLY_RES`` the residual too, past L1 (``add_norm``'s
    ``residual_early``); after the wait, only x."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    res = None
    if HAS_RES and EARLY_RES:
        res = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0,
                      cache_modifier=".cg")
    prologue(PDL)
    if HAS_RES and not EARLY_RES:
        res = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0)
    xf = _residual_add(x_ptr, x_stride, res, res_ptr, res_stride, row, offs, mask, HAS_RES)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
        y = (xf * rstd).to(DTYPE).to(tl.float32) * w.to(tl.float32)
    else:
        mean = tl.sum(xf, 0) / n_cols
        diff = tl.where(mask, xf - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 0) / n_cols + eps)
        y = diff * rstd * w.to(tl.float32)
        if HAS_BIAS:
            y += b.to(tl.float32)
    _store(out_ptr + row * out_stride + offs, y, s_ptr, mask, QUANT, DTYPE)


@triton.jit
def _add_norm_long_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, b_ptr, out_ptr,
                          out_stride, s_ptr, n_cols, eps, HAS_RES: tl.constexpr,
                          HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr,
                          QUANT: tl.constexpr, DTYPE: tl.constexpr, PDL: tl.constexpr = False):
    prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], tl.float32)
    squares = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < n_cols
        xf = _residual_sum(x_ptr, x_stride, res_ptr, res_stride, row, offs, mask, HAS_RES)
        total += xf
        squares += xf * xf
    mean = tl.sum(total, 0) / n_cols
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(squares, 0) / n_cols + eps)
    else:
        rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(squares, 0) / n_cols - mean * mean, 0.0) + eps)
    src_ptr = res_ptr if HAS_RES else x_ptr
    src_stride = res_stride if HAS_RES else x_stride
    for c0 in range(0, n_cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < n_cols
        xf = tl.load(src_ptr + row * src_stride + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            y = (xf * rstd).to(DTYPE).to(tl.float32) * w
        else:
            y = (xf - mean) * rstd * w
            if HAS_BIAS:
                y += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _store(out_ptr + row * out_stride + offs, y, s_ptr, mask, QUANT, DTYPE)


# Triton's dtype of each torch float dtype (a constexpr argument where no pointer carries it)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             bias: torch.Tensor | None, eps: float, *, rms: bool,
             out: torch.Tensor | None = None, quant_scale: torch.Tensor | None = None,
             residual_early: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    t, h = x.shape
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("add_norm (triton): rows must be contiguous (last stride 1)")
    if quant_scale is not None and out is not None:
        raise ValueError("add_norm: quant_scale makes a new FP8 output; out must be None")
    dtype = torch.float8_e4m3fn if quant_scale is not None else x.dtype
    out = torch.empty((t, h), dtype=dtype, device=x.device) if out is None else out
    r = residual if residual is not None else x
    if t == 0:
        return out, r
    block = triton.next_power_of_2(h)
    kernel = _add_norm_kernel
    if block > MAX_FUSED:
        kernel, block = _add_norm_long_kernel, 4096
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    pdl = pdl_enabled(x.device)
    extra = dict(EARLY_RES=residual_early) if kernel is _add_norm_kernel else {}
    kernel[(t,)](x, x.stride(0), r, r.stride(0), weight, bias if bias is not None else weight,
                 out, out.stride(0), quant_scale if quant_scale is not None else weight, h, eps,
                 HAS_RES=residual is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK=block,
                 QUANT=quant_scale is not None, DTYPE=TL_DTYPES[x.dtype], PDL=pdl,
                 num_warps=warps, launch_pdl=pdl, **extra)
    return out, r
