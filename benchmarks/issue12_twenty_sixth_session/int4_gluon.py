"""An INT4 weight-only GEMV for a few tokens in Gluon: weights pre-shuffled into the tensor-core
fragment order (the Marlin idea), loaded straight into registers, no shared memory.

    PYTHONPATH=. python3 benchmarks/issue12_twenty_sixth_session/int4_gluon.py --out DIR
    python3 benchmarks/issue12_twenty_sixth_session/int4_gluon.py --compile_only   (no GPU:
        compiles for sm90, prints registers and the SASS instruction mix)

The engine's ``_int4_mma_kernel`` (Triton) is latency-bound at one token: ncu on an H100 shows
1.7 warps per scheduler, 5.1 cycles per issued instruction (long scoreboard 1.4, wait 1.0,
short scoreboard 0.7), 62% of DRAM bandwidth, its weights staged through shared memory and its
grid 224 programs of 4 warps (ncu_stalls_gate_up_run3.txt). Here:

- A warp owns one 16-row tile; the ``W`` warps of a program split its row's 64-feature chunks,
  ``U`` consecutive chunks per warp and iteration, and add up through shared memory at the end.
- Layout (build time, :func:`pack_fragments`): word ``((tile * chunks + c) * 32 + lane) * 4 + j``
  holds lane ``(g, t) = (lane // 4, lane % 4)``'s A fragment of m16n8k16 for k-tile j of chunk
  c: its pair register r (rows g + 8 (r % 2), k slots 2t + 8 (r // 2) + p) in nibbles 4r
  (p = 0) and 16 + 4r (p = 1). The k slots are features ``64c + 16t + 4j + 2h + p``
  (h = r // 2), so lane t's activations for the chunk's four k-tiles are 16 contiguous features
  (two 16-byte loads, by the lanes of real tokens only).
- Each chunk: its four words to exact bf16 pairs (the engine kernel's LOP3 + FMA), four chained
  ``mma.sync`` (inline PTX) from a zero accumulator, the float32 result times the group scale
  added to the running sums (group sizes 64 and 128: a chunk lies in one group).
- The next iteration's words, activations and scales are loaded before this one's arithmetic;
  under PDL the first words and scales are loaded before the wait for the kernel before.
- bf16 activations, up to 8 tokens (one n8 tile). ``--layers N`` times a decode step's four
  projections over N layers in one CUDA graph against the engine's dispatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

from kiln.plugins.pdl import enabled as pdl_enabled  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def _mma_chain_asm() -> str:
    """PTX: four words ($4..$7, k-tiles j = 0..3 of a chunk) -> exact bf16 pairs (nibbles 4r and
    16 + 4r of pair register r; LOP3 + FMA as the engine kernel), four chained m16n8k16 mmas with
    the activation pairs ($8 + 2j, $9 + 2j), from a zero accumulator; outputs the four f32 sums."""
    lines = ["mov.b32 c, 0x43084308;", "mov.b32 one, 0x3F803F80;", "mov.b32 neg, 0xC308C308;",
             "mov.f32 d0, 0f00000000;", "mov.f32 d1, 0f00000000;", "mov.f32 d2, 0f00000000;",
             "mov.f32 d3, 0f00000000;"]
    for j in range(4):
        w = f"${4 + j}"
        lines.append(f"lop3.b32 a0, {w}, 0x000F000F, c, 0x6A;")
        for r in (1, 2, 3):
            lines += [f"shr.u32 u, {w}, {4 * r};", f"lop3.b32 a{r}, u, 0x000F000F, c, 0x6A;"]
        lines += [f"fma.rn.bf16x2 a{r}, a{r}, one, neg;" for r in range(4)]
        lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0, d1, d2, d3}, "
                     f"{{a0, a1, a2, a3}}, {{${8 + 2 * j}, ${9 + 2 * j}}}, {{d0, d1, d2, d3}};")
    lines += [f"mov.b32 ${i}, d{i};" for i in range(4)]
    return ("{\n.reg .b32 c, one, neg, u, a0, a1, a2, a3;\n.reg .f32 d0, d1, d2, d3;\n"
            + "\n".join(lines) + "\n}")


_MMA_CHAIN = gl.constexpr(_mma_chain_asm())


@gluon.jit
def _split4(t, W: gl.constexpr, S: gl.constexpr):
    """[W, 32, 4] held whole by each thread -> its four [W, 32] slices, in order, in layout S
    (register renaming only: the conversions are asserted trivial)."""
    e, o = gl.split(gl.reshape(t, [W, 32, 2, 2]))  # j = 2a + b: b = 0 -> (0, 2), 1 -> (1, 3)
    t0, t2 = gl.split(e)
    t1, t3 = gl.split(o)
    return (gl.convert_layout(t0, S, assert_trivial=True),
            gl.convert_layout(t1, S, assert_trivial=True),
            gl.convert_layout(t2, S, assert_trivial=True),
            gl.convert_layout(t3, S, assert_trivial=True))


@gluon.jit
def _chunk(acc0, acc1, acc2, acc3, wv, xv, s_lo, s_hi, W: gl.constexpr, S: gl.constexpr):
    """The running sums plus one chunk's four k-tiles, scaled by their group's scales."""
    w0, w1, w2, w3 = _split4(wv, W, S)
    xe, xo = gl.split(gl.reshape(xv, [W, 32, 4, 2]))  # pair e = 2j + h: h = 0 / 1
    x0, x2, x4, x6 = _split4(xe, W, S)
    x1, x3, x5, x7 = _split4(xo, W, S)
    d0, d1, d2, d3 = gl.inline_asm_elementwise(
        _MMA_CHAIN, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r",
        [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7], dtype=(gl.float32,) * 4,
        is_pure=True, pack=1)
    return acc0 + d0 * s_lo, acc1 + d1 * s_lo, acc2 + d2 * s_hi, acc3 + d3 * s_hi


@gluon.jit
def _store_sums(y_ptr, acc0, acc1, acc2, acc3, tile, m, stride_ym):
    """The warps' running sums ([W, 32] each) added up and stored: lane (g, t) holds tokens
    2t, 2t + 1 of rows g (acc0, acc1) and g + 8 (acc2, acc3) of the tile (the D fragment)."""
    y0 = gl.sum(acc0, axis=0)
    y1 = gl.sum(acc1, axis=0)
    y2 = gl.sum(acc2, axis=0)
    y3 = gl.sum(acc3, axis=0)
    lo = gl.arange(0, 32, layout=y0.type.layout)
    row = tile * 16 + lo // 4
    t2 = (lo % 4) * 2
    out = y_ptr + t2 * stride_ym + row
    gl.store(out, y0.to(y_ptr.dtype.element_ty), mask=t2 < m)
    gl.store(out + stride_ym, y1.to(y_ptr.dtype.element_ty), mask=t2 + 1 < m)
    gl.store(out + 8, y2.to(y_ptr.dtype.element_ty), mask=t2 < m)
    gl.store(out + stride_ym + 8, y3.to(y_ptr.dtype.element_ty), mask=t2 + 1 < m)


@gluon.jit
def _int4_frag_kernel(x_ptr, w_ptr, ws_ptr, y_ptr, m, n, k, stride_x32, stride_ym,
                      GROUP: gl.constexpr, W: gl.constexpr):
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 32, 1], [W, 1, 1], [2, 1, 0])
    L3X: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 32, 1], [W, 1, 1], [2, 1, 0])
    S3: gl.constexpr = gl.SliceLayout(2, L3)  # [W, 32]
    S3X: gl.constexpr = gl.SliceLayout(2, L3X)
    tile = gl.program_id(0)
    n_chunks = k // 64
    n_groups = k // GROUP
    n_iter = n_chunks // W

    # [W, 32, 4] words of iteration 0: warp w's chunk w
    wi = gl.arange(0, W, layout=gl.SliceLayout(1, S3))
    li = gl.arange(0, 32, layout=gl.SliceLayout(0, S3))
    ji = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    w_at = (w_ptr.to(gl.pointer_type(gl.int32)) + tile.to(gl.int64) * (n_chunks * 128)
            + gl.expand_dims(gl.expand_dims(wi * 128, 1) + gl.expand_dims(li * 4, 0), 2)
            + gl.expand_dims(gl.expand_dims(ji, 0), 1))

    # [W, 32, 8] activation pairs: lane (g, t) reads token g's features 64c + 16t .. + 16
    wx = gl.arange(0, W, layout=gl.SliceLayout(1, S3X))
    lx = gl.arange(0, 32, layout=gl.SliceLayout(0, S3X))
    ex = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3X)))
    tok = lx // 4
    x_at = (x_ptr.to(gl.pointer_type(gl.int32))
            + gl.expand_dims(gl.expand_dims(wx * 32, 1)
                             + gl.expand_dims(tok * stride_x32 + (lx % 4) * 8, 0), 2)
            + gl.expand_dims(gl.expand_dims(ex, 0), 1))
    x_ok = gl.expand_dims(gl.expand_dims(wx >= 0, 1) & gl.expand_dims(tok < m, 0), 2) & \
        gl.expand_dims(gl.expand_dims(ex >= 0, 0), 1)

    # [W, 32] scales of rows g and g + 8 of the tile for warp w's chunk
    rows = tile * 16 + li // 4
    s_at = (ws_ptr + gl.expand_dims(rows.to(gl.int64) * n_groups, 0)
            + gl.expand_dims((wi * 64) // GROUP, 1))
    S_STEP: gl.constexpr = W * 64 // GROUP

    acc0 = gl.zeros([W, 32], gl.float32, S3)
    acc1 = gl.zeros([W, 32], gl.float32, S3)
    acc2 = gl.zeros([W, 32], gl.float32, S3)
    acc3 = gl.zeros([W, 32], gl.float32, S3)
    wv = gl.load(w_at)
    xv = gl.load(x_at, mask=x_ok, other=0)
    s_lo = gl.load(s_at)
    s_hi = gl.load(s_at + 8 * n_groups)
    for _ in range(n_iter - 1):  # the next chunk's loads before this one's arithmetic
        w_at += W * 128
        x_at += W * 32
        s_at += S_STEP
        wv_next = gl.load(w_at)
        xv_next = gl.load(x_at, mask=x_ok, other=0)
        s_lo_next = gl.load(s_at)
        s_hi_next = gl.load(s_at + 8 * n_groups)
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, wv, xv, s_lo, s_hi, W, S3)
        wv = wv_next
        xv = xv_next
        s_lo = s_lo_next
        s_hi = s_hi_next
    acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, wv, xv, s_lo, s_hi, W, S3)

    _store_sums(y_ptr, acc0, acc1, acc2, acc3, tile, m, stride_ym)


@gluon.jit
def _split_u(t, U: gl.constexpr):
    """[..., U] (U = 2 or 4, held by each thread) -> its U slices along the last dim, in order."""
    if U == 2:
        t0, t1 = gl.split(t)
        return t0, t1, t0, t1
    else:
        e, o = gl.split(gl.reshape(t, t.shape[:-1] + [2, 2]))  # u = 2a + b
        t0, t2 = gl.split(e)
        t1, t3 = gl.split(o)
        return t0, t1, t2, t3


@gluon.jit
def _int4_fragu_kernel(x_ptr, w_ptr, ws_ptr, y_ptr, m, n, k, stride_x32, stride_ym,
                       GROUP: gl.constexpr, W: gl.constexpr, U: gl.constexpr,
                       PDL: gl.constexpr = False):
    """``_int4_frag_kernel`` with ``U`` (2 or 4) consecutive chunks per warp and iteration
    (chunks U c' + u of c' = it * W + w): 16 U bytes of words in flight per thread. ``PDL``:
    the first iteration's weights are loaded before the wait for the kernel before (they do not
    depend on it), as the engine's GEMVs' early tiles."""
    L4: gl.constexpr = gl.BlockedLayout([1, 1, 4, U], [1, 32, 1, 1], [W, 1, 1, 1], [2, 3, 1, 0])
    L4X: gl.constexpr = gl.BlockedLayout([1, 1, 8, U], [1, 32, 1, 1], [W, 1, 1, 1],
                                         [2, 3, 1, 0])
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 32, 1], [W, 1, 1], [2, 1, 0])
    L3X: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 32, 1], [W, 1, 1], [2, 1, 0])
    L3S: gl.constexpr = gl.BlockedLayout([1, 1, U], [1, 32, 1], [W, 1, 1], [2, 1, 0])
    S3: gl.constexpr = gl.SliceLayout(2, L3)  # [W, 32]
    tile = gl.program_id(0)
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

    # [W, 32, 8, U] activation pairs: lane (g, t), chunk U w + u: token g's features
    # 64 (U w + u) + 16t .. + 16
    wx = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4X))))
    lx = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4X))))
    ex = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4X))))
    ux = gl.arange(0, U, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4X))))
    tok = lx // 4
    x_at = (x_ptr.to(gl.pointer_type(gl.int32))
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(wx * (32 * U), 1)
                                            + gl.expand_dims(tok * stride_x32 + (lx % 4) * 8, 0),
                                            2)
                             + gl.expand_dims(gl.expand_dims(ex, 0), 1), 3)
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(ux * 32, 0), 1), 2))
    x_ok = (gl.expand_dims(gl.expand_dims(gl.expand_dims(wx >= 0, 1) & gl.expand_dims(tok < m, 0),
                                          2) & gl.expand_dims(gl.expand_dims(ex >= 0, 0), 1), 3)
            & gl.expand_dims(gl.expand_dims(gl.expand_dims(ux >= 0, 0), 1), 2))

    # [W, 32, U] scales of rows g (and, + 8 n_groups, g + 8) for chunks U w + u
    ws_ = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3S)))
    ls_ = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3S)))
    us_ = gl.arange(0, U, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3S)))
    rows = tile * 16 + ls_ // 4
    s_at = (ws_ptr + gl.expand_dims(gl.expand_dims(rows.to(gl.int64) * n_groups, 0), 2)
            + gl.expand_dims(gl.expand_dims((ws_ * (64 * U)) // GROUP, 1), 2)
            + gl.expand_dims(gl.expand_dims((us_ * 64) // GROUP, 0), 1))
    S_STEP: gl.constexpr = W * U * 64 // GROUP

    acc0 = gl.zeros([W, 32], gl.float32, S3)
    acc1 = gl.zeros([W, 32], gl.float32, S3)
    acc2 = gl.zeros([W, 32], gl.float32, S3)
    acc3 = gl.zeros([W, 32], gl.float32, S3)
    wv = gl.load(w_at)
    slo = gl.load(s_at)
    if PDL:  # griddepcontrol (triton.language.extra.cuda.gdc_wait's PTX)
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)
    xv = gl.load(x_at, mask=x_ok, other=0)
    shi = gl.load(s_at + 8 * n_groups)
    for _ in range(n_iter - 1):  # the next chunks' loads before these ones' arithmetic
        w_at += W * U * 128
        x_at += W * U * 32
        s_at += S_STEP
        wv_next = gl.load(w_at)
        xv_next = gl.load(x_at, mask=x_ok, other=0)
        slo_next = gl.load(s_at)
        shi_next = gl.load(s_at + 8 * n_groups)
        acc0, acc1, acc2, acc3 = _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi,
                                         W, U, L3, L3X, S3)
        wv = wv_next
        xv = xv_next
        slo = slo_next
        shi = shi_next
    acc0, acc1, acc2, acc3 = _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi, W, U, L3, L3X, S3)

    _store_sums(y_ptr, acc0, acc1, acc2, acc3, tile, m, stride_ym)


@gluon.jit
def _chunks(acc0, acc1, acc2, acc3, wv, xv, slo, shi, W: gl.constexpr, U: gl.constexpr,
            L3: gl.constexpr, L3X: gl.constexpr, S3: gl.constexpr):
    """The running sums plus U chunks ([W, 32, 4, U] words, [W, 32, 8, U] activation pairs,
    [W, 32, U] scales)."""
    w0, w1, w2, w3 = _split_u(wv, U)
    x0, x1, x2, x3 = _split_u(xv, U)
    l0, l1, l2, l3 = _split_u(slo, U)
    h0, h1, h2, h3 = _split_u(shi, U)
    acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, gl.convert_layout(w0, L3),
                                    gl.convert_layout(x0, L3X), gl.convert_layout(l0, S3),
                                    gl.convert_layout(h0, S3), W, S3)
    acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, gl.convert_layout(w1, L3),
                                    gl.convert_layout(x1, L3X), gl.convert_layout(l1, S3),
                                    gl.convert_layout(h1, S3), W, S3)
    if U == 4:
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, gl.convert_layout(w2, L3),
                                        gl.convert_layout(x2, L3X), gl.convert_layout(l2, S3),
                                        gl.convert_layout(h2, S3), W, S3)
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, gl.convert_layout(w3, L3),
                                        gl.convert_layout(x3, L3X), gl.convert_layout(l3, S3),
                                        gl.convert_layout(h3, S3), W, S3)
    return acc0, acc1, acc2, acc3


def pack_fragments(q: torch.Tensor) -> torch.Tensor:
    """int8 values [N, K] in [-8, 7] -> the kernel's int32 words [N / 16, K / 64, 32, 4]."""
    n, k = q.shape
    v = (q.to(torch.int32) & 0xF).view(n // 16, 2, 8, k // 64, 4, 4, 2, 2)
    # (tile, rhalf, g, chunk, t, j, h, p) -> (tile, chunk, g, t, j, p, h, rhalf): nibble b =
    # 4p + 2h + rhalf = pair register r = 2h + rhalf, its low (p = 0) or high (p = 1) half
    v = v.permute(0, 3, 2, 4, 5, 7, 6, 1).reshape(n // 16, k // 64, 32, 4, 8)
    shifts = torch.arange(8, dtype=torch.int32, device=q.device) * 4
    words = (v << shifts).sum(-1, dtype=torch.int64)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


def int4_frag(x: torch.Tensor, words: torch.Tensor, ws: torch.Tensor, group: int,
              warps: int, chunks: int = 1) -> torch.Tensor:
    m, k = x.shape
    n = ws.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if chunks == 1:
        _int4_frag_kernel[(n // 16,)](x, words, ws, y, m, n, k, x.stride(0) // 2, y.stride(0),
                                      GROUP=group, W=warps, num_warps=warps)
    else:
        pdl = pdl_enabled(x.device)
        _int4_fragu_kernel[(n // 16,)](x, words, ws, y, m, n, k, x.stride(0) // 2,
                                       y.stride(0), GROUP=group, W=warps, U=chunks, PDL=pdl,
                                       num_warps=warps, launch_pdl=pdl)
    return y


def compile_only(warps: int, group: int, chunks: int) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "ws_ptr": "*fp32", "y_ptr": "*bf16", "m": "i32",
           "n": "i32", "k": "i32", "stride_x32": "i32", "stride_ym": "i32",
           "GROUP": "constexpr", "W": "constexpr"}
    kernel = _int4_fragu_kernel if chunks > 1 else _int4_frag_kernel
    if chunks > 1:
        sig["U"] = sig["PDL"] = "constexpr"
    src = GluonASTSource(kernel, signature=sig,
                         constexprs={"GROUP": group, "W": warps}
                         | ({"U": chunks, "PDL": True} if chunks > 1 else {}),
                         attrs={(p,): [["tt.divisibility", 16]] for p in (0, 1, 2, 3, 6, 7)})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    print("warps", warps, "chunks", chunks, "shared", out.metadata.shared)
    Path("/tmp/int4_frag.ptx").write_text(out.asm["ptx"])
    Path("/tmp/int4_frag.cubin").write_bytes(out.asm["cubin"])


def layers(configs: dict[str, tuple[int, int]], n_layers: int, m: int) -> dict:
    """A decode step's four INT4 projections over ``n_layers`` layers (own weights each, as a
    step streams them) in one CUDA graph: the engine's paths at ``m`` tokens (PDL on where the
    engine turns it on) against the Gluon kernel (no PDL) at ``configs`` (warps, chunks)."""
    from quant_kernels import time_calls

    from kiln.plugins.quant_linear.layout import repack_int4
    from kiln.plugins.quant_linear.triton_kernels import int4_weight_only_linear
    from kiln.quantization.formats import pack_int4
    group = 128
    engine, frag = [], []
    for _ in range(n_layers):
        for name, (n, k) in SHAPES.items():
            q = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
            s = torch.rand(n, k // group, device="cuda") / 100 + 1e-3
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            engine.append((x, repack_int4(pack_int4(q), group), s))
            frag.append((x, pack_fragments(q), s, configs[name]))
            del q
    sec_engine = time_calls([lambda a=a: int4_weight_only_linear(a[0], a[1], a[2], group)
                             for a in engine]) * len(engine)
    sec_frag = time_calls([lambda a=a: int4_frag(a[0], a[1], a[2], group, *a[3])
                           for a in frag]) * len(frag)
    weight_bytes = sum(a[1].numel() * a[1].element_size() + a[2].numel() * 4 for a in engine)
    return dict(m=m, layers=n_layers, configs={k: list(v) for k, v in configs.items()},
                engine_us=sec_engine * 1e6, gluon_us=sec_frag * 1e6,
                engine_tbps=weight_bytes / sec_engine / 1e12,
                gluon_tbps=weight_bytes / sec_frag / 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compile_only", action="store_true")
    parser.add_argument("--layers", type=int, default=0,
                        help="time N layers' projections in one graph (engine vs Gluon)")
    parser.add_argument("--configs", default="qkv=8x2,o=8x2,gate_up=2x2,down=8x2",
                        help="the Gluon kernel's warps x chunks per shape, for --layers")
    parser.add_argument("--warps", default="2,4,8,16")
    parser.add_argument("--chunks", default="1,2", help="chunks per warp and iteration")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    if args.compile_only:
        for u in map(int, args.chunks.split(",")):
            for w in map(int, args.warps.split(",")):
                compile_only(w, 128, u)
        return
    if args.layers:
        configs = {name: tuple(map(int, v.split("x"))) for name, v in
                   (item.split("=") for item in args.configs.split(","))}
        rows = [layers(configs, args.layers, m) for m in (1, 8)]
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "int4_gluon_layers.json").write_text(json.dumps(
                dict(device=torch.cuda.get_device_name(), results=rows), indent=1))
        return
    from quant_kernels import copies_for, nbytes, time_calls

    from kiln.plugins.quant_linear.layout import repack_int4
    from kiln.plugins.quant_linear.triton_kernels import _int4_mma
    from kiln.quantization.formats import pack_int4
    torch.manual_seed(0)
    group = 128
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = []
        for _ in range(copies_for(n * k // 2)):
            q = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
            s = torch.rand(n, k // group, device="cuda") / 100 + 1e-3
            copies.append((q, s, repack_int4(pack_int4(q), group), pack_fragments(q)))
        q, s = copies[0][:2]
        deq = (q.float().view(n, k // group, group) * s[:, :, None]).view(n, k)
        for m in (1, 4, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ deq.T
            scale = ref.abs().max().item()
            sec = time_calls([lambda c=c, x=x: _int4_mma(x, c[2], c[1], group, None)
                              for c in copies])
            err = (_int4_mma(x, copies[0][2], s, group, None).float() - ref).abs().max().item()
            row = dict(shape=name, m=m, kernel="engine_mma", us=sec * 1e6,
                       tbps=nbytes(copies[0][2:3] + copies[0][1:2]) / sec / 1e12,
                       max_err_rel=err / scale)
            results.append(row)
            print(json.dumps(row), flush=True)
            for w, u in [(w, u) for u in map(int, args.chunks.split(","))
                         for w in map(int, args.warps.split(","))]:
                if (k // 64) % (w * u):
                    continue
                y = int4_frag(x, copies[0][3], s, group, w, u)
                err = (y.float() - ref).abs().max().item()
                sec = time_calls([lambda c=c, x=x, w=w, u=u: int4_frag(x, c[3], c[1], group, w, u)
                                  for c in copies])
                row = dict(shape=name, m=m, kernel=f"gluon_w{w}_u{u}", us=sec * 1e6,
                           tbps=nbytes(copies[0][2:3] + copies[0][1:2]) / sec / 1e12,
                           max_err_rel=err / scale, finite=bool(torch.isfinite(y).all()))
                results.append(row)
                print(json.dumps(row), flush=True)
        del copies
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "int4_gluon.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), results=results), indent=1))


if __name__ == "__main__":
    main()
