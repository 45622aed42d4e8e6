"""A persistent, warp-specialized form of the INT4 Gluon kernel at one token tile: one producer
warp brings each program's words by TMA into a ring of ``STAGES`` slots in shared memory,
running ahead across the program's output tiles, and ``W`` consumer warps (a warp group or two)
take them from the ring (full / empty mbarriers, no block barrier), convert them and feed the
MMAs exactly as the committed kernel does.

    PYTHONPATH=. python3 benchmarks/issue12_forty_second_session/int4_ws.py --compile_only
        (no GPU: compiles for sm_90a, prints registers, spills and shared memory)
    PYTHONPATH=. python3 benchmarks/issue12_forty_second_session/int4_ws.py --out DIR \\
        [--ms 1,8] [--configs gate_up=4x2x6x1x1,...]   (the sweep: us a call, bit-equality)
    PYTHONPATH=. python3 benchmarks/issue12_forty_second_session/int4_ws.py --out DIR \\
        --timeline best|committed|gate_up=4x2x6x1x1,...  (batch-1 INT4 g128 through EngineCore)

A config is W x U x STAGES x SD x PER_SM [x AHEAD [x DRY]]: W consumer warps (4 or 8: a warp-
specialized kernel's default partition is whole warp groups), U chunks of 64 features a warp and
step, STAGES ring slots of W U chunks (and the up tile's, for silu * up), the scales SD steps
ahead in registers (1 or 2), PER_SM programs an SM (the grid: min(tiles, SMs x PER_SM)); AHEAD
1: each step takes the next step's words out of the ring before its own arithmetic. DRY, probes
with wrong outputs: 1, no TMA and no waits (the consumers convert and multiply whatever the ring
holds: the arithmetic with the activations' and scales' loads, no word traffic); 2, that without
the scales' loads (ones); 3, the words as usual and the scales ones, not loaded.

Why (benchmarks/GPU_NOTES.md, thirty-seventh to fortieth sessions): at one token the committed
kernel is latency-bound (ncu: 3.3 warps a scheduler, each waiting on its own word loads, one
iteration in flight), and six ways to more bytes in flight inside its one-tile programs lost:
registers two ahead cost warps, the ``cp.async`` and TMA rings paid block barriers with every
warp in lockstep, an L2 prefetch queued ahead of the loads, the activations out of registers
put a load on each iteration's chain. What Hopper's GEMMs do instead is this form: a producer
that only issues copies, consumers that only compute, and a grid of persistent programs so that
the ring runs on across tile boundaries instead of filling and draining once a tile.

The arithmetic is the committed kernel's at (W, U): warp w takes chunks U w + u of each step,
in order, and the warps add up at the end of a tile as there. So the outputs are compared bit
for bit with ``int4_fragments_linear(..., config=(W, U))``.

Measured and not kept (benchmarks/GPU_NOTES.md, forty-second session, runs 1-5, one H100):
every config bit for bit the committed kernel's, and 24-80% slower at one token; with no word
traffic at all (DRY 2) its consumers took longer than the committed kernel with its traffic.
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

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
GROUP = 128
_ROWS = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


@gluon.jit
def _ws_scales(ws_ptr, s_rel, g, pid, P, spt, total, n_groups, up_s,
               S_STEP: gl.constexpr, SILU_MUL: gl.constexpr, DRY: gl.constexpr = 0):
    """Step ``g``'s scales of rows g and g + 8 ([W, 32, U] each; the up tile's too), zeros past
    the program's last step (DRY 2, 3: ones, nothing loaded)."""
    if DRY >= 2:
        one = gl.full(s_rel.shape, 1.0, gl.float32, s_rel.type.layout)
        return one, one, one, one
    tile = pid + (g // spt) * P
    at = ws_ptr + tile.to(gl.int64) * (16 * n_groups) + (g % spt) * S_STEP + s_rel
    ok = (s_rel >= 0) & (g < total)
    lo = gl.load(at, mask=ok, other=0.0)
    hi = gl.load(at + 8 * n_groups, mask=ok, other=0.0)
    ulo = lo
    uhi = hi
    if SILU_MUL:
        ulo = gl.load(at + up_s, mask=ok, other=0.0)
        uhi = gl.load(at + up_s + 8 * n_groups, mask=ok, other=0.0)
    return lo, hi, ulo, uhi


@gluon.jit
def _ws_take(words, up_words, ready, empty, g, total, LW: gl.constexpr, STAGES: gl.constexpr,
             SILU_MUL: gl.constexpr, DRY: gl.constexpr = 0):
    """Step ``g``'s words out of its ring slot ([W, 32, 4, U]; the up tile's too), the slot
    handed back to the producer; past the program's last step nothing is waited for (the
    slot's stale words are not used)."""
    slot = g % STAGES
    live = (g < total) & (DRY % 3 == 0)  # DRY 1, 2: no words come
    mbarrier.wait(ready.index(slot), (g // STAGES) & 1, pred=live)
    wv = gl.permute(words.index(slot).load(LW), [0, 2, 3, 1])
    wu = wv
    if SILU_MUL:
        wu = gl.permute(up_words.index(slot).load(LW), [0, 2, 3, 1])
    fence_async_shared()  # the reads before the slot's next TMA write (generic -> async)
    mbarrier.arrive(empty.index(slot), count=1, pred=live)
    return wv, wu


@gluon.jit
def _ws_consumer(x_ptr, ws_ptr, b_ptr, y_ptr, m, stride_x32, stride_ym, words, up_words, ready,
                 empty, pid, P, n_out, n_groups, spt, total, GROUP: gl.constexpr,
                 W: gl.constexpr, U: gl.constexpr, STAGES: gl.constexpr, SD: gl.constexpr,
                 BF16: gl.constexpr, HAS_BIAS: gl.constexpr, PDL: gl.constexpr,
                 SILU_MUL: gl.constexpr, AHEAD: gl.constexpr, DRY: gl.constexpr):
    T: gl.constexpr = 1
    L5X: gl.constexpr = gl.BlockedLayout([1, 1, T, 8, U], [1, 32, 1, 1, 1], [W, 1, 1, 1, 1],
                                         [3, 4, 2, 1, 0])
    L3S: gl.constexpr = gl.BlockedLayout([1, 1, U], [1, 32, 1], [W, 1, 1], [2, 1, 0])
    L4T: gl.constexpr = gl.BlockedLayout([1, 1, T, 4], [1, 32, 1, 1], [W, 1, 1, 1], [3, 2, 1, 0])
    S3: gl.constexpr = gl.SliceLayout(3, L4T)
    S2: gl.constexpr = gl.SliceLayout(2, S3)
    LW: gl.constexpr = gl.BlockedLayout([1, U, 1, 4], [1, 1, 32, 1], [W, 1, 1, 1], [3, 1, 2, 0])

    # the activations of a step's chunks, as the committed kernel holds them (token tile 0)
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
    x_at = (x_ptr.to(gl.pointer_type(gl.int32)) + tok * stride_x32 + (lx % 4) * 8
            + wx * (32 * U) + ex + ux * 32)
    x_ok = (tok < m) & (wx >= 0) & (ex >= 0) & (ux >= 0)

    ws_ = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3S)))
    ls_ = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3S)))
    us_ = gl.arange(0, U, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3S)))
    s_rel = (gl.expand_dims(gl.expand_dims((ls_ // 4) * n_groups, 0), 2)
             + gl.expand_dims(gl.expand_dims((ws_ * (64 * U)) // GROUP, 1), 2)
             + gl.expand_dims(gl.expand_dims((us_ * 64) // GROUP, 0), 1))
    S_STEP: gl.constexpr = W * U * 64 // GROUP
    up_s = n_out.to(gl.int64) * (16 * n_groups)

    acc0 = gl.zeros([W, 32, T], gl.float32, S3)
    acc1 = gl.zeros([W, 32, T], gl.float32, S3)
    acc2 = gl.zeros([W, 32, T], gl.float32, S3)
    acc3 = gl.zeros([W, 32, T], gl.float32, S3)
    up0 = acc0
    up1 = acc1
    up2 = acc2
    up3 = acc3
    lo, hi, ulo, uhi = _ws_scales(ws_ptr, s_rel, 0, pid, P, spt, total, n_groups, up_s, S_STEP,
                                  SILU_MUL, DRY)
    lo1 = lo
    hi1 = hi
    ulo1 = ulo
    uhi1 = uhi
    if SD == 2:
        lo1, hi1, ulo1, uhi1 = _ws_scales(ws_ptr, s_rel, 1, pid, P, spt, total, n_groups, up_s,
                                          S_STEP, SILU_MUL, DRY)
    if PDL:  # x is the kernel before's output; the words and scales are not
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)
    xv = gl.load(x_at, mask=x_ok, other=0)
    if AHEAD:  # the words a step ahead out of the ring too, before this step's arithmetic
        wv, wu = _ws_take(words, up_words, ready, empty, 0, total, LW, STAGES, SILU_MUL, DRY)
    for g in range(total):
        s = g % spt
        # the next step's activations (in L1 after the first tile) and the scales SD ahead
        xv_next = gl.load(x_at + ((g + 1) % spt) * (W * U * 32), mask=x_ok, other=0)
        nlo, nhi, nulo, nuhi = _ws_scales(ws_ptr, s_rel, g + SD, pid, P, spt, total, n_groups,
                                          up_s, S_STEP, SILU_MUL)
        if AHEAD:
            wv_now = wv
            wu_now = wu
            wv, wu = _ws_take(words, up_words, ready, empty, g + 1, total, LW, STAGES,
                              SILU_MUL, DRY)
        else:
            wv_now, wu_now = _ws_take(words, up_words, ready, empty, g, total, LW, STAGES,
                                      SILU_MUL, DRY)
        acc0, acc1, acc2, acc3 = gk._chunks(acc0, acc1, acc2, acc3, wv_now, xv, lo, hi, U, S2,
                                            S3, BF16)
        if SILU_MUL:
            up0, up1, up2, up3 = gk._chunks(up0, up1, up2, up3, wu_now, xv, ulo, uhi, U, S2,
                                            S3, BF16)
        if SD == 2:
            lo = lo1
            hi = hi1
            ulo = ulo1
            uhi = uhi1
            lo1 = nlo
            hi1 = nhi
            ulo1 = nulo
            uhi1 = nuhi
        else:
            lo = nlo
            hi = nhi
            ulo = nulo
            uhi = nuhi
        xv = xv_next
        if s == spt - 1:  # the tile's last step: add up the warps' sums, store, start again
            tile = pid + (g // spt) * P
            y0, y1, y2, y3 = gk._row_sums(b_ptr, acc0, acc1, acc2, acc3, tile, HAS_BIAS)
            if SILU_MUL:
                u0, u1, u2, u3 = gk._row_sums(b_ptr, up0, up1, up2, up3, tile + n_out, HAS_BIAS)
                dtype: gl.constexpr = y_ptr.dtype.element_ty
                y0 = gk._silu_mul(y0, u0, dtype)
                y1 = gk._silu_mul(y1, u1, dtype)
                y2 = gk._silu_mul(y2, u2, dtype)
                y3 = gk._silu_mul(y3, u3, dtype)
            gk._store_tile(y_ptr, y0, y1, y2, y3, tile, m, stride_ym, T)
            acc0 = gl.zeros([W, 32, T], gl.float32, S3)
            acc1 = gl.zeros([W, 32, T], gl.float32, S3)
            acc2 = gl.zeros([W, 32, T], gl.float32, S3)
            acc3 = gl.zeros([W, 32, T], gl.float32, S3)
            up0 = acc0
            up1 = acc1
            up2 = acc2
            up3 = acc3


@gluon.jit
def _ws_producer(w_desc, ring, up_ring, ready, empty, pid, P, n_out, n_chunks, spt, total,
                 WU: gl.constexpr, STAGES: gl.constexpr, SILU_MUL: gl.constexpr):
    NBYTES: gl.constexpr = (2 if SILU_MUL else 1) * WU * 512
    for g in range(total):
        slot = g % STAGES
        row = (pid + (g // spt) * P) * n_chunks + (g % spt) * WU
        mbarrier.wait(empty.index(slot), ((g // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, NBYTES)
        tma.async_copy_global_to_shared(w_desc, [row, 0], bar, ring.index(slot))
        if SILU_MUL:
            tma.async_copy_global_to_shared(w_desc, [row + n_out * n_chunks, 0], bar,
                                            up_ring.index(slot))


@gluon.jit(do_not_specialize=["m"])
def _int4_ws_kernel(x_ptr, w_desc, ws_ptr, b_ptr, y_ptr, m, k, stride_x32, stride_ym, n_out,
                    GROUP: gl.constexpr, W: gl.constexpr, U: gl.constexpr,
                    STAGES: gl.constexpr, SD: gl.constexpr, BF16: gl.constexpr,
                    HAS_BIAS: gl.constexpr, PDL: gl.constexpr, SILU_MUL: gl.constexpr,
                    AHEAD: gl.constexpr, DRY: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    WU: gl.constexpr = W * U
    ring = gl.allocate_shared_memory(gl.int32, [STAGES, WU, 128], w_desc.layout)
    up_ring = ring
    if SILU_MUL:
        up_ring = gl.allocate_shared_memory(gl.int32, [STAGES, WU, 128], w_desc.layout)
    PLAIN: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])
    words = ring._reinterpret(gl.int32, [STAGES, W, U, 32, 4], PLAIN)
    up_words = up_ring._reinterpret(gl.int32, [STAGES, W, U, 32, 4], PLAIN)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=1)
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    n_chunks = k // 64
    n_groups = k // GROUP
    spt = n_chunks // WU
    total = ((n_out - pid + P - 1) // P) * spt
    gl.warp_specialize([
        (_ws_consumer, (x_ptr, ws_ptr, b_ptr, y_ptr, m, stride_x32, stride_ym, words, up_words,
                        ready, empty, pid, P, n_out, n_groups, spt, total, GROUP, W, U, STAGES,
                        SD, BF16, HAS_BIAS, PDL, SILU_MUL, AHEAD, DRY)),
        (_ws_producer, (w_desc, ring, up_ring, ready, empty, pid, P, n_out, n_chunks, spt,
                        0 if DRY % 3 else total, WU, STAGES, SILU_MUL)),
    ], [1], [PRODUCER_REGS])


_SMS: dict = {}


def maxnreg(w: int, per_sm: int) -> int | None:
    """The register cap a thread that lets ``per_sm`` programs of ``w`` consumer warps and a
    producer warp group share an SM (64 K registers); None (Triton's 256) for one program."""
    if per_sm == 1:
        return None
    return min(256, 65536 // (per_sm * (w + 4) * 32)) // 8 * 8


def int4_ws_linear(x: torch.Tensor, words: torch.Tensor, ws: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None, config: tuple,
                   silu_mul: bool = False) -> torch.Tensor:
    """As :func:`gk.int4_fragments_linear` for at most 8 tokens, with ``config`` (W, U, STAGES,
    SD, PER_SM)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    m, k = x.shape
    if m > gk.TOKENS:
        raise ValueError(f"int4 ws kernel: {m} tokens, one tile of {gk.TOKENS} at most")
    w, u, stages, sd, per_sm, ahead, dry = (*config, 0, 0)[:7]
    n = 16 * words.shape[0]
    n_chunks = k // 64
    if w % 4 or n_chunks % (w * u) or (w * u * 64) % group_size or sd not in (1, 2):
        raise ValueError(f"int4 ws kernel: config {config} for k {k}, group {group_size}")
    out = n // 32 if silu_mul else n // 16
    y = torch.empty((m, 16 * out), dtype=x.dtype, device=x.device)
    dev = x.device.index or 0
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = words.view(-1, 128)
    desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [w * u, 128], _ROWS)
    pdl = gk.pdl_enabled(x.device)
    _int4_ws_kernel[(min(out, _SMS[dev] * per_sm),)](
        x, desc, ws, bias if bias is not None else ws, y, m, k, x.stride(0) // 2, y.stride(0),
        out, GROUP=group_size, W=w, U=u, STAGES=stages, SD=sd, BF16=x.dtype == torch.bfloat16,
        HAS_BIAS=bias is not None, PDL=pdl, SILU_MUL=silu_mul, AHEAD=ahead, DRY=dry,
        PRODUCER_REGS=24,
        num_warps=w, launch_pdl=pdl, **({"maxnreg": cap} if (cap := maxnreg(w, per_sm)) else {}))
    return y


# --- the sweep, the timeline, compile-only -------------------------------------------------

DEFAULT_CONFIGS = {  # run 1 (H100): one program an SM of 4 consumer warps lost 50-80%; run 2:
    # 16 consumer warps an SM lost 24-37%; run 3: the words a step ahead out of the ring (AHEAD)
    # lost as much; run 4: the arithmetic alone (DRY 1) as slow; run 5: DRY 2 and 3
    "qkv": ["4x4x4x2x3", "4x4x4x2x3x0x2", "4x4x4x2x3x0x3", "4x4x6x2x3x0x3"],
    "o": ["4x4x4x2x3", "4x4x4x2x3x0x2", "4x4x4x2x3x0x3", "4x2x4x2x4x0x3"],
    "gate_up": ["4x2x3x2x4", "4x2x3x2x4x0x1", "4x2x3x2x4x0x2", "4x2x3x2x4x0x3",
                "4x2x6x2x4x0x3", "4x2x3x2x2x0x2", "4x2x3x2x2x0x3"],
    "down": ["8x2x4x2x2", "8x2x4x2x2x0x2", "8x2x4x2x2x0x3", "4x2x4x2x4x0x3", "8x2x6x2x2x0x3"],
}


def _parse(spec: str) -> tuple:
    return tuple(map(int, spec.split("x")))


def sweep(args) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quant_kernels import fragment_copies, time_calls
    table = dict(item.split("=") for item in args.configs.split(",")) if args.configs else {}
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        silu = name == "gate_up"
        copies = fragment_copies(n, k, GROUP)
        nbytes = copies[0][0].numel() * 4 + copies[0][1].numel() * 4
        specs = table[name].split("+") if name in table else DEFAULT_CONFIGS[name]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            committed = gk.fragments_config(n, k, GROUP, 1)
            base = gk.int4_fragments_linear(x, copies[0][0], copies[0][1], GROUP, None,
                                            committed, silu_mul=silu)
            sec = time_calls([lambda c=c, x=x, cfg=committed, silu=silu: gk.int4_fragments_linear(
                x, c[0], c[1], GROUP, None, cfg, silu_mul=silu) for c in copies])
            row = dict(shape=name, m=m, config="committed " + "x".join(map(str, committed)),
                       us=round(sec * 1e6, 2), tbps=round(nbytes / sec / 1e12, 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
            for spec in specs:
                cfg = _parse(spec)
                try:
                    want = gk.int4_fragments_linear(x, copies[0][0], copies[0][1], GROUP, None,
                                                    cfg[:2], silu_mul=silu)
                    y = int4_ws_linear(x, copies[0][0], copies[0][1], GROUP, None, cfg, silu)
                    torch.cuda.synchronize()
                    sec = time_calls([lambda c=c, x=x, cfg=cfg, silu=silu: int4_ws_linear(
                        x, c[0], c[1], GROUP, None, cfg, silu) for c in copies])
                except Exception as e:  # a config that does not compile or launch: recorded
                    row = dict(shape=name, m=m, config=spec, error=f"{type(e).__name__}: "
                               f"{str(e).splitlines()[0][:300] if str(e) else ''}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                row = dict(shape=name, m=m, config=spec, us=round(sec * 1e6, 2),
                           tbps=round(nbytes / sec / 1e12, 3),
                           equal=bool(torch.equal(y, want)),
                           equal_committed=bool(torch.equal(y, base)),
                           finite=bool(torch.isfinite(y).all()),
                           max_diff=float((y.float() - want.float()).abs().max()))
                rows.append(row)
                print(json.dumps(row), flush=True)
        del copies
        torch.cuda.empty_cache()
    return rows


def best_per_shape(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if "us" not in r or r["m"] != 1:
            continue
        e = out.setdefault(r["shape"], {})
        if r["config"].startswith("committed"):
            e["committed"] = r["us"]
            continue
        if r.get("equal") and ("best" not in e or r["us"] < e["best"][1]):
            e["best"] = (r["config"], r["us"])
    return out


def timeline(table: dict, out: Path) -> None:
    """batch1_timeline.py's INT4 g128 run with the WS kernel at one token tile for the shapes
    of ``table`` ({(n, k): config}); the committed kernel elsewhere."""
    committed = gk.int4_fragments_linear

    def patched(x, words, ws, group_size, bias, config=None, silu_mul=False):
        n = 16 * words.shape[0]
        cfg = table.get((n, x.shape[1]))
        if config is None and cfg and x.shape[0] <= gk.TOKENS and group_size == GROUP:
            return int4_ws_linear(x, words, ws, group_size, bias, cfg, silu_mul)
        return committed(x, words, ws, group_size, bias, config, silu_mul)

    gk.int4_fragments_linear = patched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "issue12_tenth_pass"))
    import batch1_timeline
    sys.argv = ["batch1_timeline.py", "--formats", "int4_wo", "--out", str(out)]
    batch1_timeline.main()


def compile_only(specs: list[tuple[str, str]]) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    print("| shape | W x U x STAGES x SD x PER_SM | registers | spills | shared (bytes) |")
    print("|---|---|---|---|---|")
    for name, spec in specs:
        w, u, stages, sd, per_sm, ahead, dry = (*_parse(spec), 0, 0)[:7]
        cx = {"GROUP": GROUP, "W": w, "U": u, "STAGES": stages, "SD": sd, "BF16": True,
              "HAS_BIAS": False, "PDL": True, "SILU_MUL": name == "gate_up", "AHEAD": ahead,
              "DRY": dry, "PRODUCER_REGS": 24}
        rows = torch.zeros(64, 128, dtype=torch.int32)  # only its type is used
        desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [w * u, 128], _ROWS)
        sig = {"x_ptr": "*bf16", "w_desc": mangle_type(desc), "ws_ptr": "*fp32",
               "b_ptr": "*fp32", "y_ptr": "*bf16",
               "m": "i32", "k": "i32", "stride_x32": "i32", "stride_ym": "i32", "n_out": "i32"}
        src = GluonASTSource(_int4_ws_kernel, signature=sig | {c: "constexpr" for c in cx},
                             constexprs=cx, attrs={(p,): [["tt.divisibility", 16]]
                                                   for p in (0, 2, 3, 4, 6, 7, 8)})
        options = {"num_warps": w} | ({"maxnreg": cap} if (cap := maxnreg(w, per_sm)) else {})
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "k.ptx").write_text(out.asm["ptx"])
            log = subprocess.run([str(ptxas), "-lineinfo", "-v", "--gpu-name=sm_90a",
                                  f"{d}/k.ptx", "-o", f"{d}/k.o"], capture_output=True,
                                 text=True).stderr
        if "--dump" in sys.argv:
            Path(f"/tmp/ws_{name}_{spec}.ptx").write_text(out.asm["ptx"])
            Path(f"/tmp/ws_{name}_{spec}.ttgir").write_text(out.asm["ttgir"])
        regs = [ln for ln in log.splitlines() if "registers" in ln]
        spill = [ln for ln in log.splitlines() if "spill" in ln]
        print(f"| {name} | {spec} | {regs[-1].split('Used')[-1].strip() if regs else log[:200]}"
              f" | {spill[-1].strip() if spill else ''} | {out.metadata.shared} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ms", default="1,8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--configs", help="shape=WxUxSxSDxPER_SM[+...],...")
    parser.add_argument("--timeline", help="'best' (the sweep's in --out), 'committed', or "
                        "shape=config,...")
    parser.add_argument("--compile_only", action="store_true")
    parser.add_argument("--dump", action="store_true")
    args = parser.parse_args()
    if args.compile_only:
        table = dict(item.split("=") for item in args.configs.split(",")) if args.configs \
            else {s: "+".join(c) for s, c in DEFAULT_CONFIGS.items()}
        compile_only([(s, c) for s in args.shapes.split(",") if s in table
                      for c in table[s].split("+")])
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "int4_ws.json"
    if args.timeline:
        if args.timeline == "best":
            best = json.loads(results.read_text())["best"]
            table = {SHAPES[s]: _parse(e["best"][0]) for s, e in best.items()
                     if "best" in e and e["best"][1] < e.get("committed", 1e9)}
        elif args.timeline == "committed":
            table = {}
        else:
            table = {SHAPES[s]: _parse(c) for s, c in
                     (item.split("=") for item in args.timeline.split(","))}
        print("timeline with", {s: table.get(SHAPES[s]) for s in SHAPES}, flush=True)
        timeline(table, args.out)
        return
    rows = sweep(args)
    best = best_per_shape(rows)
    for key, e in best.items():
        print(key, e, flush=True)
    results.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), group=GROUP,
                                       best=best, results=rows), indent=1))


if __name__ == "__main__":
    main()
