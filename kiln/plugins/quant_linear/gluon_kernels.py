"""The INT4 weight-only projection for a few tokens, in Gluon (Triton's explicit-layout dialect):
weights in the MMA fragment order (:mod:`kiln.plugins.quant_linear.layout`, the Marlin idea),
loaded straight into registers, no shared memory.

Why: the Triton tensor-core kernel (``_int4_mma_kernel``) stages its weights through shared
memory and is latency-bound at one token (ncu on an H100: 1.7 warps a scheduler, 62% of DRAM).
Here each thread loads its own A fragments, 16 bytes per 64 features of a 16-row tile, converts
them in registers (the LOP3 + FMA of ``triton_kernels._int4_words_to_halves``, exact) and feeds
four chained ``mma.sync`` m16n8k16 per chunk (inline PTX). Alone on an H200 at one token, Llama-
3.1-8B's four projections took ~45 us a layer against ~60 (benchmarks/GPU_NOTES.md, twenty-
sixth session).

- A program owns a 16-row tile and ``T`` token tiles of 8 (T = 1..8: up to 64 tokens from one
  read and one conversion of its weights; beyond, programs of 64 tokens, launched together so
  that the weights come from L2 after the first); its ``W`` warps split the row's 64-feature
  chunks, ``U`` consecutive chunks per warp and iteration, and add up through shared memory at
  the end.
- Each chunk: its four words to exact 16-bit pairs (once), then per token tile four chained
  MMAs from a zero accumulator, the float32 result times the group's scale added to the
  running sums (group sizes 64 and 128: a chunk lies in one group).
- The next iteration's words, activations and scales are loaded before this one's arithmetic;
  under PDL the first words and scales before the wait for the kernel before. The words are
  loaded first out of the caches, so that the activations stay in L1.
- ``SILU_MUL`` (a gated MLP's ``[gate | up]``): a program takes gate tile i and up tile
  N / 32 + i, their activations loaded once, and stores ``silu(gate) * up`` (each sum rounded
  to the output dtype first, as the unfused op reads it): the result is the kernel then
  gated_mlp's ``silu_and_mul``, bit for bit, without that kernel between gate_up and down.

Gluon is experimental in Triton (its API moves between releases); this module is imported only
where the torch engine holds fragment weights, and the runtime refuses such an engine in one
line where ``triton.experimental.gluon`` is missing (``triton_kernels.gluon_missing``).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from kiln.plugins.pdl import enabled as pdl_enabled
from kiln.plugins.quant_linear.triton_kernels import INT4_PAIR_CONSTANTS

TOKENS = 8  # a program's token tile: the MMA's n8 side


def _convert_asm(bf16: bool) -> str:
    """PTX: one word ($4) -> its four exact 16-bit pairs ($0..$3: pair register r from nibbles 4r
    and 16 + 4r; the magic 128.0 / 1024.0 plus 8 in each nibble by one LOP3, minus 136 / 1032
    by one FMA, as triton_kernels' _int4_words_to_halves)."""
    kind = "bf16" if bf16 else "f16"
    magic, one, neg = INT4_PAIR_CONSTANTS[kind]
    lines = [f"mov.b32 c, {magic};", f"mov.b32 one, {one};", f"mov.b32 neg, {neg};",
             "lop3.b32 $0, $4, 0x000F000F, c, 0x6A;"]
    for r in (1, 2, 3):
        lines += [f"shr.u32 u, $4, {4 * r};", f"lop3.b32 ${r}, u, 0x000F000F, c, 0x6A;"]
    lines += [f"fma.rn.{kind}x2 ${r}, ${r}, one, neg;" for r in range(4)]
    return "{\n.reg .b32 c, one, neg, u;\n" + "\n".join(lines) + "\n}"


def _mma_asm(bf16: bool) -> str:
    """PTX: four chained m16n8k16 MMAs (k-tiles j = 0..3 of a chunk; A: pair registers
    $4 + 4j .. $7 + 4j, B: activation pairs $20 + 2j, $21 + 2j) from a zero accumulator;
    outputs the four float32 sums."""
    kind = "bf16" if bf16 else "f16"
    lines = [f"mov.f32 d{i}, 0f00000000;" for i in range(4)]
    for j in range(4):
        a = ", ".join(f"${4 + 4 * j + r}" for r in range(4))
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{d0, d1, d2, d3}}, "
                     f"{{{a}}}, {{${20 + 2 * j}, ${21 + 2 * j}}}, {{d0, d1, d2, d3}};")
    lines += [f"mov.b32 ${i}, d{i};" for i in range(4)]
    return "{\n.reg .f32 d0, d1, d2, d3;\n" + "\n".join(lines) + "\n}"


