"""Triton paged attention: decode (one query per sequence, split-K) and packed prefill.

Same contract as :mod:`kiln.plugins.attention.triton_reference` (its docstring has the
cache layout and masking rules). Both kernels are flash-attention style: online softmax in
float32 with ``exp2``, key/value tiles of ``BLOCK_N`` rows read straight from the paged cache
(a tile of at most a page's rows lies in one block and is one contiguous ``[BLOCK_N, D]`` read;
a decode tile of more rows than a page takes one table entry per row).

Decode: grid ``(num_seqs, Hkv, num_splits)``. One program holds the ``G = Hq / Hkv`` query
heads that share a key head as the rows of its ``tl.dot`` tile (padded to 16 rows), so each
key/value tile is read once per group, not once per query head. Long contexts at small batch
are split along the keys (flash-decoding): each split writes an unnormalized partial and its
``(max, sum)``, and the last of a key head's programs to finish (an arrival counter per
``(row, key head)``, :mod:`kiln.plugins.split_counters`) merges them in split order, so the
result does not depend on which program was last; a row whose keys fit one split's share, and
``num_splits == 1``, write the output directly. Against a merge kernel of its own, a batch-1
token's decode attention took 152.5 us instead of 168.9 on an H200 (32 layers, ~200 keys);
alone, one layer is 1.05-1.22x faster up to ~1,000 keys and 0-5% slower at 4,096-8,000, where
a row's 33 splits take five merge tiles one after another (GPU_NOTES.md, twelfth pass).
The grid's split count comes from the longest context (a CUDA graph's from ``max_seq_len``);
each row divides its own keys among those splits in whole tiles, so a short row does not run
in one program while the others exit (batch-1 decode of a few hundred keys in a graph sized
for 8,192: one program walked every tile).

Prefill: grid ``(num_seqs, cdiv(max_q_len, BLOCK_M), Hq)``; programs past a sequence's
queries exit at once. Causal and sliding-window bounds skip whole key tiles; the mask is
applied per element inside the tiles that remain.

FP8 output (``quant_scale``, both kernels and the merge): the output is stored as the FP8 input
of the ``o`` projection (that projection's own rounding and smoothing), which then skips its
quantization pass (~17 us per layer at 2,048 tokens on an H200: GPU_NOTES.md).

Quantized caches (float8_e4m3fn, int8; the ``QUANT`` constexpr, so the float paths compile as
before): each program reads ``k_scale``/``v_scale`` once from device scalars, and every key/value
tile is dequantized in registers as the reference reads it, ``(stored * scale)`` rounded to q's
dtype, before its dot. The 1-byte tiles halve what decode reads from the cache.

Decode over a float8 cache with 16-bit queries (``WIDEN``) does less per element, since it
reads every cached byte once per step: each e4m3 pair becomes an exact float16 pair in one
instruction (``cvt.rn.f16x2.e4m3x2``), q is rounded to float16 (bfloat16 values keep every bit
between 2^-14 and 65504; smaller ones lose bits as float16 subnormals, and |q| beyond float16's
range, not seen in practice, is clamped to 65504 rather than becoming inf), the dots run on the
stored values, and the scales are applied to the float32 scores (``k_scale``) and the output
(``v_scale``). Keys and values are then exact where the reference rounds ``stored * scale`` to
q's dtype: within its tolerances, not bit-equal. One layer of 512 sequences x 1,040 keys took
547 us in the dequantizing form and 291 us widened, with :data:`DECODE_CONFIG_8BIT`'s one-warp
programs of 32-key tiles (benchmarks/GPU_NOTES.md). Reading the pairs as 16-bit words and
widening them before the tile moves into the dot's layout (no byte loads from shared memory)
measured the same, so the simpler form stays.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kiln.plugins.attention.triton_reference import check_fp8_output
from kiln.plugins.pdl import enabled as pdl_enabled
from kiln.plugins.pdl.triton_kernels import prologue
from kiln.plugins.quant_linear.triton_kernels import _quantize
from kiln.plugins.rotary.triton_kernels import scale_arg
from kiln.plugins.rotary.triton_reference import check_cache_scales
from kiln.plugins.split_counters import CAPACITY as COUNTER_CAPACITY
from kiln.plugins.split_counters import split_counters

LOG2E = 1.4426950408889634
# finite "minus infinity" for running maxima: keeps exp2(m_old - m_new) NaN-free
_NEG = tl.constexpr(-1.0e30)
# QUANT modes: 0 a float cache, 1 tiles dequantized as the reference reads them, WIDEN a float8
# cache's tiles widened exactly to float16 with the scales applied to the scores and the output.
WIDEN = tl.constexpr(2)


@triton.jit
def _dequant(x, scale, DTYPE: tl.constexpr, QUANT: tl.constexpr):
    """A cache tile as the reference reads it: a quantized one as (stored * scale) in DTYPE;
    under ``WIDEN`` a float8 tile as its stored values in float16 (the scales applied outside).

    ``stored.to(float32)`` is made with integer ops, not conversions: decode dequantizes every
    cached element, and Hopper's conversion unit (16 results per clock per SM) then bounds a
    1-byte cache's decode below bf16's memory time. int8: the bits added to 1.5 * 2^23's, minus
    it (exact). e4m3: its exponent and mantissa fields moved into float32's, which reads them
    as the value times 2^-120 (subnormals too, as float32 subnormals); the two power-of-two
    factors bring it back inside the one rounded product (scale below 2^72). Both equal
    ``stored.float() * scale`` bit for bit (every code checked; NaN codes are never stored).
    """
    if QUANT == WIDEN:  # float8 decode: exact e4m3 -> float16, the scales applied outside
        x = x.to(DTYPE)
    elif QUANT:
        bits = x.to(tl.int8, bitcast=True).to(tl.int32)  # sign-extended
        if x.dtype == tl.int8:
            y = ((bits + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * scale
        else:
            u = bits.to(tl.uint32, bitcast=True)
            f = (((u << 20) & 0x07F00000) | (u & 0x80000000)).to(tl.float32, bitcast=True)
            y = (f * 1.8446744073709552e19) * (scale * 7.205759403792794e16)  # 2^64, 2^56
        x = y.to(DTYPE)
    return x


@triton.jit
def _tile_scores(q, k_ptrs, kpos, kmask, d_mask, qk_scale, slopes, k_scale, ALIBI: tl.constexpr,
                 PRECISION: tl.constexpr, QUANT: tl.constexpr):
    k = tl.load(k_ptrs, mask=kmask[:, None] & d_mask[None, :], other=0.0)
    k = _dequant(k, k_scale, q.dtype, QUANT)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if ALIBI:
        s += slopes[:, None] * kpos.to(tl.float32)[None, :]
    return s


@triton.jit
def _online_update(s, allowed, m_i, l_i, acc, v_ptrs, kmask, d_mask, v_scale,
                   PRECISION: tl.constexpr, DTYPE: tl.constexpr, QUANT: tl.constexpr):
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = tl.load(v_ptrs, mask=kmask[:, None] & d_mask[None, :], other=0.0)
    v = _dequant(v, v_scale, DTYPE, QUANT)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _load_scales(k_scale_ptr, v_scale_ptr, QUANT: tl.constexpr):
    """A quantized cache's (k_scale, v_scale), read once per program; (1, 1) otherwise (unused)."""
    k_scale = 1.0
    v_scale = 1.0
    if QUANT:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    return k_scale, v_scale


