"""The committed INT4 Gluon kernel with two constexpr items for an experiment: ``FOLD`` (the
conversion's bias folded into the MMAs' accumulator) and ``DRY_TILE`` (a probe: every program
reads the words of the first ``DRY_TILE`` tiles, from L2, so that its time is the kernel's
arithmetic with cache-resident words). Llama-3.1-8B shapes, group 128, bf16.

    PYTHONPATH=. python3 benchmarks/issue12_forty_second_session/int4_fold.py --out DIR \\
        [--ms 1,8,16,64]                      (the sweep: us a call, differences to the kernel)
    PYTHONPATH=. python3 benchmarks/issue12_forty_second_session/int4_fold.py --out DIR \\
        --timeline fold|committed|ring:gate_up=1x2x4,...   (batch-1 INT4 g128, EngineCore)
    PYTHONPATH=. python3 benchmarks/issue12_forty_second_session/int4_fold.py --out DIR \
        --ring 1x2x4,1x4x8,...               (W x U x STAGES: the TMA ring at one token)
    PYTHONPATH=. python3 benchmarks/issue12_forty_second_session/int4_fold.py --compile_only

Why: the warp-specialized kernel of ``int4_ws.py`` (runs 1-5 of this session) showed the
committed kernel's arithmetic, not its bytes in flight, near its time: the WS consumers'
arithmetic alone (no word or scale traffic) took 25.5 us on gate_up, the committed kernel 23.5
with its traffic. Of a chunk's ~78 instructions a lane, 44 convert its four words: per word one
LOP3 and three SHF + LOP3 put the nibbles in 16-bit pairs as C + q (C = 136 in bfloat16, 1032 in
float16), and four HFMA2 take C away. FOLD drops the HFMA2s: the MMAs multiply (C + q) and
start their chain from E = -C * sum(x) of the chunk, four more MMAs of a constant A (-C pairs)
with the same activations, so that D = E + sum((C + q) x) = sum(q x). Products are exact in
float32; the sums are float32, so D differs from the kernel's by the rounding of sums ~C/|q|
times larger (bf16: about 2^-17 of the result; the outputs, rounded to 16 bits, agree but for
rare last-bit ties). 28 + 4 + 4 + 4 instructions a chunk instead of 44 + 4 + 4.

Measured and not kept (benchmarks/GPU_NOTES.md, forty-second session, run 6, one H100): FOLD
gained only on gate_up at 8 tokens, and batch-1 INT4 through EngineCore lost 2.1% (461 against
471 tok/s, 17 alternating runs each). With the words from L2 (DRY_TILE 1) gate_up took 14.6 us
against 23.1 from DRAM: the kernel waits on memory, not on its arithmetic. ``--ring`` (run 7):
the thirty-seventh session's TMA ring (``STAGES``) in one-warp programs, slower at every shape.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from kiln.plugins.quant_linear import gluon_kernels as gk
from kiln.plugins.quant_linear.triton_kernels import INT4_PAIR_CONSTANTS

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
GROUP = 128
_ROWS = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def _convert_nofma_asm(bf16: bool) -> str:
    """PTX: one word ($4) -> its four 16-bit pairs C + q ($0..$3), the LOP3s of the kernel's
    conversion without its HFMA2s."""
    magic = INT4_PAIR_CONSTANTS["bf16" if bf16 else "f16"][0]
    lines = [f"mov.b32 c, {magic};", "lop3.b32 $0, $4, 0x000F000F, c, 0x6A;"]
    for r in (1, 2, 3):
        lines += [f"shr.u32 u, $4, {4 * r};", f"lop3.b32 ${r}, u, 0x000F000F, c, 0x6A;"]
    return "{\n.reg .b32 c, u;\n" + "\n".join(lines) + "\n}"


def _mma_fold_asm(bf16: bool) -> str:
    """PTX: E = (-C pairs) x B over the chunk's four k-tiles, then the four chained MMAs of the
    (C + q) pairs from E; outputs the four float32 sums (as _mma_asm's operands)."""
    kind = "bf16" if bf16 else "f16"
    neg = INT4_PAIR_CONSTANTS[kind][2]
    lines = [f"mov.b32 nc, {neg};"] + [f"mov.f32 d{i}, 0f00000000;" for i in range(4)]
    for j in range(4):
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{d0, d1, d2, d3}}, "
                     f"{{nc, nc, nc, nc}}, {{${20 + 2 * j}, ${21 + 2 * j}}}, {{d0, d1, d2, d3}};")
    for j in range(4):
        a = ", ".join(f"${4 + 4 * j + r}" for r in range(4))
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{d0, d1, d2, d3}}, "
                     f"{{{a}}}, {{${20 + 2 * j}, ${21 + 2 * j}}}, {{d0, d1, d2, d3}};")
    lines += [f"mov.b32 ${i}, d{i};" for i in range(4)]
    return "{\n.reg .f32 d0, d1, d2, d3;\n.reg .b32 nc;\n" + "\n".join(lines) + "\n}"