_CONVERT_BF16 = gl.constexpr(_convert_asm(True))
_CONVERT_F16 = gl.constexpr(_convert_asm(False))
_MMA_BF16 = gl.constexpr(_mma_asm(True))
_MMA_F16 = gl.constexpr(_mma_asm(False))
_MMA_CONSTRAINTS = gl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 24))  # 4 sums; 16 A, 8 B


@gluon.jit
def _split4(t):
    """[..., 4] held whole by each thread -> its four [...] slices, in order."""
    e, o = gl.split(gl.reshape(t, t.shape[:-1] + [2, 2]))  # j = 2a + b: b 0 -> (0, 2), 1 -> (1, 3)
    t0, t2 = gl.split(e)
    t1, t3 = gl.split(o)
    return t0, t1, t2, t3


@gluon.jit
def _pairs(word, S2: gl.constexpr, BF16: gl.constexpr):
    """A [W, 32] word -> its four pair registers as [W, 32, 1] (to broadcast over the tokens)."""
    a0, a1, a2, a3 = gl.inline_asm_elementwise(
        _CONVERT_BF16 if BF16 else _CONVERT_F16, "=r,=r,=r,=r,r", [gl.convert_layout(word, S2)],
        dtype=(gl.int32,) * 4, is_pure=True, pack=1)
    return (gl.expand_dims(a0, 2), gl.expand_dims(a1, 2), gl.expand_dims(a2, 2),
            gl.expand_dims(a3, 2))


@gluon.jit
def _chunk(acc0, acc1, acc2, acc3, wv, xv, s_lo, s_hi, S2: gl.constexpr, S3: gl.constexpr,
           BF16: gl.constexpr):
    """The running sums ([W, 32, T]) plus one chunk's four k-tiles (``wv`` [W, 32, 4] words,
    ``xv`` [W, 32, T, 8] activation pairs), scaled by their group's scales ([W, 32]): each
    word converted once, its pairs fed to the MMAs of all T token tiles."""
    w0, w1, w2, w3 = _split4(wv)
    a00, a01, a02, a03 = _pairs(w0, S2, BF16)
    a10, a11, a12, a13 = _pairs(w1, S2, BF16)
    a20, a21, a22, a23 = _pairs(w2, S2, BF16)
    a30, a31, a32, a33 = _pairs(w3, S2, BF16)
    xe, xo = gl.split(gl.reshape(xv, xv.shape[:-1] + [4, 2]))  # pair e = 2j + h: h = 0 / 1
    x0, x2, x4, x6 = _split4(xe)
    x1, x3, x5, x7 = _split4(xo)
    d0, d1, d2, d3 = gl.inline_asm_elementwise(
        _MMA_BF16 if BF16 else _MMA_F16, _MMA_CONSTRAINTS,
        [a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33,
         gl.convert_layout(x0, S3), gl.convert_layout(x1, S3), gl.convert_layout(x2, S3),
         gl.convert_layout(x3, S3), gl.convert_layout(x4, S3), gl.convert_layout(x5, S3),
         gl.convert_layout(x6, S3), gl.convert_layout(x7, S3)],
        dtype=(gl.float32,) * 4, is_pure=True, pack=1)
    s_lo = gl.expand_dims(gl.convert_layout(s_lo, S2), 2)
    s_hi = gl.expand_dims(gl.convert_layout(s_hi, S2), 2)
    return acc0 + d0 * s_lo, acc1 + d1 * s_lo, acc2 + d2 * s_hi, acc3 + d3 * s_hi


