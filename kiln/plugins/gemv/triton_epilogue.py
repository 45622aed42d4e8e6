"""The device side of :mod:`kiln.plugins.gemv.epilogue`: which rows a one-row GEMV program
owns, and how it stores them (plainly, or through a fused epilogue).

A GEMV kernel that takes epilogues computes ``rows = output_rows(...)``, its ``[BLOCK_N]``
outputs in float32 with scales and bias applied, and ends with ``store_rows(...)``; the
arguments after ``EPILOGUE`` default to "no epilogue", so its launches without one stay as they
were. With an epilogue a program owns ``BLOCK_N / 2`` pairs ``(r, r + PAIR_HALF)`` in
interleaved order, each rounded to the projection's dtype first, as the unfused op reads it:

- silu * up: pair ``(gate j, up j)`` becomes output ``j`` (the gated-MLP kernel's arithmetic);
- rope to cache: pair ``(d, d + D/2)`` of a head is rotated (query and key heads) and stored
  where ``_rope_qkv_kernel`` stores it: q for query heads, the cache for key and value heads
  (quantized there as that kernel does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kiln.plugins.gemv.epilogue import (
    EPILOGUE_ROPE,
    EPILOGUE_SILU_MUL,
    Epilogue,
    RopeToCache,
    pair_half,
)
from kiln.plugins.rotary.triton_kernels import _to_cache, scale_arg
from kiln.plugins.rotary.triton_reference import check_cache_scales


@triton.jit
def _pair_first(pid, PAIRS: tl.constexpr, HALF):
    """First row of program ``pid``'s pairs: ``HALF / PAIRS`` programs cover each span of
    ``2 * HALF`` rows (a head's, or the whole [gate | up])."""
    groups = HALF // PAIRS
    return (pid // groups) * (2 * HALF) + (pid % groups) * PAIRS


@triton.jit
def output_rows(pid, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr, PAIR_HALF):
    """The rows GEMV program ``pid`` computes, in the order :func:`store_rows` takes them."""
    j = tl.arange(0, BLOCK_N)
    if EPILOGUE == 0:
        rows = pid * BLOCK_N + j
    else:
        rows = _pair_first(pid, BLOCK_N // 2, PAIR_HALF) + j // 2 + (j % 2) * PAIR_HALF
    return rows


@triton.jit
def row_tile(w_rows, row_ok, k0, k, BLOCK_K: tl.constexpr):
    """Columns ``[k0, k0 + BLOCK_K)`` of a GEMV program's weight rows (``w_rows``: each row's
    start; masked past ``k`` and past the last row, as 0). A one-row GEMV loads its first
    tiles before the PDL wait where its config says so: weights do not depend on the kernel
    before it, so they stream while that kernel runs (decode attention before ``o``).

    The rows are read once a call: first out of the caches (``evict_first``, L1 and L2), so
    that they do not evict the activations every program reads again from L1, nor the norms'
    weights and residual from L2 (compiled for sm_90a they had been plain ``ld.global.v4``;
    batch 1 through EngineCore on an H100: FP8 +0.8%, bf16 +0.5%, INT8 weight-only +0.3%,
    GPU_NOTES.md, forty-third session; the INT4 kernel's words, thirty-eighth session)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < k)[None, :], other=0,
                   eviction_policy="evict_first")


@triton.jit
def _rope_pairs(a, b, first, q_ptr, table_ptr, table_stride, index_ptr, slot_ptr,
                k_cache_ptr, v_cache_ptr, c_stride_b, c_stride_h, c_stride_r, clip, k_scale_ptr,
                v_scale_ptr, PAIRS: tl.constexpr, NUM_HEADS: tl.constexpr,
                NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                ROTARY: tl.constexpr, CLIP: tl.constexpr, QUANT: tl.constexpr):
    """``_rope_qkv_kernel`` for one token's dims ``first % HEAD_DIM + [0, PAIRS)`` of head
    ``first // HEAD_DIM`` (a: the first half's values, b: the second's, float32)."""
    half: tl.constexpr = HEAD_DIM // 2
    head = first // HEAD_DIM
    dims = first % HEAD_DIM + tl.arange(0, PAIRS)
    if CLIP:
        a = tl.minimum(tl.maximum(a, -clip), clip)
        b = tl.minimum(tl.maximum(b, -clip), clip)
    if ROTARY:
        if head < NUM_HEADS + NUM_KV_HEADS:
            idx = tl.load(index_ptr).to(tl.int64)
            cos = tl.load(table_ptr + idx * table_stride + dims)
            sin = tl.load(table_ptr + idx * table_stride + half + dims)
            a, b = tl.fma(a, cos, -(b * sin)), tl.fma(b, cos, a * sin)  # as the rope kernel
    if head < NUM_HEADS:
        dst = q_ptr + head * HEAD_DIM + dims
        tl.store(dst, a.to(q_ptr.dtype.element_ty))
        tl.store(dst + half, b.to(q_ptr.dtype.element_ty))
    else:
        slot = tl.load(slot_ptr).to(tl.int64)
        row = (slot // PAGE) * c_stride_b + (slot % PAGE) * c_stride_r + dims
        is_key = head < NUM_HEADS + NUM_KV_HEADS
        kv_head = tl.where(is_key, head - NUM_HEADS, head - NUM_HEADS - NUM_KV_HEADS)
        row += kv_head * c_stride_h
        scale = 1.0
        if QUANT:
            scale = tl.where(is_key, tl.load(k_scale_ptr), tl.load(v_scale_ptr))
        if is_key:
            tl.store(k_cache_ptr + row, _to_cache(a, scale, q_ptr, k_cache_ptr, QUANT))
            tl.store(k_cache_ptr + row + half, _to_cache(b, scale, q_ptr, k_cache_ptr, QUANT))
        else:
            tl.store(v_cache_ptr + row, _to_cache(a, scale, q_ptr, v_cache_ptr, QUANT))
            tl.store(v_cache_ptr + row + half, _to_cache(b, scale, q_ptr, v_cache_ptr, QUANT))


@triton.jit
def store_rows(y, rows, row_ok, y_ptr, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr = 0,
               PAIR_HALF=0, table_ptr=None, table_stride=0, index_ptr=None, slot_ptr=None,
               k_cache_ptr=None, v_cache_ptr=None, c_stride_b=0, c_stride_h=0, c_stride_r=0,
               clip=0.0, k_scale_ptr=None, v_scale_ptr=None, NUM_HEADS: tl.constexpr = 0,
               NUM_KV_HEADS: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 0,
               PAGE: tl.constexpr = 0, ROTARY: tl.constexpr = False,
               CLIP: tl.constexpr = False, QUANT: tl.constexpr = False):
    """Store a GEMV program's outputs ``y`` (float32 [BLOCK_N], ``rows`` from
    :func:`output_rows`) into ``y_ptr``, or through the epilogue (``y_ptr``: its output)."""
    if EPILOGUE == 0:
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)
    else:
        PAIRS: tl.constexpr = BLOCK_N // 2
        first = _pair_first(tl.program_id(0), PAIRS, PAIR_HALF)
        # as the projection would have stored them, read back in float32 by the unfused op
        a, b = tl.split(y.to(y_ptr.dtype.element_ty).to(tl.float32).reshape(PAIRS, 2))
        if EPILOGUE == 1:  # silu(gate) * up, as _silu_mul_kernel
            out = a / (1.0 + tl.exp(-a)) * b
            tl.store(y_ptr + first + tl.arange(0, PAIRS), out.to(y_ptr.dtype.element_ty))
        else:
            _rope_pairs(a, b, first, y_ptr, table_ptr, table_stride, index_ptr, slot_ptr,
                        k_cache_ptr, v_cache_ptr, c_stride_b, c_stride_h, c_stride_r, clip,
                        k_scale_ptr, v_scale_ptr, PAIRS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                        PAGE, ROTARY, CLIP, QUANT)


def early_tiles(fn: str, config_rest: list[int], pdl: bool, most: int = 2) -> int:
    """A one-row GEMV config's early tiles (its fifth item, 0 where it has none; at most
    ``most``) as the kernel's ``EARLY``: 0 without PDL, where nothing runs before the wait."""
    early = config_rest[0] if config_rest else 0
    if not 0 <= early <= most:
        raise ValueError(f"{fn}: a config's early tiles are 0 to {most}, found {early}")
    return early if pdl else 0


def gemv_output(epilogue: Epilogue | None, n: int, block_n: int, x: torch.Tensor,
                out_dtype: torch.dtype | None = None,
                ) -> tuple[torch.Tensor, dict, Callable[[torch.Tensor], torch.Tensor]]:
    """For a one-row GEMV of ``n`` rows over ``x`` whose programs own ``block_n`` rows: (the
    tensor its kernel writes, in ``out_dtype`` (default x's), its :func:`store_rows`
    arguments, what turns that tensor into the call's result: nothing where the epilogue is
    fused or there is none, else the epilogue applied after)."""
    if out_dtype is not None and out_dtype != x.dtype and epilogue is not None:
        raise ValueError("gemv: an epilogue takes the result in x's dtype, not out_dtype")
    fused = _fused_epilogue(epilogue, n, block_n, x.dtype, x.device)
    if fused is not None:
        return (*fused, _as_is)
    y = torch.empty((1, n), dtype=out_dtype or x.dtype, device=x.device)
    return y, {}, _as_is if epilogue is None else epilogue.apply


def _as_is(y: torch.Tensor) -> torch.Tensor:
    return y


def _fused_epilogue(epilogue: Epilogue | None, n: int, block_n: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, dict] | None:
    """(the epilogue's output, the GEMV kernel's :func:`store_rows` arguments) to fuse
    ``epilogue`` into a one-row GEMV of ``n`` rows in ``dtype`` whose programs own ``block_n``
    rows, or None where it does not fit (the caller then applies the epilogue after)."""
    if epilogue is None:
        return None
    half = pair_half(epilogue, n, block_n)
    if half is None:
        return None
    if not isinstance(epilogue, RopeToCache):
        return torch.empty((1, n // 2), dtype=dtype, device=device), dict(
            EPILOGUE=EPILOGUE_SILU_MUL, PAIR_HALF=half)
    e = epilogue
    k_cache, v_cache, table = e.k_cache, e.v_cache, e.table
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 \
            or (table is not None and table.stride(-1) != 1):
        return None  # the unfused kernel says what is wrong
    quantized = check_cache_scales(k_cache.dtype, e.k_scale, e.v_scale) is not None
    q = torch.empty((1, e.num_heads, e.head_dim), dtype=dtype, device=device)
    scales = {}
    if quantized:
        scales = dict(k_scale_ptr=scale_arg(e.k_scale, device),
                      v_scale_ptr=scale_arg(e.v_scale, device))
    return q, dict(
        EPILOGUE=EPILOGUE_ROPE, PAIR_HALF=half, table_ptr=table if table is not None else q,
        table_stride=table.stride(0) if table is not None else 0, index_ptr=e.table_index,
        slot_ptr=e.slot_mapping, k_cache_ptr=k_cache, v_cache_ptr=v_cache,
        c_stride_b=k_cache.stride(0), c_stride_h=k_cache.stride(1), c_stride_r=k_cache.stride(2),
        clip=float(e.clip) if e.clip is not None else 0.0, NUM_HEADS=e.num_heads,
        NUM_KV_HEADS=e.num_kv_heads, HEAD_DIM=e.head_dim, PAGE=k_cache.shape[2],
        ROTARY=table is not None, CLIP=e.clip is not None, QUANT=quantized, **scales)
