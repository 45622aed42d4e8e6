"""Triton rotary kernel: split QKV, rotate q and k, write k/v to the paged cache, in one pass.

Same contract as :mod:`kiln.plugins.rotary.triton_reference` (its docstring). One program per
(token, 8 heads): rows that are query heads are rotated into the returned q; rows that are key
heads are rotated into the cache, and their value heads copied there. Fusing the split,
the clamp, the rotation and the cache write reads the QKV projection once and writes every
output once (the unfused torch path makes four passes).

Quantized caches (float8_e4m3fn, int8; a constexpr branch, the float paths are unchanged) store
``x / scale`` with the scales read once per program from device scalars. The rounding is done
in float32 arithmetic (:func:`_rint`) so that the final cast is exact: the stored bytes equal
the reference's on GPUs and in Triton's CPU interpreter, whose float8 cast rounds wrongly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.plugins.pdl import enabled as pdl_enabled
from kiln.plugins.pdl.triton_kernels import prologue
from kiln.plugins.rotary.triton_reference import check_cache_scales


@triton.jit
def _rint(v):
    """Round half to even in float32 (|v| < 2^22), the sign (and -0) kept: the cast then is exact.

    ``|v| + 1.5 * 2^23`` lands where float32 spacing is 1, so the addition itself rounds to the
    nearest even integer; subtracting the constant back is exact.
    """
    r = (tl.abs(v) + 12582912.0) - 12582912.0
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _to_cache(x, scale, q_ptr, cache_ptr, QUANT: tl.constexpr):
    """Keys or values (float32 or q's dtype) as the cache stores them (reference ``to_cache``)."""
    if QUANT:  # round to q's dtype, then x / scale saturated and rounded to nearest even
        y = tl.math.div_rn(x.to(q_ptr.dtype.element_ty).to(tl.float32), scale)
        if cache_ptr.dtype.element_ty == tl.int8:
            out = _rint(tl.minimum(tl.maximum(y, -128.0), 127.0)).to(tl.int8)
        else:  # e4m3: 3 mantissa bits from 2^-6 up, spacing 2^-9 below (subnormals)
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            pow2 = (y.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
            ulp = tl.maximum(pow2, 0.015625) * 0.125
            out = (_rint(tl.math.div_rn(y, ulp)) * ulp).to(cache_ptr.dtype.element_ty)
    else:
        out = x.to(cache_ptr.dtype.element_ty)
    return out


@triton.jit
def _rope_qkv_kernel(qkv_ptr, qkv_stride, table_ptr, table_stride, index_ptr, q_ptr,
                     k_cache_ptr, v_cache_ptr, slot_ptr,
                     cache_block_stride, cache_head_stride, cache_row_stride,
                     clip, k_scale_ptr, v_scale_ptr, NUM_HEADS: tl.constexpr,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
                     HEADS: tl.constexpr, PAGE: tl.constexpr, ROTARY: tl.constexpr,
                     CLIP: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr = False):
    prologue(PDL)
    t = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # q heads, then k heads
    offs = tl.arange(0, HALF_PAD)
    col_ok = (offs < half)[None, :]
    head_ok = h < NUM_HEADS + NUM_KV_HEADS
    is_q = (h < NUM_HEADS)[:, None] & col_ok
    is_k = (head_ok & (h >= NUM_HEADS))[:, None] & col_ok
    row = qkv_ptr + t * qkv_stride
    src = row + h[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(src, mask=head_ok[:, None] & col_ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=head_ok[:, None] & col_ok, other=0.0).to(tl.float32)
    if CLIP:
        x1 = tl.minimum(tl.maximum(x1, -clip), clip)
        x2 = tl.minimum(tl.maximum(x2, -clip), clip)
    if ROTARY:
        idx = tl.load(index_ptr + t).to(tl.int64)
        cos = tl.load(table_ptr + idx * table_stride + offs, mask=offs < half, other=0.0)
        sin = tl.load(table_ptr + idx * table_stride + half + offs, mask=offs < half, other=0.0)
        # explicit FMAs: the contraction is not the compiler's choice, so the GEMV epilogue
        # that does the same rotation (kiln.plugins.gemv.triton_epilogue) stores the same bits
        y1 = tl.fma(x1, cos[None, :], -(x2 * sin[None, :]))
        y2 = tl.fma(x2, cos[None, :], x1 * sin[None, :])
    else:
        y1 = x1
        y2 = x2
    q_dst = q_ptr + (t * NUM_HEADS + h)[:, None] * HEAD_DIM + offs[None, :]
    tl.store(q_dst, y1.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(q_dst + half, y2.to(q_ptr.dtype.element_ty), mask=is_q)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    kv_head = h - NUM_HEADS  # negative on query rows, which are masked off below
    dst = (slot // PAGE) * cache_block_stride + (slot % PAGE) * cache_row_stride \
        + kv_head[:, None] * cache_head_stride + offs[None, :]
    k_scale = 1.0
    v_scale = 1.0
    if QUANT:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    tl.store(k_cache_ptr + dst, _to_cache(y1, k_scale, q_ptr, k_cache_ptr, QUANT), mask=is_k)
    tl.store(k_cache_ptr + dst + half, _to_cache(y2, k_scale, q_ptr, k_cache_ptr, QUANT),
             mask=is_k)
    v_src = src + NUM_KV_HEADS * HEAD_DIM  # the value head of the same kv head
    v1 = tl.load(v_src, mask=is_k, other=0.0)
    v2 = tl.load(v_src + half, mask=is_k, other=0.0)
    if CLIP:
        v1 = tl.minimum(tl.maximum(v1.to(tl.float32), -clip), clip)
        v2 = tl.minimum(tl.maximum(v2.to(tl.float32), -clip), clip)
    tl.store(v_cache_ptr + dst, _to_cache(v1, v_scale, q_ptr, v_cache_ptr, QUANT), mask=is_k)
    tl.store(v_cache_ptr + dst + half, _to_cache(v2, v_scale, q_ptr, v_cache_ptr, QUANT),
             mask=is_k)


def scale_arg(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A scale as the kernels read it (a KV-cache scale, an FP8 output's): one float32 on the
    device (no copy if it is one already, so CUDA graphs see the same pointer)."""
    if scale.numel() != 1 or scale.device != device:
        raise ValueError(f"a kernel's scale must be one value on {device}, found shape "
                         f"{tuple(scale.shape)} on {scale.device}")
    return scale.float().reshape(())


def rope_qkv_to_cache(qkv: torch.Tensor, table: torch.Tensor | None, table_index: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      *, num_heads: int, num_kv_heads: int, head_dim: int,
                      clip: float | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    quantized = check_cache_scales(k_cache.dtype, k_scale, v_scale) is not None
    t = qkv.shape[0]
    if qkv.stride(-1) != 1:
        raise ValueError("rope_qkv_to_cache: qkv rows must be contiguous (last stride 1)")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("rope_qkv_to_cache: k and v caches need one contiguous layout")
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    rotary = table is not None
    table_arg = table if rotary else qkv  # unread when ROTARY is off
    k_arg = v_arg = qkv  # unread unless QUANT
    if quantized:
        k_arg, v_arg = scale_arg(k_scale, k_cache.device), scale_arg(v_scale, k_cache.device)
    heads = 8  # per program: [8, D/2] tiles make 16-byte accesses at head_dim 128
    grid = (t, triton.cdiv(num_heads + num_kv_heads, heads))
    pdl = pdl_enabled(qkv.device)
    _rope_qkv_kernel[grid](
        qkv, qkv.stride(0), table_arg, table.stride(0) if rotary else 0, table_index, q,
        k_cache, v_cache, slot_mapping, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        float(clip) if clip is not None else 0.0, k_arg, v_arg,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), HEADS=heads, PAGE=k_cache.shape[2],
        ROTARY=rotary, CLIP=clip is not None, QUANT=quantized, PDL=pdl, num_warps=2,
        launch_pdl=pdl)
    return q