_NOFMA_BF16 = gl.constexpr(_convert_nofma_asm(True))
_NOFMA_F16 = gl.constexpr(_convert_nofma_asm(False))
_FOLD_BF16 = gl.constexpr(_mma_fold_asm(True))
_FOLD_F16 = gl.constexpr(_mma_fold_asm(False))


@gluon.jit
def _pairs(word, S2: gl.constexpr, BF16: gl.constexpr, FOLD: gl.constexpr):
    if FOLD:
        asm: gl.constexpr = _NOFMA_BF16 if BF16 else _NOFMA_F16
    else:
        asm: gl.constexpr = gk._CONVERT_BF16 if BF16 else gk._CONVERT_F16
    a0, a1, a2, a3 = gl.inline_asm_elementwise(
        asm, "=r,=r,=r,=r,r", [gl.convert_layout(word, S2)], dtype=(gl.int32,) * 4,
        is_pure=True, pack=1)
    return (gl.expand_dims(a0, 2), gl.expand_dims(a1, 2), gl.expand_dims(a2, 2),
            gl.expand_dims(a3, 2))


@gluon.jit
def _chunk(acc0, acc1, acc2, acc3, wv, xv, s_lo, s_hi, S2: gl.constexpr, S3: gl.constexpr,
           BF16: gl.constexpr, FOLD: gl.constexpr):
    w0, w1, w2, w3 = gk._split4(wv)
    a00, a01, a02, a03 = _pairs(w0, S2, BF16, FOLD)
    a10, a11, a12, a13 = _pairs(w1, S2, BF16, FOLD)
    a20, a21, a22, a23 = _pairs(w2, S2, BF16, FOLD)
    a30, a31, a32, a33 = _pairs(w3, S2, BF16, FOLD)
    xe, xo = gl.split(gl.reshape(xv, xv.shape[:-1] + [4, 2]))
    x0, x2, x4, x6 = gk._split4(xe)
    x1, x3, x5, x7 = gk._split4(xo)
    if FOLD:
        mma: gl.constexpr = _FOLD_BF16 if BF16 else _FOLD_F16
    else:
        mma: gl.constexpr = gk._MMA_BF16 if BF16 else gk._MMA_F16
    d0, d1, d2, d3 = gl.inline_asm_elementwise(
        mma, gk._MMA_CONSTRAINTS,
        [a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33,
         gl.convert_layout(x0, S3), gl.convert_layout(x1, S3), gl.convert_layout(x2, S3),
         gl.convert_layout(x3, S3), gl.convert_layout(x4, S3), gl.convert_layout(x5, S3),
         gl.convert_layout(x6, S3), gl.convert_layout(x7, S3)],
        dtype=(gl.float32,) * 4, is_pure=True, pack=1)
    s_lo = gl.expand_dims(gl.convert_layout(s_lo, S2), 2)
    s_hi = gl.expand_dims(gl.convert_layout(s_hi, S2), 2)
    return acc0 + d0 * s_lo, acc1 + d1 * s_lo, acc2 + d2 * s_hi, acc3 + d3 * s_hi


@gluon.jit
def _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi, U: gl.constexpr, S2: gl.constexpr,
            S3: gl.constexpr, BF16: gl.constexpr, FOLD: gl.constexpr):
    w0, w1, w2, w3 = gk._split_u(wv, U, 3)
    x0, x1, x2, x3 = gk._split_u(xv, U, 4)
    l0, l1, l2, l3 = gk._split_u(slo, U, 2)
    h0, h1, h2, h3 = gk._split_u(shi, U, 2)
    acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w0, x0, l0, h0, S2, S3, BF16, FOLD)
    if U >= 2:
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w1, x1, l1, h1, S2, S3, BF16,
                                        FOLD)
    if U == 4:
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w2, x2, l2, h2, S2, S3, BF16,
                                        FOLD)
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w3, x3, l3, h3, S2, S3, BF16,
                                        FOLD)
    return acc0, acc1, acc2, acc3


