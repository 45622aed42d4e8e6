"""The INT4 Gluon kernel with its activations in shared memory (``SMEM_X``, the config's third
item) and its words and scales one or two iterations ahead (``DEPTH``, the fourth), against the
committed kernel (activations in registers one iteration ahead), Llama-3.1-8B shapes, group
128, bf16, one token. The kernel's SMEM_X and DEPTH are in ``int4_smemx_not_kept.patch`` beside
this script (kept only if measured faster); apply it (``git apply``) to run this; ``run1.sh``
does.

    PYTHONPATH=. python3 benchmarks/issue12_fortieth_session/int4_smemx.py --out DIR [--ms 1]
    PYTHONPATH=. python3 benchmarks/issue12_fortieth_session/int4_smemx.py --out DIR \\
        --timeline best|committed|qkv=4x4x1x2,...   (batch-1 INT4 g128 through EngineCore,
                                                     these configs at one token)
    PYTHONPATH=. python3 benchmarks/issue12_fortieth_session/int4_smemx.py --compile_only \\
        [--configs gate_up=2x2x1x2,...]   (no GPU: compiles for sm_90a, prints registers,
                                           spills, shared memory and programs an SM)

Why: the kernel is latency-bound (ncu, thirty-seventh session: 3.3 warps a scheduler, each
waiting on its own word loads, one iteration of them in flight). Words two iterations ahead
cost registers past one wave unless the activations leave the registers (gate_up's 2 x 2: 127
registers with them one ahead, 76 without), and loading them from global memory in the
iteration that uses them cost 0.6-4.7 us a call (thirty-eighth session). Here each program
copies its token rows' activations into shared memory once, after the PDL wait (one
``cp.async`` op, one block barrier; 8 KB a token at K = 4,096, 32 KB for down's K = 14,336
with its 7 iterations rounded up to 8), and each iteration reads its operands with two
``ld.shared.v4`` a chunk (the lanes of one column reading the same bytes: a broadcast, no bank
conflict at one token). Compiled for sm_90a on the CPU (ptxas, no spills), two ahead then takes
gate_up 102 registers, down, o and qkv 99-100, each inside one wave (``--compile_only``).

Method as int4_ahead.py (thirty-seventh session): each call timed in a CUDA graph over weight
copies that miss L2; gate_up runs as the engine runs it, silu * up fused. Every output is
compared bit for bit with the register kernel's at the same warps x chunks (the loads' place
changes no arithmetic; another warps x chunks sums in another order).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "issue12_thirty_seventh_session"))

import int4_ahead  # noqa: E402

from kiln.plugins.quant_linear import gluon_kernels  # noqa: E402

SHAPES = int4_ahead.SHAPES
GROUP = int4_ahead.GROUP
# Past the committed (W, U), at one token: (W, U, SMEM_X, DEPTH). Registers a thread (ptxas,
# sm_90a; the committed kernel 128 at each shape): shared memory one ahead 72-80, two ahead
# 99-102 at the committed (W, U), 64-66 at U = 2 but gate_up's (102 at 4 x 2, 76 at 2 x 1).
CONFIGS = {
    "qkv": [(4, 4, 1, 1), (4, 4, 1, 2), (8, 2, 1, 2), (4, 2, 1, 2)],
    "o": [(8, 4, 1, 1), (8, 4, 1, 2), (8, 2, 1, 2), (4, 4, 1, 2)],
    "gate_up": [(2, 2, 1, 1), (2, 2, 1, 2), (4, 2, 1, 2), (2, 1, 1, 2)],
    "down": [(8, 4, 1, 1), (8, 4, 1, 2), (8, 2, 1, 2), (4, 4, 1, 2)],
}
# The grids' programs (gate_up: gate and up tiles in one program) and an SM's limits (sm_90)
PROGRAMS = {"qkv": 384, "o": 256, "gate_up": 896, "down": 256}
SMS, SM_REGISTERS, SM_WARPS, SM_SHARED, RESERVED = 132, 65536, 64, 233472, 1024


def configs_for(name: str, n: int, k: int, tiles: int) -> list[tuple]:
    """The committed (W, U) first, then (at one token tile) CONFIGS' items."""
    committed = gluon_kernels.fragments_config(n, k, GROUP, tiles)[:2]
    return [committed] + (CONFIGS[name] if tiles == 1 else [])


def sweep(args) -> list[dict]:
    """Each shape at each M and config; each output compared bit for bit with the register
    kernel's at its (W, U) (that one run once more, untimed, where the sweep has not)."""
    from quant_kernels import fragment_copies, time_calls
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        silu = name == "gate_up"
        copies = fragment_copies(n, k, GROUP)
        nbytes = copies[0][0].numel() * 4 + copies[0][1].numel() * 4
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            tiles = gluon_kernels.token_tiles(m)
            configs = configs_for(name, n, k, tiles)
            want = {}
            for cfg in configs:
                try:
                    if cfg[:2] not in want:
                        want[cfg[:2]] = int4_ahead._call(x, copies[0], cfg[:2], silu)
                    y = int4_ahead._call(x, copies[0], cfg, silu)
                    sec = time_calls([lambda c=c, cfg=cfg, x=x, silu=silu:
                                      int4_ahead._call(x, c, cfg, silu) for c in copies])
                except Exception as e:  # a config that does not compile or launch: recorded
                    row = dict(shape=name, m=m, config=list(cfg), error=f"{type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                row = dict(shape=name, m=m, tiles=tiles, config=list(cfg),
                           committed=cfg == configs[0], us=round(sec * 1e6, 2),
                           tbps=round(nbytes / sec / 1e12, 3),
                           equal=bool(torch.equal(y, want[cfg[:2]])),
                           finite=bool(torch.isfinite(y).all()))
                rows.append(row)
                print(json.dumps(row), flush=True)
        del copies, want
        torch.cuda.empty_cache()
    return rows