@gluon.jit
def _split_u(t, U: gl.constexpr, AXIS: gl.constexpr):
    """[..., U] (held by each thread; U = 1, 2 or 4) -> its slices along the last dim, AXIS."""
    if U == 1:
        t0 = gl.sum(t, axis=AXIS)  # one element: the slice itself
        return t0, t0, t0, t0
    elif U == 2:
        t0, t1 = gl.split(t)
        return t0, t1, t0, t1
    else:
        e, o = gl.split(gl.reshape(t, t.shape[:-1] + [2, 2]))  # u = 2a + b
        t0, t2 = gl.split(e)
        t1, t3 = gl.split(o)
        return t0, t1, t2, t3


@gluon.jit
def _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi, U: gl.constexpr, S2: gl.constexpr,
            S3: gl.constexpr, BF16: gl.constexpr):
    """The running sums plus U chunks ([W, 32, 4, U] words, [W, 32, T, 8, U] activation pairs,
    [W, 32, U] scales)."""
    w0, w1, w2, w3 = _split_u(wv, U, 3)
    x0, x1, x2, x3 = _split_u(xv, U, 4)
    l0, l1, l2, l3 = _split_u(slo, U, 2)
    h0, h1, h2, h3 = _split_u(shi, U, 2)
    acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w0, x0, l0, h0, S2, S3, BF16)
    if U >= 2:
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w1, x1, l1, h1, S2, S3, BF16)
    if U == 4:
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w2, x2, l2, h2, S2, S3, BF16)
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w3, x3, l3, h3, S2, S3, BF16)
    return acc0, acc1, acc2, acc3


@gluon.jit
def _row_sums(b_ptr, acc0, acc1, acc2, acc3, tile, HAS_BIAS: gl.constexpr):
    """The warps' running sums ([W, 32, T] each) of a 16-row tile added up ([32, T] each), plus
    the bias: lane (g, t) holds tokens 8 tt + 2t, 8 tt + 2t + 1 of rows g (y0, y1) and g + 8
    (y2, y3) of the tile (the D fragment of token tile tt)."""
    y0 = gl.sum(acc0, axis=0)
    y1 = gl.sum(acc1, axis=0)
    y2 = gl.sum(acc2, axis=0)
    y3 = gl.sum(acc3, axis=0)
    if HAS_BIAS:
        lo = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(1, y0.type.layout)), 1)
        row = tile * 16 + lo // 4
        b_lo = gl.load(b_ptr + row).to(gl.float32)
        b_hi = gl.load(b_ptr + row + 8).to(gl.float32)
        y0 += b_lo
        y1 += b_lo
        y2 += b_hi
        y3 += b_hi
    return y0, y1, y2, y3


@gluon.jit
def _silu_mul(gate, up, dtype: gl.constexpr):
    """silu(gate) * up of float32 sums rounded to ``dtype`` first, as the unfused op reads the
    projection's output (the arithmetic of gated_mlp's _silu_mul_kernel)."""
    a = gate.to(dtype).to(gl.float32)
    return a / (1.0 + gl.exp(-a)) * up.to(dtype).to(gl.float32)


@gluon.jit
def _store_tile(y_ptr, y0, y1, y2, y3, tile, m, stride_ym, T: gl.constexpr):
    """Store a 16-row tile's outputs ([32, T] each, as :func:`_row_sums` holds them) at output
    rows ``16 tile ..``; ``m``: the tokens left from this program's first."""
    L: gl.constexpr = y0.type.layout
    lo = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(1, L)), 1)
    tt = gl.expand_dims(gl.arange(0, T, layout=gl.SliceLayout(0, L)), 0)
    row = tile * 16 + lo // 4
    t2 = tt * 8 + (lo % 4) * 2
    out = y_ptr + t2 * stride_ym + row
    gl.store(out, y0.to(y_ptr.dtype.element_ty), mask=t2 < m)
    gl.store(out + stride_ym, y1.to(y_ptr.dtype.element_ty), mask=t2 + 1 < m)
    gl.store(out + 8, y2.to(y_ptr.dtype.element_ty), mask=t2 < m)
    gl.store(out + stride_ym + 8, y3.to(y_ptr.dtype.element_ty), mask=t2 + 1 < m)