@gluon.jit
def _ring_issue(w_desc, ring, up_ring, ready, row0, up_row0, it, n_iter, WU: gl.constexpr,
                STAGES: gl.constexpr, SILU_MUL: gl.constexpr):
    """TMA of iteration ``it``'s words (``WU`` chunk rows of the tile's, and of its up tile's)
    into ring slot ``it % STAGES``, counted on that slot's barrier; none past the last."""
    slot = it % STAGES
    ok = it < n_iter
    bar = ready.index(slot)
    mbarrier.expect(bar, (2 if SILU_MUL else 1) * WU * 512, pred=ok)
    tma.async_copy_global_to_shared(w_desc, [row0 + it * WU, 0], bar, ring.index(slot), pred=ok)
    if SILU_MUL:
        tma.async_copy_global_to_shared(w_desc, [up_row0 + it * WU, 0], bar, up_ring.index(slot),
                                        pred=ok)


@gluon.jit
def _ring_take(w_desc, ring, up_ring, words, up_words, ready, row0, up_row0, it, n_iter,
               W: gl.constexpr, U: gl.constexpr, STAGES: gl.constexpr, SILU_MUL: gl.constexpr,
               LW: gl.constexpr):
    """Iteration ``it``'s words out of its slot as [W, 32, 4, U] (and its up tile's), then the
    slot refilled with iteration ``it + STAGES``'s (with W = 1 the barrier is the warp's)."""
    slot = it % STAGES
    mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
    wv = gl.permute(words.index(slot).load(LW), [0, 2, 3, 1])
    wu = wv
    if SILU_MUL:
        wu = gl.permute(up_words.index(slot).load(LW), [0, 2, 3, 1])
    gl.thread_barrier()
    fence_async_shared()
    _ring_issue(w_desc, ring, up_ring, ready, row0, up_row0, it + STAGES, n_iter, W * U, STAGES,
                SILU_MUL)
    return wv, wu