def timeline(table: dict, out: Path) -> int:
    """batch1_timeline.py's INT4 run with ``table``'s configs ({(n, k): config}, gate_up keyed
    by its [gate | up] rows) for one token (the decode steps' calls at batch 1; the prefill and
    the graphs of more rows keep the committed choice)."""
    linear = gluon_kernels.int4_fragments_linear

    def patched(x, words, ws, group_size, bias, config=None, silu_mul=False):
        key = (16 * words.shape[0], x.shape[1])
        if config is None and x.shape[0] == 1 and key in table:
            config = table[key]
        return linear(x, words, ws, group_size, bias, config, silu_mul)

    gluon_kernels.int4_fragments_linear = patched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "issue12_tenth_pass"))
    import batch1_timeline
    sys.argv = ["batch1_timeline.py", "--formats", "int4_wo", "--out", str(out)]
    return batch1_timeline.main()


def compile_only(specs: str) -> None:
    """Each shape=WxUxSMEM_XxDEPTH of ``specs`` compiled for sm_90a (bf16, no bias, PDL, one
    token; gate_up with silu * up): registers and spills (ptxas -v), shared memory a program
    (Triton's, the block's reserved 1 KB besides), programs an SM and whether the grid is one
    wave (132 SMs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "ws_ptr": "*fp32", "b_ptr": "*fp32",
           "y_ptr": "*bf16", "m": "i32", "k": "i32", "stride_x32": "i32", "stride_ym": "i32"}
    print("| shape | W x U | SMEM_X | DEPTH | registers | spill stores/loads (bytes) | "
          "shared (bytes) | programs an SM | one wave |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in specs.split(","):
        name, cfg = spec.split("=")
        w, u, smem_x, depth = map(int, cfg.split("x"))
        n, k = SHAPES[name]
        x_it = triton.next_power_of_2(k // 64 // (w * u)) if smem_x else 0
        cx = {"GROUP": GROUP, "W": w, "U": u, "T": 1, "BF16": True, "HAS_BIAS": False,
              "PDL": True, "SILU_MUL": name == "gate_up", "SMEM_X": smem_x, "DEPTH": depth,
              "X_IT": x_it}
        src = GluonASTSource(gluon_kernels._int4_fragments_kernel,
                             signature=sig | {c: "constexpr" for c in cx}, constexprs=cx,
                             attrs={(p,): [["tt.divisibility", 16]]
                                    for p in (0, 1, 2, 3, 4, 6, 7, 8)})
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": w})
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "k.ptx").write_text(out.asm["ptx"])
            log = subprocess.run([str(ptxas), "-lineinfo", "-v", "--gpu-name=sm_90a",
                                  f"{d}/k.ptx", "-o", f"{d}/k.o"], capture_output=True,
                                 text=True, check=True).stderr
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        spills = "/".join(re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                    log).groups())
        shared = out.metadata.shared
        per_warp = -(-regs * 32 // 256) * 256  # registers are allocated a warp at a time
        per_sm = min(SM_REGISTERS // per_warp // w, SM_WARPS // w,
                     SM_SHARED // (shared + RESERVED), 32)
        wave = "yes" if per_sm * SMS >= PROGRAMS[name] else "no"
        print(f"| {name} | {w} x {u} | {smem_x} | {depth} | {regs} | {spills} | {shared} | "
              f"{per_sm} | {wave} ({per_sm * SMS} for {PROGRAMS[name]}) |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ms", default="1")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--timeline", help="'best' (the sweep's in --out), 'committed', or "
                        "shape=config items joined by x,...")
    parser.add_argument("--compile_only", action="store_true")
    parser.add_argument("--configs", default=",".join(
        f"{s}={w}x{u}x{x}x{d}" for s in SHAPES for (w, u) in [configs_for(s, *SHAPES[s], 1)[0]]
        for x in (0, 1) for d in (1, 2)), help="--compile_only's shape=WxUxSMEM_XxDEPTH items")
    args = parser.parse_args()
    if args.compile_only:
        compile_only(args.configs)
        return 0
    if args.out is None:
        parser.error("--out is required (but for --compile_only)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "int4_smemx.json"
    if args.timeline:
        if args.timeline == "best":
            best = json.loads(results.read_text())["best"]
            table = {SHAPES[s]: tuple(best[s + "@1"]["best"][0]) for s in SHAPES
                     if s + "@1" in best}
        elif args.timeline == "committed":
            table = {}
        else:
            table = {SHAPES[shape]: tuple(map(int, cfg.split("x"))) for shape, cfg in
                     (item.split("=") for item in args.timeline.split(","))}
        print("timeline with", {s: table.get(SHAPES[s]) for s in SHAPES}, flush=True)
        return timeline(table, args.out)
    rows = sweep(args)
    best = int4_ahead.best_per_shape(rows)
    for key, e in best.items():
        print(key, e, flush=True)
    results.write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), group=GROUP, best=best, results=rows),
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
