"""The INT4 Gluon kernel with a rolling L2 prefetch of its own words ``AHEAD`` iterations before
their loads (the config's third item: > 0 one bulk ``cp.async.bulk.prefetch.L2`` a warp and
iteration, < 0 each lane's ``prefetch.global.L2``), with and without a register cap (the
fourth item, ``maxnreg``), against the committed kernel, Llama-3.1-8B shapes, group 128, bf16.
Measured and not kept (benchmarks/GPU_NOTES.md, thirty-seventh session): the kernel's AHEAD is
in ``int4_ahead_not_kept.patch`` beside this script; apply it (``git apply``) to run this.

    PYTHONPATH=. python3 benchmarks/issue12_thirty_seventh_session/int4_ahead.py --out DIR
        [--ms 1,8] [--ahead 0,2,4,8,-2,-4,-8] [--maxnreg 0,128]
    PYTHONPATH=. python3 benchmarks/issue12_thirty_seventh_session/int4_ahead.py --out DIR \\
        --timeline best     (batch-1 INT4 g128 through EngineCore with the sweep's fastest
                             config per shape at one token tile; "committed" for the kernel as is)

Why: at one token the kernel keeps about one iteration of words in flight a warp (registers),
and a warp's iterations chain their loads: each costs a loaded DRAM latency (gate_up ~1.2 us,
16 iterations). An L2 prefetch holds no register and keeps AHEAD iterations in flight, so the
loads that follow wait on L2, not DRAM. The twenty-ninth session's shared-memory ring paid block
barriers; the thirty-third's two iterations in registers cost warps (155-163 registers a
thread put gate_up past one wave).

Each call is timed in a CUDA graph over enough weight copies to miss L2 (quant_kernels.py's
method); gate_up runs as the engine runs it, with silu * up fused. Every output is compared bit
for bit with the committed config's (a prefetch changes no arithmetic).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_kernels import fragment_copies, time_calls  # noqa: E402

from kiln.plugins.quant_linear import gluon_kernels  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
GROUP = 128


def _call(x, copy, cfg, silu):
    return gluon_kernels.int4_fragments_linear(x, copy[0], copy[1], GROUP, None, cfg,
                                               silu_mul=silu)


def prefetch_configs(args, n: int, k: int, tiles: int) -> list[tuple]:
    """The committed (W, U) at each AHEAD x maxnreg of the command line; the first is none."""
    w, u = gluon_kernels.fragments_config(n, k, GROUP, tiles)[:2]
    return [(w, u, a, r) for r in map(int, args.maxnreg.split(","))
            for a in map(int, args.ahead.split(","))]


def sweep(args, configs_for=prefetch_configs) -> list[dict]:
    """Each shape at each M and config of ``configs_for``; outputs compared bit for bit with
    the first config's."""
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        silu = name == "gate_up"
        copies = fragment_copies(n, k, GROUP)
        nbytes = copies[0][0].numel() * 4 + copies[0][1].numel() * 4
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            tiles = gluon_kernels.token_tiles(m)
            configs = configs_for(args, n, k, tiles)
            want = None
            for cfg in configs:
                try:
                    y = _call(x, copies[0], cfg, silu)
                    sec = time_calls([lambda c=c, cfg=cfg, x=x, silu=silu: _call(x, c, cfg, silu)
                                      for c in copies])
                except Exception as e:  # a config that does not compile or launch: recorded
                    row = dict(shape=name, m=m, config=list(cfg), error=f"{type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                if want is None:
                    want = y
                row = dict(shape=name, m=m, tiles=tiles, config=list(cfg),
                           committed=cfg == configs[0], us=round(sec * 1e6, 2),
                           tbps=round(nbytes / sec / 1e12, 3), equal=bool(torch.equal(y, want)),
                           finite=bool(torch.isfinite(y).all()))
                rows.append(row)
                print(json.dumps(row), flush=True)
        del copies
        torch.cuda.empty_cache()
    return rows


def best_per_shape(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if "us" not in r or not r["equal"]:
            continue
        e = out.setdefault(f"{r['shape']}@{r['m']}", {})
        if r["committed"]:
            e["committed"] = (r["config"], r["us"])
        if "best" not in e or r["us"] < e["best"][1]:
            e["best"] = (r["config"], r["us"])
    return out


def timeline(table: dict, out: Path) -> None:
    """batch1_timeline.py's INT4 run with ``table``'s configs at one token tile (the twenty-ninth
    session's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "issue12_twenty_ninth_session"))
    import int4_stages
    int4_stages.timeline_with(table, out)


def main(configs_for=prefetch_configs, name: str = "int4_ahead", doc: str = __doc__,
         add_arguments=None) -> None:
    """The sweep (or ``--timeline``) with ``configs_for``'s configs; results in
    ``--out/<name>.json``. ``add_arguments(parser)`` adds the sweep's own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ms", default="1,8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    (add_arguments or _prefetch_arguments)(parser)
    parser.add_argument("--timeline", help="'best' (the sweep's in --out), 'committed', or "
                        "shape=config items joined by x,...")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / f"{name}.json"
    if args.timeline:
        if args.timeline == "best":
            best = json.loads(results.read_text())["best"]
            table = {SHAPES[s]: tuple(best[s + "@1"]["best"][0]) for s in SHAPES
                     if s + "@1" in best}  # the shapes swept
        elif args.timeline == "committed":
            table = {}
        else:
            table = {SHAPES[shape]: tuple(map(int, cfg.split("x"))) for shape, cfg in
                     (item.split("=") for item in args.timeline.split(","))}
        print("timeline with", {s: table.get(SHAPES[s]) for s in SHAPES}, flush=True)
        timeline(table, args.out)
        return
    rows = sweep(args, configs_for)
    best = best_per_shape(rows)
    for key, e in best.items():
        print(key, e, flush=True)
    results.write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), group=GROUP, best=best, results=rows),
        indent=1))


def _prefetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ahead", default="0,2,4,8,-2,-4,-8")
    parser.add_argument("--maxnreg", default="0,128")


if __name__ == "__main__":
    main()