# the committed kernel (kiln/plugins/quant_linear/gluon_kernels.py) with FOLD and DRY_TILE
@gluon.jit(do_not_specialize=["m"])
def _probe_kernel(x_ptr, w_ptr, w_desc, ws_ptr, b_ptr, y_ptr, m, k, stride_x32, stride_ym,
                  GROUP: gl.constexpr, W: gl.constexpr, U: gl.constexpr,
                  T: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                  PDL: gl.constexpr, SILU_MUL: gl.constexpr, FOLD: gl.constexpr,
                  DRY_TILE: gl.constexpr, STAGES: gl.constexpr = 0):
    L4: gl.constexpr = gl.BlockedLayout([1, 1, 4, U], [1, 32, 1, 1], [W, 1, 1, 1], [2, 3, 1, 0])
    L5X: gl.constexpr = gl.BlockedLayout([1, 1, T, 8, U], [1, 32, 1, 1, 1], [W, 1, 1, 1, 1],
                                         [3, 4, 2, 1, 0])
    L3S: gl.constexpr = gl.BlockedLayout([1, 1, U], [1, 32, 1], [W, 1, 1], [2, 1, 0])
    L4T: gl.constexpr = gl.BlockedLayout([1, 1, T, 4], [1, 32, 1, 1], [W, 1, 1, 1], [3, 2, 1, 0])
    S3: gl.constexpr = gl.SliceLayout(3, L4T)
    S2: gl.constexpr = gl.SliceLayout(2, S3)
    token0 = gl.program_id(0) * (8 * T)
    tile = gl.program_id(1)
    m_left = m - token0
    n_chunks = k // 64
    n_groups = k // GROUP
    n_iter = n_chunks // (U * W)
    w_tile = tile
    if DRY_TILE:
        w_tile = tile % DRY_TILE

    wi = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    li = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    ji = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
    ui = gl.arange(0, U, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    w_at = (w_ptr.to(gl.pointer_type(gl.int32)) + w_tile.to(gl.int64) * (n_chunks * 128)
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(wi * (128 * U), 1)
                                            + gl.expand_dims(li * 4, 0), 2)
                             + gl.expand_dims(gl.expand_dims(ji, 0), 1), 3)
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(ui * 128, 0), 1), 2))

    X4: gl.constexpr = gl.SliceLayout(4, L5X)
    X43: gl.constexpr = gl.SliceLayout(3, X4)
    D0: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, X43))
    D1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, X43))
    D2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, X43))
    D3: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, X4)))
    X3: gl.constexpr = gl.SliceLayout(3, L5X)
    D4: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, X3)))
    wx = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(
        gl.arange(0, W, layout=D0), 1), 2), 3), 4)
    lx = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(
        gl.arange(0, 32, layout=D1), 0), 2), 3), 4)
    tx = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(
        gl.arange(0, T, layout=D2), 0), 1), 3), 4)
    ex = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(
        gl.arange(0, 8, layout=D3), 0), 1), 2), 4)
    ux = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(
        gl.arange(0, U, layout=D4), 0), 1), 2), 3)
    tok = tx * 8 + lx // 4
    x_at = (x_ptr.to(gl.pointer_type(gl.int32)) + token0.to(gl.int64) * stride_x32
            + tok * stride_x32 + (lx % 4) * 8 + wx * (32 * U) + ex + ux * 32)
    x_ok = (tok < m_left) & (wx >= 0) & (ex >= 0) & (ux >= 0)

    ws_ = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3S)))
    ls_ = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3S)))
    us_ = gl.arange(0, U, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3S)))
    rows = tile * 16 + ls_ // 4
    s_at = (ws_ptr + gl.expand_dims(gl.expand_dims(rows.to(gl.int64) * n_groups, 0), 2)
            + gl.expand_dims(gl.expand_dims((ws_ * (64 * U)) // GROUP, 1), 2)
            + gl.expand_dims(gl.expand_dims((us_ * 64) // GROUP, 0), 1))
    S_STEP: gl.constexpr = W * U * 64 // GROUP

    acc0 = gl.zeros([W, 32, T], gl.float32, S3)
    acc1 = gl.zeros([W, 32, T], gl.float32, S3)
    acc2 = gl.zeros([W, 32, T], gl.float32, S3)
    acc3 = gl.zeros([W, 32, T], gl.float32, S3)
    up_w = gl.num_programs(1).to(gl.int64) * (n_chunks * 128)
    if DRY_TILE:
        up_w = 0
    up_s = gl.num_programs(1).to(gl.int64) * (16 * n_groups)
    up0 = acc0
    up1 = acc1
    up2 = acc2
    up3 = acc3
    if STAGES > 0:  # the words by TMA into a ring of STAGES slots, the first before the wait
        WU: gl.constexpr = W * U
        ring = gl.allocate_shared_memory(gl.int32, [STAGES, WU, 128], w_desc.layout)
        up_ring = ring
        if SILU_MUL:
            up_ring = gl.allocate_shared_memory(gl.int32, [STAGES, WU, 128], w_desc.layout)
        PLAIN: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])
        words = ring._reinterpret(gl.int32, [STAGES, W, U, 32, 4], PLAIN)
        up_words = up_ring._reinterpret(gl.int32, [STAGES, W, U, 32, 4], PLAIN)
        LW: gl.constexpr = gl.BlockedLayout([1, U, 1, 4], [1, 1, 32, 1], [W, 1, 1, 1],
                                            [3, 1, 2, 0])
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
        row0 = w_tile * n_chunks
        up_row0 = row0
        if not DRY_TILE:
            up_row0 = row0 + gl.num_programs(1) * n_chunks
        for st in gl.static_range(STAGES):
            _ring_issue(w_desc, ring, up_ring, ready, row0, up_row0, st, n_iter, WU, STAGES,
                        SILU_MUL)
        slo = gl.load(s_at)
        shi = gl.load(s_at + 8 * n_groups)
        sulo = slo
        suhi = shi
        if SILU_MUL:
            sulo = gl.load(s_at + up_s)
            suhi = gl.load(s_at + up_s + 8 * n_groups)
    else:
        wv, slo, shi = gk._tile_loads(w_at, s_at, n_groups)
        if SILU_MUL:
            wu, sulo, suhi = gk._tile_loads(w_at + up_w, s_at + up_s, n_groups)
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)
    xv = gl.load(x_at, mask=x_ok, other=0)
    if STAGES > 0:
        for it in range(n_iter - 1):
            wv, wu = _ring_take(w_desc, ring, up_ring, words, up_words, ready, row0, up_row0,
                                it, n_iter, W, U, STAGES, SILU_MUL, LW)
            x_at += W * U * 32
            s_at += S_STEP
            xv_next = gl.load(x_at, mask=x_ok, other=0)
            slo_next = gl.load(s_at)
            shi_next = gl.load(s_at + 8 * n_groups)
            if SILU_MUL:
                sulo_next = gl.load(s_at + up_s)
                suhi_next = gl.load(s_at + up_s + 8 * n_groups)
            acc0, acc1, acc2, acc3 = _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi, U, S2,
                                             S3, BF16, FOLD)
            slo = slo_next
            shi = shi_next
            if SILU_MUL:
                up0, up1, up2, up3 = _chunks(up0, up1, up2, up3, wu, xv, sulo, suhi, U, S2, S3,
                                             BF16, FOLD)
                sulo = sulo_next
                suhi = suhi_next
            xv = xv_next
        wv, wu = _ring_take(w_desc, ring, up_ring, words, up_words, ready, row0, up_row0,
                            n_iter - 1, n_iter, W, U, STAGES, SILU_MUL, LW)
    else:
        for _ in range(n_iter - 1):
            w_at += W * U * 128
            x_at += W * U * 32
            s_at += S_STEP
            wv_next = gk._words(w_at)
            xv_next = gl.load(x_at, mask=x_ok, other=0)
            slo_next = gl.load(s_at)
            shi_next = gl.load(s_at + 8 * n_groups)
            if SILU_MUL:
                wu_next, sulo_next, suhi_next = gk._tile_loads(w_at + up_w, s_at + up_s,
                                                               n_groups)
            acc0, acc1, acc2, acc3 = _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi, U, S2,
                                             S3, BF16, FOLD)
            wv = wv_next
            slo = slo_next
            shi = shi_next
            if SILU_MUL:
                up0, up1, up2, up3 = _chunks(up0, up1, up2, up3, wu, xv, sulo, suhi, U, S2, S3,
                                             BF16, FOLD)
                wu = wu_next
                sulo = sulo_next
                suhi = suhi_next
            xv = xv_next
    acc0, acc1, acc2, acc3 = _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi, U, S2, S3, BF16,
                                     FOLD)
    y0, y1, y2, y3 = gk._row_sums(b_ptr, acc0, acc1, acc2, acc3, tile, HAS_BIAS)
    if SILU_MUL:
        up0, up1, up2, up3 = _chunks(up0, up1, up2, up3, wu, xv, sulo, suhi, U, S2, S3, BF16,
                                     FOLD)
        u0, u1, u2, u3 = gk._row_sums(b_ptr, up0, up1, up2, up3, tile + gl.num_programs(1),
                                      HAS_BIAS)
        dtype: gl.constexpr = y_ptr.dtype.element_ty
        y0 = gk._silu_mul(y0, u0, dtype)
        y1 = gk._silu_mul(y1, u1, dtype)
        y2 = gk._silu_mul(y2, u2, dtype)
        y3 = gk._silu_mul(y3, u3, dtype)
    gk._store_tile(y_ptr + token0.to(gl.int64) * stride_ym, y0, y1, y2, y3, tile, m_left,
                   stride_ym, T)


