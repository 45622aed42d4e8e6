"""Triton rotary kernel: split QKV, rotate q and k, write k/v to the paged cache, in one pass.

Same contract as :mod:`kiln.plugins.rotary.triton_reference` (its docstring). One program per
(token, head): programs ``[0, Hq)`` rotate a query head into the returned q; programs
``[Hq, Hq + Hkv)`` rotate a key head and copy its value head into the cache. Fusing the split,
the clamp, the rotation and the cache write reads the QKV projection once and writes every
output once (the unfused torch path makes four passes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_qkv_kernel(qkv_ptr, qkv_stride, table_ptr, table_stride, index_ptr, q_ptr,
                     k_cache_ptr, v_cache_ptr, slot_ptr,
                     cache_block_stride, cache_head_stride, cache_row_stride,
                     clip, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, PAGE: tl.constexpr,
                     ROTARY: tl.constexpr, CLIP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, HALF_PAD)
    mask = offs < half
    row = qkv_ptr + t * qkv_stride
    is_q = h < NUM_HEADS
    # Column of this head's first element in the fused row: q heads, then k heads.
    col = h * HEAD_DIM
    x1 = tl.load(row + col + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + col + half + offs, mask=mask, other=0.0).to(tl.float32)
    if CLIP:
        x1 = tl.minimum(tl.maximum(x1, -clip), clip)
        x2 = tl.minimum(tl.maximum(x2, -clip), clip)
    if ROTARY:
        idx = tl.load(index_ptr + t).to(tl.int64)
        cos = tl.load(table_ptr + idx * table_stride + offs, mask=mask, other=0.0)
        sin = tl.load(table_ptr + idx * table_stride + half + offs, mask=mask, other=0.0)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
    else:
        y1 = x1
        y2 = x2
    if is_q:
        out = q_ptr + (t * NUM_HEADS + h) * HEAD_DIM
        tl.store(out + offs, y1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(out + half + offs, y2.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        kv_head = h - NUM_HEADS
        slot = tl.load(slot_ptr + t).to(tl.int64)
        dst = (slot // PAGE) * cache_block_stride + kv_head * cache_head_stride \
            + (slot % PAGE) * cache_row_stride
        tl.store(k_cache_ptr + dst + offs, y1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + dst + half + offs, y2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        vcol = (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM
        v1 = tl.load(row + vcol + offs, mask=mask, other=0.0)
        v2 = tl.load(row + vcol + half + offs, mask=mask, other=0.0)
        if CLIP:
            v1 = tl.minimum(tl.maximum(v1.to(tl.float32), -clip), clip)
            v2 = tl.minimum(tl.maximum(v2.to(tl.float32), -clip), clip)
        tl.store(v_cache_ptr + dst + offs, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst + half + offs, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_qkv_to_cache(qkv: torch.Tensor, table: torch.Tensor | None, table_index: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      *, num_heads: int, num_kv_heads: int, head_dim: int,
                      clip: float | None = None) -> torch.Tensor:
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
    grid = (t, num_heads + num_kv_heads)
    _rope_qkv_kernel[grid](
        qkv, qkv.stride(0), table_arg, table.stride(0) if rotary else 0, table_index, q,
        k_cache, v_cache, slot_mapping, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        float(clip) if clip is not None else 0.0,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), PAGE=k_cache.shape[2],
        ROTARY=rotary, CLIP=clip is not None, num_warps=1)
    return q