@gluon.jit
def _words(w_at):
    """One iteration's words ([W, 32, 4, U]), first out of L1 and L2 (``L1::evict_first``):
    read once, they had evicted the activations every program reads (~450 KB of words an SM a
    call through its L1). One H100, one token: gate_up 25.5 -> 23.4 us, down 13.5 -> 12.7, qkv
    7.5 -> 6.9, o 5.3 -> 5.1 (benchmarks/GPU_NOTES.md, thirty-eighth session)."""
    return gl.load(w_at, eviction_policy="evict_first")


@gluon.jit
def _tile_loads(w_at, s_at, n_groups):
    """One iteration's words ([W, 32, 4, U]) and the scales of rows g and g + 8 ([W, 32, U])."""
    return _words(w_at), gl.load(s_at), gl.load(s_at + 8 * n_groups)


# m is not specialized: a step's token count is any number (see triton_kernels' _int4_mma_kernel)
@gluon.jit(do_not_specialize=["m"])
def _int4_fragments_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, m, k, stride_x32, stride_ym,
                           GROUP: gl.constexpr, W: gl.constexpr, U: gl.constexpr,
                           T: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                           PDL: gl.constexpr, SILU_MUL: gl.constexpr):
    L4: gl.constexpr = gl.BlockedLayout([1, 1, 4, U], [1, 32, 1, 1], [W, 1, 1, 1], [2, 3, 1, 0])
    L5X: gl.constexpr = gl.BlockedLayout([1, 1, T, 8, U], [1, 32, 1, 1, 1], [W, 1, 1, 1, 1],
                                         [3, 4, 2, 1, 0])
    L3S: gl.constexpr = gl.BlockedLayout([1, 1, U], [1, 32, 1], [W, 1, 1], [2, 1, 0])
    L4T: gl.constexpr = gl.BlockedLayout([1, 1, T, 4], [1, 32, 1, 1], [W, 1, 1, 1], [3, 2, 1, 0])
    S3: gl.constexpr = gl.SliceLayout(3, L4T)  # [W, 32, T]: sums, activation pairs
    S2: gl.constexpr = gl.SliceLayout(2, S3)  # [W, 32]: pair registers, scales
    token0 = gl.program_id(0) * (8 * T)
    tile = gl.program_id(1)
    m_left = m - token0
    n_chunks = k // 64
    n_groups = k // GROUP
    n_iter = n_chunks // (U * W)

    # [W, 32, 4, U] words: warp w, lane, k-tile j, chunk U w + u
    wi = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    li = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    ji = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
    ui = gl.arange(0, U, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    w_at = (w_ptr.to(gl.pointer_type(gl.int32)) + tile.to(gl.int64) * (n_chunks * 128)
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(wi * (128 * U), 1)
                                            + gl.expand_dims(li * 4, 0), 2)
                             + gl.expand_dims(gl.expand_dims(ji, 0), 1), 3)
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(ui * 128, 0), 1), 2))

    # [W, 32, T, 8, U] activation pairs: lane (g, t), token tile tt, chunk U w + u: token
    # 8 tt + g's features 64 (U w + u) + 16t .. + 16 (16-bit pairs read as int32)
    X4: gl.constexpr = gl.SliceLayout(4, L5X)  # the 1-D layouts of the five axes
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
    tok = tx * 8 + lx // 4  # [1, 32, T, 1, 1]
    x_at = (x_ptr.to(gl.pointer_type(gl.int32)) + token0.to(gl.int64) * stride_x32
            + tok * stride_x32 + (lx % 4) * 8 + wx * (32 * U) + ex + ux * 32)
    x_ok = (tok < m_left) & (wx >= 0) & (ex >= 0) & (ux >= 0)

    # [W, 32, U] scales of rows g (and, + 8 n_groups, g + 8) for chunks U w + u
    ws_ = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3S)))
    ls_ = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3S)))
    us_ = gl.arange(0, U, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3S)))
    rows = tile * 16 + ls_ // 4
    s_at = (ws_ptr + gl.expand_dims(gl.expand_dims(rows.to(gl.int64) * n_groups, 0), 2)
            + gl.expand_dims(gl.expand_dims((ws_ * (64 * U)) // GROUP, 1), 2)
            + gl.expand_dims(gl.expand_dims((us_ * 64) // GROUP, 0), 1))
    S_STEP: gl.constexpr = W * U * 64 // GROUP  # whole groups: fragments_config's W and U
    gl.static_assert(S_STEP * GROUP == W * U * 64)

    acc0 = gl.zeros([W, 32, T], gl.float32, S3)
    acc1 = gl.zeros([W, 32, T], gl.float32, S3)
    acc2 = gl.zeros([W, 32, T], gl.float32, S3)
    acc3 = gl.zeros([W, 32, T], gl.float32, S3)
    wv, slo, shi = _tile_loads(w_at, s_at, n_groups)
    if SILU_MUL:  # the up tile as many tiles on (the grid's second axis: the gate's tiles)
        up_w = gl.num_programs(1).to(gl.int64) * (n_chunks * 128)
        up_s = gl.num_programs(1).to(gl.int64) * (16 * n_groups)
        up0 = gl.zeros([W, 32, T], gl.float32, S3)
        up1 = gl.zeros([W, 32, T], gl.float32, S3)
        up2 = gl.zeros([W, 32, T], gl.float32, S3)
        up3 = gl.zeros([W, 32, T], gl.float32, S3)
        wu, sulo, suhi = _tile_loads(w_at + up_w, s_at + up_s, n_groups)
    if PDL:  # griddepcontrol (triton.language.extra.cuda.gdc_wait's PTX): x is the kernel
        # before's output; the weights and scales are not
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)
    xv = gl.load(x_at, mask=x_ok, other=0)
    for _ in range(n_iter - 1):  # the next chunks' loads before these ones' arithmetic
        w_at += W * U * 128
        x_at += W * U * 32
        s_at += S_STEP
        wv_next = _words(w_at)
        xv_next = gl.load(x_at, mask=x_ok, other=0)
        slo_next = gl.load(s_at)
        shi_next = gl.load(s_at + 8 * n_groups)
        if SILU_MUL:
            wu_next, sulo_next, suhi_next = _tile_loads(w_at + up_w, s_at + up_s, n_groups)
        acc0, acc1, acc2, acc3 = _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi, U, S2, S3,
                                         BF16)
        wv = wv_next
        slo = slo_next
        shi = shi_next
        if SILU_MUL:
            up0, up1, up2, up3 = _chunks(up0, up1, up2, up3, wu, xv, sulo, suhi, U, S2, S3,
                                         BF16)
            wu = wu_next
            sulo = sulo_next
            suhi = suhi_next
        xv = xv_next
    acc0, acc1, acc2, acc3 = _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi, U, S2, S3, BF16)
    y0, y1, y2, y3 = _row_sums(b_ptr, acc0, acc1, acc2, acc3, tile, HAS_BIAS)
    if SILU_MUL:
        up0, up1, up2, up3 = _chunks(up0, up1, up2, up3, wu, xv, sulo, suhi, U, S2, S3, BF16)
        u0, u1, u2, u3 = _row_sums(b_ptr, up0, up1, up2, up3, tile + gl.num_programs(1),
                                   HAS_BIAS)
        dtype: gl.constexpr = y_ptr.dtype.element_ty
        y0 = _silu_mul(y0, u0, dtype)
        y1 = _silu_mul(y1, u1, dtype)
        y2 = _silu_mul(y2, u2, dtype)
        y3 = _silu_mul(y3, u3, dtype)
    _store_tile(y_ptr + token0.to(gl.int64) * stride_ym, y0, y1, y2, y3, tile, m_left,
                stride_ym, T)


def token_tiles(m: int) -> int:
    """T, the 8-token tiles one program computes (a power of two, at most 8): every token's
    product from one read and one conversion of the weights up to 64 tokens."""
    return min(8, triton.next_power_of_2(triton.cdiv(m, TOKENS)))


def fragments_config(n: int, k: int, group_size: int, tiles: int = 1) -> tuple[int, int]:
    """(warps W, chunks per warp and iteration U) for an ``[n, k]`` weight and ``tiles`` token
    tiles: ``W * U`` divides the row's ``k / 64`` chunks and spans whole groups. H200 sweeps at
    one token (Llama-3.1-8B shapes, group 128, us; int4_gluon.json of the twenty-sixth
    session): gate_up 2 x 2 21.4, qkv 4 x 4 6.8, o and down 8 x 4 5.6 and 11.6. With more
    token tiles U shrinks (the activations of U chunks and T tiles stay in registers)."""
    warps, chunks = (2, 2) if n >= 4 * k else (4, 4) if n > k else (8, 4)
    chunks = max(1, chunks // tiles)
    per_group = group_size // 64
    while (k // 64) % (warps * chunks) or (warps * chunks) % per_group:
        if chunks > 1 and (k // 64) % (warps * chunks):
            chunks //= 2
        elif warps > 1 and (k // 64) % (warps * chunks):
            warps //= 2
        else:  # W U is one chunk of a two-chunk group: k / 64 is even, so two fit
            chunks *= 2
    return warps, chunks


def int4_fragments_linear(x: torch.Tensor, words: torch.Tensor, ws: torch.Tensor,
                          group_size: int, bias: torch.Tensor | None,
                          config: tuple[int, int] | None = None,
                          silu_mul: bool = False) -> torch.Tensor:
    """``x [M, K] @ W^T`` (+ bias) for 16-bit tokens whose rows are 16-byte aligned, W in the
    fragment layout (int32 ``[N / 16, K / 64, 32, 4]``) with float32 group scales
    ``ws [N, K / group_size]``; ``config``: (W, U) (default :func:`fragments_config`).
    ``silu_mul``: W is a gated MLP's ``[gate | up]`` (N / 2 a whole number of tiles); returns
    ``silu(gate) * up`` ``[M, N / 2]``, each value rounded to x's dtype first as the unfused op
    reads them (a program takes gate tile i and up tile N / 32 + i, sharing their activations)."""
    m, k = x.shape
    n = 16 * words.shape[0]
    tiles = token_tiles(m)
    warps, chunks = config or fragments_config(n, k, group_size, tiles)
    if (k // 64) % (warps * chunks) or (warps * chunks * 64) % group_size:
        raise ValueError(f"int4 fragment kernel: {warps} warps x {chunks} chunks must divide "
                         f"the {k // 64} chunks of 64 features and span whole groups of "
                         f"{group_size}")
    if n // 16 > 65535:  # the grid's second dimension
        raise ValueError(f"int4 fragment kernel: {n} output rows, at most {16 * 65535}")
    if silu_mul and n % 32:
        raise ValueError(f"int4 fragment kernel: silu * up needs whole 16-row tiles in each "
                         f"half of the {n} rows")
    out_tiles = n // 32 if silu_mul else n // 16
    y = torch.empty((m, 16 * out_tiles), dtype=x.dtype, device=x.device)
    pdl = pdl_enabled(x.device)
    _int4_fragments_kernel[(triton.cdiv(m, TOKENS * tiles), out_tiles)](
        x, words, ws, bias if bias is not None else ws, y, m, k, x.stride(0) // 2, y.stride(0),
        GROUP=group_size, W=warps, U=chunks, T=tiles, BF16=x.dtype == torch.bfloat16,
        HAS_BIAS=bias is not None, PDL=pdl, SILU_MUL=silu_mul, num_warps=warps,
        launch_pdl=pdl)
    return y