@triton.jit
def _output(o, out_ptrs, mask, o_scale_ptr, pqs_ptr, cols, DTYPE: tl.constexpr,
            FP8_OUT: tl.constexpr, SMOOTH: tl.constexpr):
    """Store the float32 output ``o``: in the out buffer's dtype, or with FP8_OUT as the FP8
    input of the projection after (rounded to the model dtype ``DTYPE``, times its smoothing
    vector at columns ``cols`` and rounded again with SMOOTH, then quantized by its scale)."""
    if FP8_OUT:
        o = o.to(DTYPE).to(tl.float32)
        if SMOOTH:
            pqs = tl.load(pqs_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            o = (o * pqs).to(DTYPE).to(tl.float32)
        s_o = tl.load(o_scale_ptr)
        o = _quantize(o, s_o, s_o, 1, True)
    tl.store(out_ptrs, o.to(out_ptrs.dtype.element_ty), mask=mask)


# table_stride, the block-table width of the step's longest context (1, a multiple of 16 or
# neither), is not specialized: each value class compiled a variant during requests.
@triton.jit
def _row_partition(ctx, num_splits, BLOCK_N: tl.constexpr):
    """Keys per split of a row of ``ctx`` keys: its context over the grid's splits, whole
    tiles (at least one), so that a short row in a grid sized for long ones (a CUDA graph's,
    captured for ``max_seq_len``) still spreads over the splits instead of running in the first
    one alone. ``cdiv(ctx, partition) <= num_splits``."""
    tiles = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N)
    return tl.maximum(tiles, 1) * BLOCK_N


