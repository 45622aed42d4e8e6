"""An INT4 weight-only GEMV for a few tokens in Gluon: weights pre-shuffled into the tensor-core
fragment order (the Marlin idea), loaded straight into registers, no shared memory. Since the
twenty-seventh session its kernel is the engine's (kiln/plugins/quant_linear/gluon_kernels.py,
with token tiles, float16 and a bias; the one-chunk-per-iteration variant is its U = 1); this
script times it as the prototype was timed.

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

from kiln.plugins.quant_linear.gluon_kernels import (  # noqa: E402
    _int4_fragments_kernel,
    int4_fragments_linear,
)
from kiln.plugins.quant_linear.layout import pack_fragments  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def int4_frag(x: torch.Tensor, words: torch.Tensor, ws: torch.Tensor, group: int,
              warps: int, chunks: int = 1) -> torch.Tensor:
    """The Gluon kernel at ``warps`` x ``chunks`` (since the twenty-seventh session the engine's:
    this prototype's kernel moved to kiln.plugins.quant_linear.gluon_kernels, with token tiles,
    float16 and a bias)."""
    return int4_fragments_linear(x, words, ws, group, None, (warps, chunks))


def compile_only(warps: int, group: int, chunks: int, tiles: int, silu_mul: bool = False) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "ws_ptr": "*fp32", "b_ptr": "*bf16",
           "y_ptr": "*bf16", "m": "i32", "k": "i32", "stride_x32": "i32", "stride_ym": "i32"}
    constexprs = {"GROUP": group, "W": warps, "U": chunks, "T": tiles, "BF16": True,
                  "HAS_BIAS": False, "PDL": True, "SILU_MUL": silu_mul}
    src = GluonASTSource(_int4_fragments_kernel,
                         signature=sig | {name: "constexpr" for name in constexprs},
                         constexprs=constexprs,
                         attrs={(p,): [["tt.divisibility", 16]] for p in (0, 1, 2, 3, 4, 6, 7, 8)})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    print("warps", warps, "chunks", chunks, "token tiles", tiles, "silu_mul", silu_mul, "shared",
          out.metadata.shared)
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
    parser.add_argument("--chunks", default="1,2", help="chunks per warp and iteration")  # U
    parser.add_argument("--tiles", default="1", help="8-token tiles per program, --compile_only")
    parser.add_argument("--silu_mul", action="store_true", help="--compile_only: the gate_up "
                        "kernel with silu(gate) * up fused")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    if args.compile_only:
        for t in map(int, args.tiles.split(",")):
            for u in map(int, args.chunks.split(",")):
                for w in map(int, args.warps.split(",")):
                    compile_only(w, 128, u, t, args.silu_mul)
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
