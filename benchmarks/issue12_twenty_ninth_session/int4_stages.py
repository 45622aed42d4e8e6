"""The INT4 Gluon kernel with its words and scales copied ahead into a ring in shared memory
(``STAGES`` >= 2, ``cp.async``) against the committed register prefetch (``STAGES`` = 0: the
next iteration's words in registers), Llama-3.1-8B shapes, group 128, bf16 activations.
Measured and not kept (benchmarks/GPU_NOTES.md, twenty-ninth session): the ring is in
``int4_ring_not_kept.patch`` beside this script; apply it (``git apply``) to run this.

    PYTHONPATH=. python3 benchmarks/issue12_twenty_ninth_session/int4_stages.py --out DIR
        [--ms 1,8,16,32,64] [--warps 1,2,4,8] [--chunks 1,2,4] [--stages 0,3,5]
    PYTHONPATH=. python3 benchmarks/issue12_twenty_ninth_session/int4_stages.py \\
        --timeline "qkv=4x4x4,o=8x4x4,gate_up=2x2x4,down=8x4x4" --out DIR
        (batch-1 INT4 g128 through EngineCore, benchmarks/issue12_tenth_pass/batch1_timeline.py,
        with these (warps, chunks, stages) at one token tile, the committed choice elsewhere)

Why: at one token the register-prefetch kernel keeps about one iteration of words in flight
per warp (~27 KB an SM for gate_up), short of what an H200's bandwidth-latency product asks;
copies into shared memory hold no registers, so S - 1 iterations can be in flight.

Each call is timed in a CUDA graph over enough weight copies to miss L2 (quant_kernels.py's
method); the largest difference of each from a float32 reference, and whether every output is
finite, beside it. Per M: the committed config (``fragments_config``) and every (W, U, S) of
the sweep that divides the row's chunks in whole groups of 128 (at one token tile; with more,
the committed warps and chunks at each ring depth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_kernels import copies_for, time_calls  # noqa: E402

from kiln.plugins.quant_linear import gluon_kernels  # noqa: E402
from kiln.plugins.quant_linear.layout import pack_fragments  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
GROUP = 128


def sweep(args) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    grid = [(w, u, s) for s in map(int, args.stages.split(","))
            for u in map(int, args.chunks.split(",")) for w in map(int, args.warps.split(","))]
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies, deq = [], None
        for _ in range(copies_for(n * k // 2)):
            q = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
            s = torch.rand(n, k // GROUP, device="cuda") / 100 + 1e-3
            copies.append((pack_fragments(q), s))
            if deq is None:
                deq = (q.float().view(n, k // GROUP, GROUP) * s[:, :, None]).view(n, k)
            del q
        words_bytes = copies[0][0].numel() * 4 + copies[0][1].numel() * 4
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ deq.T
            scale = want.abs().max().item()
            tiles = gluon_kernels.token_tiles(m)
            committed = gluon_kernels.fragments_config(n, k, GROUP, tiles)
            if tiles == 1:  # the whole grid (one compile per config serves every shape)
                configs = [c for c in grid if (k // 64) % (c[0] * c[1]) == 0
                           and (c[0] * c[1] * 64) % GROUP == 0]
            else:  # more token tiles: the committed warps and chunks at each ring depth
                configs = [committed[:2] + (st,) for st in sorted({c[2] for c in grid})]
            configs = [committed] + [c for c in configs if c != committed]
            for cfg in configs:
                try:
                    y = gluon_kernels.int4_fragments_linear(x, copies[0][0], copies[0][1], GROUP,
                                                            None, cfg)
                    sec = time_calls([lambda c=c, cfg=cfg, x=x: gluon_kernels.int4_fragments_linear(
                        x, c[0], c[1], GROUP, None, cfg) for c in copies])
                except Exception as e:  # a config that does not compile or launch: recorded
                    row = dict(shape=name, m=m, config=list(cfg), error=f"{type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                err = (y.float() - want).abs().max().item()
                row = dict(shape=name, m=m, tiles=tiles, config=list(cfg),
                           committed=cfg == committed, us=sec * 1e6,
                           tbps=words_bytes / sec / 1e12, max_err_rel=err / scale,
                           finite=bool(torch.isfinite(y).all()))
                rows.append(row)
                print(json.dumps(row), flush=True)
        del copies, deq
        torch.cuda.empty_cache()
    return rows


def best_per_shape(rows: list[dict]) -> dict:
    """Per shape and M: the committed config's time and the fastest of the sweep."""
    out = {}
    for r in rows:
        if "us" not in r:
            continue
        key = f"{r['shape']}@{r['m']}"
        e = out.setdefault(key, {})
        if r["committed"]:
            e["committed"] = (r["config"], round(r["us"], 2))
        if "best" not in e or r["us"] < e["best"][1]:
            e["best"] = (r["config"], round(r["us"], 2))
    return out


def timeline(spec: str, out: Path) -> None:
    """batch1_timeline.py's INT4 run with ``spec``'s configs at one token tile."""
    table = {}
    for item in spec.split(","):
        name, cfg = item.split("=")
        table[SHAPES[name]] = tuple(map(int, cfg.split("x")))
    timeline_with(table, out)


def timeline_with(table: dict, out: Path) -> None:
    """batch1_timeline.py's INT4 run with ``table``'s configs ({(n, k): config}) at one token
    tile, the committed choice elsewhere."""
    committed = gluon_kernels.fragments_config

    def patched(n, k, group_size, tiles=1):
        if tiles == 1 and (n, k) in table:
            return table[(n, k)]
        return committed(n, k, group_size, tiles)

    gluon_kernels.fragments_config = patched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "issue12_tenth_pass"))
    import batch1_timeline
    sys.argv = ["batch1_timeline.py", "--formats", "int4_wo", "--out", str(out)]
    batch1_timeline.main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ms", default="1,8,16,32,64")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--warps", default="1,2,4,8")
    parser.add_argument("--chunks", default="1,2,4")
    parser.add_argument("--stages", default="0,3,5")
    parser.add_argument("--timeline", help="shape=WxUxS,... (or 'best': the sweep's in --out):"
                        " the batch-1 timeline with these")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.timeline == "best":  # the sweep's fastest at one token, from --out's results
        best = json.loads((args.out / "int4_stages.json").read_text())["best"]
        args.timeline = ",".join(f"{name}={'x'.join(map(str, best[name + '@1']['best'][0]))}"
                                 for name in SHAPES)
        print("timeline with", args.timeline, flush=True)
    if args.timeline:
        timeline(args.timeline, args.out)
        return
    rows = sweep(args)
    best = best_per_shape(rows)
    for key, e in best.items():
        print(key, e, flush=True)
    (args.out / "int4_stages.json").write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), group=GROUP, best=best, results=rows),
        indent=1))


if __name__ == "__main__":
    main()