def probe_linear(x, words, ws, group_size, bias, config=None, silu_mul=False, fold=1,
                 dry_tile=0, stages=0):
    """gk.int4_fragments_linear through :func:`_probe_kernel`; ``stages`` > 0: the words by
    TMA through a ring of that many slots (the thirty-seventh session's, here for one-warp
    programs, whose barrier is the warp's)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    m, k = x.shape
    n = 16 * words.shape[0]
    tiles = gk.token_tiles(m)
    warps, chunks = config or gk.fragments_config(n, k, group_size, tiles)
    out_tiles = n // 32 if silu_mul else n // 16
    y = torch.empty((m, 16 * out_tiles), dtype=x.dtype, device=x.device)
    pdl = gk.pdl_enabled(x.device)
    desc = words
    if stages:
        rows = words.view(-1, 128)
        desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()),
                                [warps * chunks, 128], _ROWS)
    _probe_kernel[(triton.cdiv(m, gk.TOKENS * tiles), out_tiles)](
        x, words, desc, ws, bias if bias is not None else ws, y, m, k, x.stride(0) // 2,
        y.stride(0), GROUP=group_size, W=warps, U=chunks, T=tiles,
        BF16=x.dtype == torch.bfloat16, HAS_BIAS=bias is not None, PDL=pdl, SILU_MUL=silu_mul,
        FOLD=bool(fold), DRY_TILE=dry_tile, STAGES=stages, num_warps=warps, launch_pdl=pdl)
    return y


def _reference(x, words, ws, n, k, silu):
    """float64 x @ W^T of the fragment words (unpacked by the layout module's inverse)."""
    from kiln.plugins.quant_linear.layout import unpack_fragments
    q = unpack_fragments(words).double()
    w = q * ws.double().repeat_interleave(GROUP, dim=1)
    y = x.double() @ w.T
    if silu:
        g, u = y[:, : n // 2].to(x.dtype).double(), y[:, n // 2:].to(x.dtype).double()
        y = g / (1 + torch.exp(-g)) * u
    return y


def sweep(args) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quant_kernels import fragment_copies, time_calls
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        silu = name == "gate_up"
        copies = fragment_copies(n, k, GROUP)
        nbytes = copies[0][0].numel() * 4 + copies[0][1].numel() * 4
        for m in map(int, args.ms.split(",")):
            torch.manual_seed(m)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = _reference(x, copies[0][0], copies[0][1], n, k, silu)
            base = gk.int4_fragments_linear(x, copies[0][0], copies[0][1], GROUP, None,
                                            silu_mul=silu)
            for label, fold, dry in (("committed", None, 0), ("probe fold 0", 0, 0),
                                     ("fold", 1, 0), ("dry fold 0", 0, 1), ("dry fold", 1, 1)):
                if fold is None:
                    def fn(c, x=x, silu=silu):
                        return gk.int4_fragments_linear(x, c[0], c[1], GROUP, None,
                                                        silu_mul=silu)
                else:
                    def fn(c, x=x, silu=silu, fold=fold, dry=dry):
                        return probe_linear(x, c[0], c[1], GROUP, None, None, silu, fold, dry)
                try:
                    y = fn(copies[0])
                    torch.cuda.synchronize()
                    sec = time_calls([lambda c=c, fn=fn: fn(c) for c in copies])
                except Exception as e:
                    row = dict(shape=name, m=m, config=label, error=f"{type(e).__name__}: "
                               f"{str(e).splitlines()[0][:300] if str(e) else ''}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                err = (y.double() - ref).abs()
                scale = ref.abs().max().item()
                row = dict(shape=name, m=m, config=label, us=round(sec * 1e6, 2),
                           tbps=round(nbytes / sec / 1e12, 3),
                           equal=bool(torch.equal(y, base)),
                           differ=int((y != base).sum()), finite=bool(torch.isfinite(y).all()),
                           max_err_rel=float(err.max().item() / scale),
                           base_err_rel=float((base.double() - ref).abs().max().item() / scale))
                rows.append(row)
                print(json.dumps(row), flush=True)
        del copies
        torch.cuda.empty_cache()
    return rows


def ring_sweep(args) -> list[dict]:
    """One token: the committed kernel, the register kernel at each (W, U) of ``--ring``, and
    the TMA ring at (W, U, STAGES), compared bit for bit with the register kernel at (W, U)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quant_kernels import fragment_copies, time_calls
    specs = [tuple(map(int, c.split("x"))) for c in args.ring.split(",")]
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        silu = name == "gate_up"
        copies = fragment_copies(n, k, GROUP)
        nbytes = copies[0][0].numel() * 4 + copies[0][1].numel() * 4
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        cases = [("committed", None)] + [(f"{w}x{u}", (w, u, 0)) for w, u in
                                         dict.fromkeys((w, u) for w, u, _ in specs)]
        cases += [(f"{w}x{u}x{st}", (w, u, st)) for w, u, st in specs]
        for label, cfg in cases:
            if cfg is None:
                def fn(c, x=x, silu=silu):
                    return gk.int4_fragments_linear(x, c[0], c[1], GROUP, None, silu_mul=silu)
            else:
                def fn(c, x=x, silu=silu, cfg=cfg):
                    return probe_linear(x, c[0], c[1], GROUP, None, cfg[:2], silu, 0, 0, cfg[2])
            try:
                y = fn(copies[0])
                torch.cuda.synchronize()
                want = gk.int4_fragments_linear(x, copies[0][0], copies[0][1], GROUP, None,
                                                cfg[:2] if cfg else None, silu_mul=silu)
                sec = time_calls([lambda c=c, fn=fn: fn(c) for c in copies])
            except Exception as e:
                row = dict(shape=name, config=label, error=f"{type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300] if str(e) else ''}")
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            row = dict(shape=name, m=1, config=label, us=round(sec * 1e6, 2),
                       tbps=round(nbytes / sec / 1e12, 3), equal=bool(torch.equal(y, want)))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del copies
        torch.cuda.empty_cache()
    return rows


def timeline(which: str, out: Path) -> None:
    """batch1_timeline.py's INT4 g128 run: ``committed``; ``fold`` (every call folded); or
    ``ring:shape=WxUxSTAGES,...`` (those shapes through the TMA ring at one token tile)."""
    if which.startswith("ring:"):
        table = {SHAPES[name]: tuple(map(int, cfg.split("x"))) for name, cfg in
                 (item.split("=") for item in which[5:].split(","))}
        committed = gk.int4_fragments_linear

        def ringed(x, words, ws, group_size, bias, config=None, silu_mul=False):
            cfg = table.get((16 * words.shape[0], x.shape[1]))
            if cfg and config is None and x.shape[0] <= gk.TOKENS and group_size == GROUP:
                return probe_linear(x, words, ws, group_size, bias, cfg[:2], silu_mul, 0, 0,
                                    cfg[2])
            return committed(x, words, ws, group_size, bias, config, silu_mul)
        gk.int4_fragments_linear = ringed
    elif which == "fold":
        def patched(x, words, ws, group_size, bias, config=None, silu_mul=False):
            return probe_linear(x, words, ws, group_size, bias, config, silu_mul, 1, 0)
        gk.int4_fragments_linear = patched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "issue12_tenth_pass"))
    import batch1_timeline
    sys.argv = ["batch1_timeline.py", "--formats", "int4_wo", "--out", str(out)]
    batch1_timeline.main()


def compile_only() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "ws_ptr": "*fp32", "b_ptr": "*fp32",
           "y_ptr": "*bf16", "m": "i32", "k": "i32", "stride_x32": "i32", "stride_ym": "i32"}
    for name, (n, k) in SHAPES.items():
        for fold in (0, 1):
            w, u = gk.fragments_config(n, k, GROUP, 1)
            cx = {"GROUP": GROUP, "W": w, "U": u, "T": 1, "BF16": True, "HAS_BIAS": False,
                  "PDL": True, "SILU_MUL": name == "gate_up", "FOLD": bool(fold), "DRY_TILE": 0}
            src = GluonASTSource(_probe_kernel, signature=sig | {c: "constexpr" for c in cx},
                                 constexprs=cx, attrs={(p,): [["tt.divisibility", 16]]
                                                       for p in (0, 1, 2, 3, 4, 6, 7, 8)})
            out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                 options={"num_warps": w})
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "k.ptx").write_text(out.asm["ptx"])
                subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f"{d}/k.ptx", "-o",
                                f"{d}/k.o"], capture_output=True, text=True)
                sass = subprocess.run([str(Path(ptxas).parent / "cuobjdump"), "-sass",
                                       f"{d}/k.o"], capture_output=True, text=True).stdout
                log = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f"{d}/k.ptx",
                                      "-o", f"{d}/k.o"], capture_output=True, text=True).stderr
            regs = [ln for ln in log.splitlines() if "registers" in ln]
            n_sass = sum(1 for ln in sass.splitlines() if ln.strip().startswith("/*") and ";" in ln)
            print(f"{name} fold={fold} W x U {w} x {u}: {regs[-1].split('Used')[-1].strip()}, "
                  f"{n_sass} SASS instructions", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ms", default="1,8,16,64")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--timeline", help="committed, fold, or ring:shape=WxUxSTAGES,...")
    parser.add_argument("--compile_only", action="store_true")
    parser.add_argument("--ring", help="W x U x STAGES,...: the TMA ring sweep at one token")
    args = parser.parse_args()
    if args.compile_only:
        compile_only()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.timeline:
        timeline(args.timeline, args.out)
        return
    if args.ring:
        rows = ring_sweep(args)
        (args.out / "int4_ring.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), group=GROUP, results=rows), indent=1))
        return
    rows = sweep(args)
    (args.out / "int4_fold.json").write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), group=GROUP, results=rows), indent=1))


if __name__ == "__main__":
    main()
