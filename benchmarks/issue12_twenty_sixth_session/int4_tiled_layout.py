"""Does the INT4 weight's memory layout limit the tensor-core kernel at one token?

    PYTHONPATH=. python3 benchmarks/issue12_twenty_sixth_session/int4_tiled_layout.py --out DIR
    PYTHONPATH=. python3 benchmarks/issue12_twenty_sixth_session/int4_tiled_layout.py --ncu
        (under ncu: a few plain launches of each variant on gate_up, M = 1)

The engine's INT4 weight is row-major (``[N, K/2]``, split-group bytes). Each program of
``_int4_mma_kernel`` reads, per group, 64 bytes of each of its ``BLOCK_N`` rows: runs of 64-128
bytes at a 2 KiB stride (gate_up), and its group scales at a 128-byte stride. The FP8 GEMV reads
1 KiB runs of a row per iteration and streams at 3.9 TB/s in the graph; the INT4 kernels at
1.4-2.3. Here the same kernel (a copy, its arithmetic unchanged) reads a tiled layout: rows in
tiles of ``TILE``, each (tile, group) block of ``TILE`` x G/2 bytes contiguous, scales likewise
(``[N / TILE, groups, TILE]``), so a program's group is one contiguous run of TILE x 64 bytes.
Outputs must equal the engine kernel's bit for bit (same products, same order).

Each case is a CUDA graph of calls over weight copies >= 3x the L2 (as quant_kernels.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_kernels import copies_for, nbytes, time_calls  # noqa: E402

from kiln.plugins.pdl import enabled as pdl_enabled  # noqa: E402
from kiln.plugins.pdl.triton_kernels import prologue  # noqa: E402
from kiln.plugins.quant_linear.triton_kernels import (  # noqa: E402
    _int4_mma,
    _int4_words_to_halves,
    int4_mma_config,
)
from kiln.plugins.split_counters import split_counters  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
GROUP = 128


@triton.jit
def _int4_mma_tiled_kernel(x_ptr, w_ptr, ws_ptr, y_ptr, part_ptr, count_ptr, m, n, k,
                           stride_xm, stride_ym, HALF: tl.constexpr, GROUPS: tl.constexpr,
                           SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                           TILE: tl.constexpr, SCALES_T: tl.constexpr = False,
                           PDL: tl.constexpr = False):
    """``_int4_mma_kernel`` (no bias) reading the tiled layout when TILE > 0, row-major when 0
    (with its scales transposed, ``[groups, N]``, when ``SCALES_T``)."""
    prologue(PDL)
    WORDS: tl.constexpr = HALF // 4
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    tok = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_ok = tok < m
    n_groups = k // (2 * HALF)
    if TILE:
        tile = (rows // TILE).to(tl.int64)
        w_rows = (w_ptr.to(tl.pointer_type(tl.int32))
                  + (tile * (n_groups * TILE * WORDS) + (rows % TILE) * WORDS)[:, None])
        s_rows = ws_ptr + tile * (n_groups * TILE) + rows % TILE
        W_STRIDE: tl.constexpr = TILE * WORDS
        s_stride = TILE
    else:
        w_rows = (w_ptr.to(tl.pointer_type(tl.int32))
                  + rows[:, None].to(tl.int64) * (n_groups * WORDS))
        W_STRIDE: tl.constexpr = WORDS
        if SCALES_T:  # scales [groups, N]: a group's rows contiguous
            s_rows = ws_ptr + rows
            s_stride = n
        else:
            s_rows = ws_ptr + rows.to(tl.int64) * n_groups
            s_stride = 1
    j = tl.arange(0, WORDS)
    x_toks = x_ptr + tok[None, :].to(tl.int64) * stride_xm
    f = tl.arange(0, 2 * HALF)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    per_split = n_groups // SPLITS
    first = tl.program_id(2) * per_split
    for g0 in range(first, first + per_split, GROUPS):
        for gi in tl.static_range(GROUPS):
            g = g0 + gi
            w = tl.load(w_rows + g * W_STRIDE + j[None, :], mask=row_ok[:, None], other=0)
            q0, q1, q2, q3, q4, q5, q6, q7 = _int4_words_to_halves(w, x_ptr.dtype.element_ty
                                                                    == tl.bfloat16)
            xg = tl.load(x_toks + g * (2 * HALF) + f[:, None], mask=tok_ok[None, :], other=0.0)
            x_lo, x_hi = tl.split(xg.reshape(2, WORDS, 2, 2, BLOCK_M).permute(4, 1, 2, 3, 0))
            x0, x2 = tl.split(x_lo)
            x1, x3 = tl.split(x_hi)
            part = tl.dot(tl.join(q0, q4).reshape(BLOCK_N, 2 * WORDS),
                          x0.reshape(BLOCK_M, 2 * WORDS).T)
            part = tl.dot(tl.join(q1, q5).reshape(BLOCK_N, 2 * WORDS),
                          x1.reshape(BLOCK_M, 2 * WORDS).T, part)
            part = tl.dot(tl.join(q2, q6).reshape(BLOCK_N, 2 * WORDS),
                          x2.reshape(BLOCK_M, 2 * WORDS).T, part)
            part = tl.dot(tl.join(q3, q7).reshape(BLOCK_N, 2 * WORDS),
                          x3.reshape(BLOCK_M, 2 * WORDS).T, part)
            acc += part * tl.load(s_rows + g * s_stride, mask=row_ok, other=0.0)[:, None]
    ok = row_ok[:, None] & tok_ok[None, :]
    last = True
    if SPLITS > 1:
        runs = part_ptr + tok[None, :].to(tl.int64) * n + rows[:, None]
        tl.store(runs + tl.program_id(2) * m * n, acc, mask=ok)
        tl.debug_barrier()
        tile_id = count_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        last = tl.atomic_add(tile_id, 1, sem="acq_rel", scope="gpu") == SPLITS - 1
        if last:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for split in tl.static_range(SPLITS):
                acc += tl.load(runs + split * m * n, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(tile_id, 0, sem="relaxed", scope="gpu")
    if last:
        out = y_ptr + tok[None, :].to(tl.int64) * stride_ym + rows[:, None]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)


def tiled(w: torch.Tensor, ws: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major engine weight [N, K/2] and scales [N, groups] -> the tiled layout."""
    n, half_k = w.shape
    groups = ws.shape[1]
    wt = w.view(n // tile, tile, groups, half_k // groups).permute(0, 2, 1, 3).contiguous()
    st = ws.view(n // tile, tile, groups).permute(0, 2, 1).contiguous()
    return wt.view(n, half_k), st.view(n, groups)


def launch(x, w, ws, config, tile, scales_t=False):
    m, k = x.shape
    n = w.shape[0]
    block_n, block_m, groups, warps, stages, splits = config
    splits = math.gcd(k // GROUP, splits)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    runs = counters = y
    if splits > 1:
        runs = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        counters = split_counters(x.device, "int4 split-K")
    pdl = pdl_enabled(x.device)
    _int4_mma_tiled_kernel[grid](
        x, w, ws, y, runs, counters, m, n, k, x.stride(0), y.stride(0), HALF=GROUP // 2,
        GROUPS=math.gcd(k // GROUP // splits, groups), SPLITS=splits, BLOCK_N=block_n,
        BLOCK_M=block_m, TILE=tile, SCALES_T=scales_t, PDL=pdl, num_warps=warps, num_stages=stages,
        launch_pdl=pdl)
    return y


def variants(name: str, n: int, k: int, m: int) -> list[tuple[str, tuple, int]]:
    """(label, config, tile) to time beside the engine kernel; tile -1: row-major weights,
    scales transposed."""
    base = tuple(int4_mma_config(n, k, m))
    block_n, block_m, groups, warps, stages, splits = base
    out = [("copy_rowmajor", base, 0), ("scales_t", base, -1), ("tiled32", base, 32),
           ("scales_t_g4", (block_n, block_m, 4, warps, stages, splits), -1),
           ("scales_t_s4", (block_n, block_m, groups, warps, 4, splits), -1)]
    if block_n >= 64:
        out.append((f"tiled{block_n}", base, block_n))
    for g in (4, 8):
        for s in (2, 3):
            out.append((f"tiled32_g{g}_s{s}", (block_n, block_m, g, warps, s, splits), 32))
    if name in ("qkv", "o", "down"):
        for bn, w in ((64, 4), (128, 4)):
            for sp in (2, 4, 8):
                out.append((f"tiled32_bn{bn}_w{w}_sp{sp}", (bn, block_m, 2, w, 3, sp), 32))
    return out


SPLIT_SWEEP = {
    "gate_up": [(128, 8, 2, 4, 3, 1), (128, 8, 2, 4, 3, 2), (128, 8, 2, 4, 4, 2),
                (128, 8, 2, 4, 3, 4), (128, 8, 1, 4, 4, 2), (64, 8, 2, 2, 3, 1),
                (64, 8, 2, 2, 3, 2), (64, 8, 2, 2, 4, 2), (64, 8, 2, 2, 3, 4),
                (256, 8, 2, 8, 3, 2), (256, 8, 2, 8, 3, 4)],
    "down": [(32, 8, 2, 2, 4, 4), (32, 8, 2, 2, 4, 8), (32, 8, 2, 2, 4, 16),
             (64, 8, 2, 2, 3, 4), (64, 8, 2, 2, 3, 8), (64, 8, 2, 2, 4, 8),
             (64, 8, 2, 2, 3, 16), (128, 8, 2, 4, 3, 8), (128, 8, 2, 4, 3, 16)],
}
SPLIT_SWEEP["qkv"] = SPLIT_SWEEP["o"] = [
    (32, 8, 2, 2, 4, 2), (32, 8, 2, 2, 4, 4), (32, 8, 2, 2, 4, 8), (64, 8, 2, 2, 3, 2),
    (64, 8, 2, 2, 3, 4), (64, 8, 2, 2, 3, 8), (64, 8, 2, 2, 4, 8), (128, 8, 2, 4, 3, 4),
    (128, 8, 2, 4, 3, 8), (128, 8, 2, 4, 3, 16)]


def split_sweep(results: list, shapes: list[str]) -> None:
    """The engine kernel (row-major) at one token over program sizes and split counts; qkv and
    o also through the GEMV they take at one token."""
    from kiln.plugins.quant_linear.triton_kernels import PATHS
    gemv = PATHS["int4_weight_only_linear"]["gemv"]
    for name in shapes:
        n, k = SHAPES[name]
        weights = [(torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8),
                    torch.rand(n, k // GROUP, device="cuda") / 100)]
        weights += [(torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8),
                     torch.rand(n, k // GROUP, device="cuda") / 100)
                    for _ in range(copies_for(nbytes(weights[0])) - 1)]
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cases = [("engine", None)] + [("mma", c) for c in SPLIT_SWEEP[name]]
            if name in ("qkv", "o") and m == 1:
                cases.insert(0, ("gemv", None))
            for label, config in cases:
                if label == "gemv":
                    fns = [lambda w=w, x=x: gemv(x, w[0], w[1], GROUP, None) for w in weights]
                else:
                    fns = [lambda w=w, x=x, c=config: _int4_mma(x, w[0], w[1], GROUP, None, c)
                           for w in weights]
                sec = time_calls(fns)
                row = dict(shape=name, m=m, label=label,
                           config=list(config or int4_mma_config(n, k, m)), us=sec * 1e6,
                           tbps=nbytes(weights[0]) / sec / 1e12)
                results.append(row)
                print(json.dumps(row), flush=True)
        del weights
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ncu", action="store_true")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--labels", type=lambda v: v.split(","), default=None,
                        help="only these variants (copy_rowmajor, scales_t, tiled32, ...)")
    parser.add_argument("--split_sweep", action="store_true",
                        help="time the engine kernel's program sizes and splits instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.split_sweep:
        results = []
        split_sweep(results, args.shapes.split(","))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "int4_split_sweep.json").write_text(json.dumps(
                dict(device=torch.cuda.get_device_name(), results=results), indent=1))
        return
    if args.ncu:
        n, k = SHAPES["gate_up"]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        ws = torch.rand(n, k // GROUP, device="cuda") / 100
        wt, st = tiled(w, ws, 32)
        config = tuple(int4_mma_config(n, k, 1))
        from kiln.plugins.quant_linear.triton_kernels import PATHS
        w8 = (torch.randn(n, k, device="cuda") * 100).to(torch.float8_e4m3fn)
        s8 = torch.rand(n, device="cuda") / 1000
        fp8 = PATHS["fp8_linear"]["gemv"]
        for _ in range(3):
            _int4_mma(x, w, ws, GROUP, None)
            launch(x, wt, st, config, 32)
            fp8(x, w8, s8, torch.tensor([0.01], device="cuda"), None)
        torch.cuda.synchronize()
        return
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        probe_w = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        probe_s = torch.rand(n, k // GROUP, device="cuda") / 100
        copies = copies_for(nbytes((probe_w, probe_s)))
        weights = [(probe_w, probe_s)] + [
            (torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8),
             torch.rand(n, k // GROUP, device="cuda") / 100) for _ in range(copies - 1)]
        tiles = {}
        for m in (1, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = _int4_mma(x, probe_w, probe_s, GROUP, None)
            sec = time_calls([lambda w=w, x=x: _int4_mma(x, w[0], w[1], GROUP, None)
                              for w in weights])
            row = dict(shape=name, m=m, label="engine", config=list(int4_mma_config(n, k, m)),
                       us=sec * 1e6, tbps=nbytes(weights[0]) / sec / 1e12, exact=True)
            results.append(row)
            print(json.dumps(row), flush=True)
            for label, config, tile in variants(name, n, k, m):
                if tile > 0 and n % tile or args.labels and label not in args.labels:
                    continue
                if tile not in tiles:
                    tiles[tile] = [tiled(w, s, tile) if tile > 0 else
                                   (w, s.t().contiguous()) if tile < 0 else (w, s)
                                   for w, s in weights]
                ws_ = tiles[tile]
                try:
                    y = launch(x, ws_[0][0], ws_[0][1], config, max(tile, 0), tile < 0)
                    exact = bool(torch.equal(y, ref))
                    sec = time_calls([lambda w=w, x=x, c=config, t=tile:
                                      launch(x, w[0], w[1], c, max(t, 0), t < 0)
                                      for w in ws_])
                except Exception as exc:  # a config that does not compile or fit
                    row = dict(shape=name, m=m, label=label, config=list(config),
                               error=f"{type(exc).__name__}: {str(exc)[:200]}")
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                row = dict(shape=name, m=m, label=label, config=list(config), us=sec * 1e6,
                           tbps=nbytes(weights[0]) / sec / 1e12, exact=exact)
                results.append(row)
                print(json.dumps(row), flush=True)
        del weights, tiles
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "int4_tiled_layout.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), results=results), indent=1))


if __name__ == "__main__":
    main()