@triton.jit(do_not_specialize=["window", "num_splits", "table_stride"])
def _decode_kernel(q_ptr, q_stride_t, q_stride_h, k_ptr, v_ptr, c_stride_b, c_stride_h,
                   c_stride_r, table_ptr, table_stride, ctx_ptr, rows_ptr, out_ptr, o_stride_t,
                   o_stride_h, part_ptr, ml_ptr, count_ptr, slopes_ptr, k_scale_ptr,
                   v_scale_ptr, o_scale_ptr, pqs_ptr, qk_scale, window, num_splits,
                   GROUP: tl.constexpr, M_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, G_CHUNK: tl.constexpr, S_CHUNK: tl.constexpr,
                   ALIBI: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                   QUANT: tl.constexpr, FP8_OUT: tl.constexpr, SMOOTH: tl.constexpr,
                   PDL: tl.constexpr = False):
    prologue(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    partition = _row_partition(ctx, num_splits, BLOCK_N)
    start = split * partition
    if start >= ctx:
        return
    end = tl.minimum(start + partition, ctx)
    lo = start
    if WINDOW:
        lo = tl.maximum(start, ctx - window)
    m_offs = tl.arange(0, M_PAD)
    d_offs = tl.arange(0, D_PAD)
    m_mask = m_offs < GROUP
    d_mask = d_offs < HEAD_DIM
    heads = kvh * GROUP + m_offs
    row = tl.load(rows_ptr + b).to(tl.int64)
    q = tl.load(q_ptr + row * q_stride_t + heads[:, None] * q_stride_h + d_offs[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    slopes = tl.zeros([M_PAD], tl.float32)
    if ALIBI:
        slopes = tl.load(slopes_ptr + heads, mask=m_mask, other=0.0) * 1.4426950408889634
    k_scale, v_scale = _load_scales(k_scale_ptr, v_scale_ptr, QUANT)
    if QUANT == WIDEN:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        qk_scale *= k_scale
    m_i = tl.full([M_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([M_PAD], tl.float32)
    acc = tl.zeros([M_PAD, D_PAD], tl.float32)
    n_offs = tl.arange(0, BLOCK_N)
    table = table_ptr + b.to(tl.int64) * table_stride
    for n0 in range((lo // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        kpos = n0 + n_offs
        kmask = (kpos < end) & (kpos >= lo)
        if BLOCK_N <= PAGE:  # the tile lies in one block: one table entry
            block = tl.load(table + n0 // PAGE).to(tl.int64)
            rows = block * c_stride_b + ((n0 % PAGE) + n_offs) * c_stride_r
        else:  # the tile spans blocks: one entry per row (past the context: block 0, masked)
            blocks = tl.load(table + kpos // PAGE, mask=kpos < end, other=0).to(tl.int64)
            rows = blocks * c_stride_b + (kpos % PAGE) * c_stride_r
        base = (rows + kvh * c_stride_h)[:, None] + d_offs[None, :]
        s = _tile_scores(q, k_ptr + base, kpos, kmask, d_mask, qk_scale, slopes, k_scale, ALIBI,
                         PRECISION, QUANT)
        m_i, l_i, acc = _online_update(s, kmask[None, :], m_i, l_i, acc, v_ptr + base, kmask,
                                       d_mask, v_scale, PRECISION, q.dtype, QUANT)
    if QUANT == WIDEN:
        acc *= v_scale
    out_rows = out_ptr + row * o_stride_t
    dtype = q_ptr.dtype.element_ty
    used = tl.cdiv(ctx, partition)  # the programs of this row that did not exit
    if not SPLIT or used == 1:
        _output(acc / l_i[:, None], out_rows + heads[:, None] * o_stride_h + d_offs[None, :],
                m_mask[:, None] & d_mask[None, :], o_scale_ptr, pqs_ptr,
                heads[:, None] * HEAD_DIM + d_offs[None, :], dtype, FP8_OUT, SMOOTH)
    else:
        # partials [B, Hq, num_splits, D_PAD] float32; (max, sum) [B, Hq, num_splits, 2]
        idx = (b * (GROUP * tl.num_programs(1)) + heads).to(tl.int64) * num_splits + split
        tl.store(part_ptr + idx[:, None] * D_PAD + d_offs[None, :], acc, mask=m_mask[:, None])
        tl.store(ml_ptr + idx * 2, m_i, mask=m_mask)
        tl.store(ml_ptr + idx * 2 + 1, l_i, mask=m_mask)
        tl.debug_barrier()  # every thread's part stored before the counter says so
        tile = count_ptr + b * tl.num_programs(1) + kvh
        if tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu") == used - 1:
            _merge(part_ptr, ml_ptr, out_rows, o_stride_h, o_scale_ptr, pqs_ptr,
                   (b * (GROUP * tl.num_programs(1)) + kvh * GROUP).to(tl.int64) * num_splits,
                   num_splits, kvh * GROUP, used, d_offs, d_mask, GROUP, HEAD_DIM, D_PAD,
                   G_CHUNK, S_CHUNK, dtype, FP8_OUT, SMOOTH)
            tl.atomic_xchg(tile, 0, sem="relaxed", scope="gpu")  # zero for the next call


@triton.jit
def _merge(part_ptr, ml_ptr, out_rows, o_stride_h, o_scale_ptr, pqs_ptr, base, num_splits,
           head0, used, d_offs, d_mask, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
           D_PAD: tl.constexpr, G_CHUNK: tl.constexpr, S_CHUNK: tl.constexpr,
           DTYPE: tl.constexpr, FP8_OUT: tl.constexpr, SMOOTH: tl.constexpr):
    """The last program of a key head's splits: each query head's output from the ``used``
    splits' partials, ``G_CHUNK`` heads by ``S_CHUNK`` splits a tile (an online softmax over
    the tiles, in split order). Partials are read past L1 (``.cg``): other programs wrote them
    during this kernel. ``base``: the partials' row of (head ``head0``, split 0)."""
    g_offs = tl.arange(0, G_CHUNK)
    for g0 in range(0, GROUP, G_CHUNK):
        g_ok = g0 + g_offs < GROUP
        first = base + (g0 + g_offs).to(tl.int64) * num_splits  # each head's split 0
        m_run = tl.full([G_CHUNK], _NEG, tl.float32)
        l_run = tl.zeros([G_CHUNK], tl.float32)
        o_run = tl.zeros([G_CHUNK, D_PAD], tl.float32)
        for s0 in range(0, used, S_CHUNK):
            s_offs = s0 + tl.arange(0, S_CHUNK)
            ok = g_ok[:, None] & (s_offs < used)[None, :]
            idx = first[:, None] + s_offs[None, :]
            m = tl.load(ml_ptr + idx * 2, mask=ok, other=_NEG, cache_modifier=".cg")
            lsum = tl.load(ml_ptr + idx * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
            part = tl.load(part_ptr + idx[:, :, None] * D_PAD + d_offs[None, None, :],
                           mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m, 1))
            alpha = tl.exp2(m_run - m_new)
            w = tl.exp2(m - m_new[:, None])
            o_run = o_run * alpha[:, None] + tl.sum(part * w[:, :, None], 1)
            l_run = l_run * alpha + tl.sum(lsum * w, 1)
            m_run = m_new
        heads = head0 + g0 + g_offs
        _output(o_run / l_run[:, None], out_rows + heads[:, None] * o_stride_h + d_offs[None, :],
                g_ok[:, None] & d_mask[None, :], o_scale_ptr, pqs_ptr,
                heads[:, None] * HEAD_DIM + d_offs[None, :], DTYPE, FP8_OUT, SMOOTH)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    page = k_cache.shape[2]
    if page < 16 or page & (page - 1):
        raise ValueError(f"paged attention (triton): page_size must be a power of two >= 16, "
                         f"found {page}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged attention (triton): caches need one layout, last dims contiguous")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"paged attention: {q.shape[1]} query heads are not a multiple of "
                         f"{k_cache.shape[1]} key heads")
    return page, min(64, page)


def _scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
            unread: torch.Tensor) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(quantized, k_scale, v_scale) kernel arguments; ``unread`` stands in for a float cache's."""
    if check_cache_scales(k_cache.dtype, k_scale, v_scale) is None:
        return False, unread, unread
    return True, scale_arg(k_scale, k_cache.device), scale_arg(v_scale, k_cache.device)


def _output_args(quant_scale: torch.Tensor | None, pre_quant_scale: torch.Tensor | None,
                 device: torch.device, unread: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 output scale, smoothing vector) kernel arguments; ``unread`` stands in for absent
    ones."""
    o_scale = unread if quant_scale is None else scale_arg(quant_scale, device)
    return o_scale, unread if pre_quant_scale is None else pre_quant_scale


def decode_splits(num_seqs: int, num_kv_heads: int, max_ctx_len: int, device: torch.device,
                  min_partition: int = 128) -> int:
    """Key splits so that ~2 programs per multiprocessor run, none under ``min_partition`` keys."""
    if device.type != "cuda":  # Triton's CPU interpreter (tests): size the split as for an H100
        sms = 132
    else:
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = max(1, (2 * sms) // max(1, num_seqs * num_kv_heads))
    return max(1, min(want, triton.cdiv(max_ctx_len, min_partition), 64))


# (num_warps, num_stages[, BLOCK_N]) of decode: benchmarks/decode_attention.py on an H200, one
# layer, 512 sequences of 1,040 / 2,000 keys (decode_attention_results.json): a bf16 cache
# 563 / 1,076 us (~3.9 TB/s) with (4, 2), 505 / 950 with (2, 3) (4.3-4.4 TB/s; one warp on
# 32-key tiles the same: decode_attention_bf16_results.json). A float8 cache 541 / 1,007 us
# with the bf16 cache's (4, 2), 373 / 692 with (2, 3); then (decode_attention_tiles_results.json,
# 1,040 keys) 291 us with one warp per program and 32-key tiles (1, 3, 32; 3.75 TB/s), 415 with
# two warps on such tiles, 466 with 128-key tiles: 1-byte tiles are cheap to hold, and small
# programs put more of them in flight per multiprocessor (smaller or larger one-warp tiles,
# (1, 2, 32), (1, 3, 16), (1, 3, 64): 6-12% slower, decode_attention_small_tiles_results.json).
# int8: 567 with (4, 2), 532 with (2, 3), 503 with (1, 3, 32).
# Measured for groups of up to 16 query heads of up to 128 dims (a 16 x 128 query tile) and
# unsplit grids: there a 16-bit cache takes (2, 3) (measured with bf16; fp16 reads the same
# bytes) and a quantized one (1, 3, 32). Elsewhere quantized caches keep (2, 3) (larger tiles
# would spill the one-warp program's registers; split grids are sized for bigger programs) or,
# for larger query tiles, (4, 2), as bf16 does.
DECODE_CONFIG = (4, 2)
# The merge (the last program of a key head's splits): tiles of MERGE_S_CHUNK splits by as many
# of the group's query heads as keep a tile within MERGE_TILE float32 values; fixed per model,
# so that no split count compiles a variant of its own during requests.
MERGE_S_CHUNK = 8
MERGE_TILE = 4096
DECODE_CONFIG_16BIT = (2, 3)
# 8-bit caches' one-warp program held 178 registers, so a multiprocessor partition ran two of
# them (12.5% occupancy; Nsight Compute on an H200: 3.4 TB/s, the warps stalled on memory and
# on each other's fixed latencies). Capped at 168 (no spills for a float8 cache), three fit:
# 512 sequences of a float8 cache 323 -> 286 us at 1,040 keys, 639 -> 535 at 2,000 (3.9 TB/s);
# int8 (a few spills) the same to 2% faster; a cap of 128 spills and is slower
# (benchmarks/GPU_NOTES.md, "Issue 12, twelfth pass").
DECODE_CONFIG_8BIT = (1, 3, 32, 168)
DECODE_CONFIG_8BIT_SPLIT = (2, 3)


def decode_config(cache_bytes: int, m_pad: int, d_pad: int, splits: int) -> tuple[int, ...]:
    """Default (num_warps, num_stages[, BLOCK_N]) of decode for a cache of ``cache_bytes`` per
    element and a program's padded query tile [m_pad, d_pad] (see the configs above); float32
    caches keep (4, 2)."""
    if m_pad * d_pad > 16 * 128 or cache_bytes > 2:
        return DECODE_CONFIG
    if cache_bytes == 2:
        return DECODE_CONFIG_16BIT if splits == 1 else DECODE_CONFIG
    return DECODE_CONFIG_8BIT if splits == 1 else DECODE_CONFIG_8BIT_SPLIT


def _decode_launch(config: tuple[int, ...] | None, cache_bytes: int, m_pad: int, d_pad: int,
                   splits: int, block_n: int) -> tuple[int, int, int, dict]:
    """(num_warps, num_stages, BLOCK_N, other launch options) of a decode launch: ``config``
    or the default for ``splits``; ``block_n`` where the config names no tile; a fourth item
    caps the registers per thread (Triton's ``maxnreg``)."""
    warps, stages, *rest = config or decode_config(cache_bytes, m_pad, d_pad, splits)
    if rest:
        block_n = rest[0]
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"paged attention (triton): BLOCK_N must be a power of two >= 16, "
                             f"found {block_n}")
    return warps, stages, block_n, {"maxnreg": rest[1]} if len(rest) > 1 else {}


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                           q_rows: torch.Tensor, out: torch.Tensor, *, scale: float,
                           alibi_slopes: torch.Tensor | None = None,
                           sliding_window: int | None = None, max_ctx_len: int | None = None,
                           num_splits: int | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None,
                           config: tuple[int, ...] | None = None,
                           quant_scale: torch.Tensor | None = None,
                           pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``config``: (num_warps, num_stages[, BLOCK_N]), default :func:`decode_config`; BLOCK_N
    (keys per tile, a power of two >= 16) is ``min(64, page_size)`` where the config has none,
    and one larger than a page spans pages. ``quant_scale`` (and ``pre_quant_scale``): ``out``
    is float8_e4m3fn, the FP8 input of the projection after (triton_reference's contract)."""
    page, page_tile = _check(q, k_cache, v_cache)
    quant, k_arg, v_arg = _scales(k_cache, k_scale, v_scale, ctx_lens)
    check_fp8_output(out, quant_scale, pre_quant_scale)
    o_scale, pqs = _output_args(quant_scale, pre_quant_scale, q.device, ctx_lens)
    b, hq, d = q_rows.shape[0], q.shape[1], q.shape[2]
    hkv = k_cache.shape[1]
    if b == 0:
        return out
    max_ctx = max_ctx_len if max_ctx_len is not None else block_tables.shape[1] * page
    splits = num_splits or decode_splits(b, hkv, max_ctx, q.device)
    d_pad, group = max(16, triton.next_power_of_2(d)), hq // hkv
    m_pad = max(16, triton.next_power_of_2(group))
    warps, stages, block_n, options = _decode_launch(config, k_cache.element_size(), m_pad,
                                                     d_pad, splits, page_tile)
    # the grid's splits: none past the longest context's last key (each row then takes
    # its own share of them, _row_partition)
    fewer = triton.cdiv(max_ctx, triton.cdiv(triton.cdiv(max_ctx, splits), block_n) * block_n)
    if fewer > 1 and b * hkv > COUNTER_CAPACITY:  # more key-head rows than the merge has
        fewer = 1  # counters for: unsplit (such a grid fills the GPU without splits)
    if fewer == 1 < splits and config is None:  # unsplit after all: the unsplit default (a
        # split default here compiled a variant of its own, which no other launch used)
        warps, stages, block_n, options = _decode_launch(None, k_cache.element_size(), m_pad,
                                                         d_pad, 1, page_tile)
    splits = fewer
    part = ml = counters = out  # unread unless split
    if splits > 1:
        part = torch.empty((b, hq, splits, d_pad), dtype=torch.float32, device=q.device)
        ml = torch.empty((b, hq, splits, 2), dtype=torch.float32, device=q.device)
        counters = split_counters(q.device, "paged decode attention")
    slopes = alibi_slopes if alibi_slopes is not None else ctx_lens
    pdl = pdl_enabled(q.device)
    mode = int(quant)
    if quant and k_cache.dtype == torch.float8_e4m3fn and q.dtype != torch.float32:
        mode = WIDEN.value
    _decode_kernel[(b, hkv, splits)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables, block_tables.stride(0), ctx_lens, q_rows, out,
        out.stride(0), out.stride(1), part, ml, counters, slopes, k_arg, v_arg, o_scale, pqs,
        scale * LOG2E, sliding_window or 0, splits, GROUP=group,
        M_PAD=m_pad, HEAD_DIM=d, D_PAD=d_pad, PAGE=page,
        BLOCK_N=block_n, SPLIT=splits > 1, S_CHUNK=MERGE_S_CHUNK,
        G_CHUNK=min(triton.next_power_of_2(group), max(1, MERGE_TILE // (MERGE_S_CHUNK * d_pad))),
        ALIBI=alibi_slopes is not None,
        WINDOW=sliding_window is not None, PRECISION=_precision(q.dtype), QUANT=mode,
        FP8_OUT=quant_scale is not None, SMOOTH=pre_quant_scale is not None,
        PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl, **options)
    return out


@triton.jit
def _prefill_tiles(q, m_i, l_i, acc, k_ptr, v_ptr, table, cache, c_stride_b, c_stride_r,
                   start, stop, hi,
                   qpos, d_mask, qk_scale, slopes, window, rows_per_block, kv_row, k_scale,
                   v_scale, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   WINDOW: tl.constexpr, ALIBI: tl.constexpr, PRECISION: tl.constexpr,
                   TMA: tl.constexpr, QUANT: tl.constexpr):
    """Online softmax over key tiles [start, stop); MASKED applies causal/window/length masks."""
    n_offs = tl.arange(0, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        kpos = n0 + n_offs
        if TMA:  # k_ptr/v_ptr are descriptors of the cache as rows [blocks * Hkv * page, D]
            block = tl.load(table + n0 // PAGE)
            row0 = block * rows_per_block + kv_row + n0 % PAGE
            m_i, l_i, acc = _tma_update(q, m_i, l_i, acc, k_ptr, v_ptr, row0, kpos, hi, qpos,
                                        qk_scale, slopes, window, k_scale, v_scale, MASKED,
                                        WINDOW, ALIBI, PRECISION, QUANT)
        else:
            if BLOCK_N <= PAGE:  # the tile lies in one block: one table entry
                block = tl.load(table + n0 // PAGE).to(tl.int64)
                base = block * c_stride_b + (n0 % PAGE) * c_stride_r + cache
            else:  # the tile spans blocks: one entry per row (past the end: scratch block 0)
                blocks = tl.load(table + kpos // PAGE, mask=kpos < hi, other=0).to(tl.int64)
                base = blocks[:, None] * c_stride_b \
                    + (kpos % PAGE - n_offs)[:, None] * c_stride_r + cache
            if MASKED:
                kmask = kpos < hi
                s = _tile_scores(q, k_ptr + base, kpos, kmask, d_mask, qk_scale, slopes, k_scale,
                                 ALIBI, PRECISION, QUANT)
                allowed = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
                if WINDOW:
                    allowed &= kpos[None, :] > qpos[:, None] - window
                m_i, l_i, acc = _online_update(s, allowed, m_i, l_i, acc, v_ptr + base, kmask,
                                               d_mask, v_scale, PRECISION, q.dtype, QUANT)
            else:
                m_i, l_i, acc = _unmasked_update(q, m_i, l_i, acc, k_ptr + base, v_ptr + base,
                                                 kpos, d_mask, qk_scale, slopes, k_scale,
                                                 v_scale, ALIBI, PRECISION, QUANT)
    return m_i, l_i, acc


@triton.jit
def _tma_update(q, m_i, l_i, acc, k_desc, v_desc, row0, kpos, hi, qpos, qk_scale, slopes, window,
                k_scale, v_scale, MASKED: tl.constexpr, WINDOW: tl.constexpr,
                ALIBI: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr):
    """One key tile through the tensor-memory accelerator (whole rows: head_dim == D_PAD)."""
    k = _dequant(k_desc.load([row0, 0]), k_scale, q.dtype, QUANT)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if ALIBI:
        s += slopes[:, None] * kpos.to(tl.float32)[None, :]
    if MASKED:  # rows past the context are stale or zero, finite either way: masked here
        allowed = (kpos[None, :] <= qpos[:, None]) & (kpos < hi)[None, :]
        if WINDOW:
            allowed &= kpos[None, :] > qpos[:, None] - window
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = _dequant(v_desc.load([row0, 0]), v_scale, q.dtype, QUANT)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _unmasked_update(q, m_i, l_i, acc, k_ptrs, v_ptrs, kpos, d_mask, qk_scale, slopes, k_scale,
                     v_scale, ALIBI: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr):
    k = _dequant(tl.load(k_ptrs, mask=d_mask[None, :], other=0.0), k_scale, q.dtype, QUANT)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if ALIBI:
        s += slopes[:, None] * kpos.to(tl.float32)[None, :]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = _dequant(tl.load(v_ptrs, mask=d_mask[None, :], other=0.0), v_scale, q.dtype, QUANT)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit(do_not_specialize=["window", "rows_per_block", "table_stride"])  # as _decode_kernel
def _prefill_kernel(q_ptr, q_stride_t, q_stride_h, k_ptr, v_ptr, c_stride_b, c_stride_h,
                    c_stride_r, table_ptr, table_stride, ctx_ptr, starts_ptr, lens_ptr, out_ptr,
                    o_stride_t, o_stride_h, slopes_ptr, k_scale_ptr, v_scale_ptr, o_scale_ptr,
                    pqs_ptr, qk_scale, window, rows_per_block, GROUP: tl.constexpr,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIBI: tl.constexpr,
                    WINDOW: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                    QUANT: tl.constexpr, FP8_OUT: tl.constexpr, SMOOTH: tl.constexpr):
    b = tl.program_id(0)
    mt = tl.num_programs(1) - 1 - tl.program_id(1)  # causal: the heaviest tiles start first
    h = tl.program_id(2)
    q_len = tl.load(lens_ptr + b)
    if mt * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    q_start = tl.load(starts_ptr + b).to(tl.int64)
    first = ctx - q_len + mt * BLOCK_M  # position of the tile's first query
    m_offs = tl.arange(0, BLOCK_M)
    d_offs = tl.arange(0, D_PAD)
    n_offs = tl.arange(0, BLOCK_N)
    d_mask = d_offs < HEAD_DIM
    m_mask = mt * BLOCK_M + m_offs < q_len
    qpos = first + m_offs
    rows = q_start + mt * BLOCK_M + m_offs
    q = tl.load(q_ptr + rows[:, None] * q_stride_t + h * q_stride_h + d_offs[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    slopes = tl.zeros([BLOCK_M], tl.float32)
    if ALIBI:
        slopes += tl.load(slopes_ptr + h) * 1.4426950408889634
    k_scale, v_scale = _load_scales(k_scale_ptr, v_scale_ptr, QUANT)
    kvh = h // GROUP
    hi = tl.minimum(ctx, first + BLOCK_M)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = table_ptr + b.to(tl.int64) * table_stride
    cache = kvh * c_stride_h + n_offs[:, None] * c_stride_r + d_offs[None, :]
    # Key tiles [lo, full_lo) straddle the window's edge, [full_lo, diag) are visible to every
    # query of the tile (no mask), [diag, hi) straddle the causal diagonal.
    diag = (first // BLOCK_N) * BLOCK_N
    lo = 0
    full_lo = 0
    if WINDOW:
        lo = (tl.maximum(0, first - window + 1) // BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(diag, tl.cdiv(tl.maximum(0, first + BLOCK_M - window), BLOCK_N)
                             * BLOCK_N)
        m_i, l_i, acc = _prefill_tiles(q, m_i, l_i, acc, k_ptr, v_ptr, table, cache, c_stride_b,
                                       c_stride_r, lo, full_lo, hi, qpos, d_mask, qk_scale, slopes,
                                       window, rows_per_block, kvh * PAGE, k_scale, v_scale, PAGE,
                                       BLOCK_N, True, WINDOW, ALIBI, PRECISION, TMA, QUANT)
    m_i, l_i, acc = _prefill_tiles(q, m_i, l_i, acc, k_ptr, v_ptr, table, cache, c_stride_b,
                                   c_stride_r, full_lo, diag, hi, qpos, d_mask, qk_scale, slopes,
                                   window, rows_per_block, kvh * PAGE, k_scale, v_scale, PAGE,
                                   BLOCK_N, False, WINDOW, ALIBI, PRECISION, TMA, QUANT)
    m_i, l_i, acc = _prefill_tiles(q, m_i, l_i, acc, k_ptr, v_ptr, table, cache, c_stride_b,
                                   c_stride_r, diag, hi, hi, qpos, d_mask, qk_scale, slopes,
                                   window, rows_per_block, kvh * PAGE, k_scale, v_scale, PAGE,
                                   BLOCK_N, True, WINDOW, ALIBI, PRECISION, TMA, QUANT)
    _output(acc / l_i[:, None],
            out_ptr + rows[:, None] * o_stride_t + h * o_stride_h + d_offs[None, :],
            m_mask[:, None] & d_mask[None, :], o_scale_ptr, pqs_ptr,
            h * HEAD_DIM + d_offs[None, :], q_ptr.dtype.element_ty, FP8_OUT, SMOOTH)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, tma) for 16-bit head_dim <= 128, the winner of the
# sweep in benchmarks/gpu.py on an H200 (118 us vs 125 us without TMA for a 2,048-token causal
# prompt, 32/8 heads of 128; GPU_NOTES.md). TMA tiles need whole power-of-two rows and a tile
# inside one page; other shapes take the same tiles through pointer loads.
PREFILL_CONFIG_16BIT = (64, 64, 4, 3, True)


def prefill_config(d: int, d_pad: int, dtype: torch.dtype, page: int, cuda: bool) -> tuple:
    """Default tiles; TMA only on CUDA devices (Triton's CPU interpreter has no descriptors)."""
    if dtype == torch.float32 or d_pad > 128:
        return 64, 64, 4, 2
    block_m, block_n, warps, stages, tma = PREFILL_CONFIG_16BIT
    return block_m, block_n, warps, stages, tma and cuda and d == d_pad and block_n <= page


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                            q_starts: torch.Tensor, q_lens: torch.Tensor, out: torch.Tensor, *,
                            scale: float, alibi_slopes: torch.Tensor | None = None,
                            sliding_window: int | None = None, max_q_len: int | None = None,
                            max_ctx_len: int | None = None,
                            config: tuple | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None,
                            quant_scale: torch.Tensor | None = None,
                            pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``config``: (BLOCK_M, BLOCK_N, num_warps, num_stages[, tma]), default
    :func:`prefill_config`; ``tma`` loads key/value tiles through tensor descriptors.
    ``quant_scale`` (and ``pre_quant_scale``): ``out`` is float8_e4m3fn, the FP8 input of the
    projection after (triton_reference's contract)."""
    page, _ = _check(q, k_cache, v_cache)
    check_fp8_output(out, quant_scale, pre_quant_scale)
    o_scale, pqs = _output_args(quant_scale, pre_quant_scale, q.device, ctx_lens)
    quant, k_arg, v_arg = _scales(k_cache, k_scale, v_scale, ctx_lens)
    b, hq, d = q_starts.shape[0], q.shape[1], q.shape[2]
    if b == 0:
        return out
    max_q = max_q_len if max_q_len is not None else q.shape[0]
    d_pad = max(16, triton.next_power_of_2(d))
    block_m, block_n, warps, stages, *tma = config or prefill_config(d, d_pad, q.dtype, page,
                                                                      q.is_cuda)
    tma = bool(tma and tma[0])
    if tma and (d_pad != d or block_n > page or not k_cache.is_contiguous()):
        raise ValueError("paged attention (triton): TMA tiles need head_dim a power of two, "
                         "BLOCK_N <= page_size and contiguous caches")
    keys, values = k_cache, v_cache
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        keys = TensorDescriptor.from_tensor(k_cache.view(-1, d), [block_n, d])
        values = TensorDescriptor.from_tensor(v_cache.view(-1, d), [block_n, d])
    slopes = alibi_slopes if alibi_slopes is not None else ctx_lens
    grid = (b, triton.cdiv(max_q, block_m), hq)
    _prefill_kernel[grid](
        q, q.stride(0), q.stride(1), keys, values, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables, block_tables.stride(0), ctx_lens, q_starts, q_lens, out,
        out.stride(0), out.stride(1), slopes, k_arg, v_arg, o_scale, pqs, scale * LOG2E,
        sliding_window or 0, k_cache.stride(0) // d,
        GROUP=hq // k_cache.shape[1], HEAD_DIM=d, D_PAD=d_pad, PAGE=page, BLOCK_M=block_m,
        BLOCK_N=block_n, ALIBI=alibi_slopes is not None, WINDOW=sliding_window is not None,
        PRECISION=_precision(q.dtype), TMA=tma, QUANT=quant, FP8_OUT=quant_scale is not None,
        SMOOTH=pre_quant_scale is not None, num_warps=warps, num_stages=stages)
    return out


@triton.jit(do_not_specialize=["n"])  # a prompt's length: any number (16 | n compiled its own)
def _gather_kv_kernel(k_ptr, v_ptr, table_ptr, k_out, v_out, n, c_stride_b, c_stride_h,
                      c_stride_r, o_stride_h, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                      PAGE: tl.constexpr):
    """Program (j, h, kv): page j of key head h of the keys (kv 0) or values (kv 1), rows past
    ``n`` zero."""
    j, h = tl.program_id(0), tl.program_id(1)
    rows = j * PAGE + tl.arange(0, PAGE)
    d = tl.arange(0, D_PAD)
    block = tl.load(table_ptr + j, mask=j * PAGE < n, other=0).to(tl.int64)
    src = block * c_stride_b + h * c_stride_h + (rows % PAGE)[:, None] * c_stride_r + d[None, :]
    dst = h * o_stride_h + rows[:, None] * HEAD_DIM + d[None, :]
    d_ok = (d < HEAD_DIM)[None, :]
    ok = (rows < n)[:, None] & d_ok
    if tl.program_id(2) == 0:
        tl.store(k_out + dst, tl.load(k_ptr + src, mask=ok, other=0.0), mask=d_ok)
    else:
        tl.store(v_out + dst, tl.load(v_ptr + src, mask=ok, other=0.0), mask=d_ok)


def gather_fresh_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, n: int,
                    length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first ``n`` cached keys and values, read through its block ``table`` (int32,
    at least ``cdiv(n, page)`` entries) into contiguous ``[1, Hkv, length, D]`` tensors, zero past
    ``n`` (``length``: a multiple of the page size, at least ``n``): one launch for both."""
    _, hkv, page, d = k_cache.shape
    if length % page or length < n:
        raise ValueError(f"gather_fresh_kv: length {length} must be a multiple of the page "
                         f"size {page} and at least n = {n}")
    k = torch.empty(1, hkv, length, d, dtype=k_cache.dtype, device=k_cache.device)
    v = torch.empty_like(k)
    _gather_kv_kernel[(length // page, hkv, 2)](
        k_cache, v_cache, table, k, v, n, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), k.stride(1), HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)),
        PAGE=page)
    return k, v
