"""Not kept, runs with ``int4_rope_not_kept.patch`` applied: the rotary into the paged cache
fused into the INT4 Gluon kernel (``EPILOGUE`` 2: a program takes a 16-row tile of a head's
first half and its partner D / 2 rows on, sharing their activations) against the kernel then
``rope_qkv_to_cache``, Llama-3.1-8B's qkv (6,144 x 4,096: 32 query heads, 8 key/value heads of
128), group 128, bf16 activations and cache:

    PYTHONPATH=. python3 benchmarks/issue12_thirtieth_session/int4_rope.py --out DIR
        [--ms 1,8] [--configs 4x4,8x1,4x2] [--timeline 4x4,8x2]

Each variant is timed in a CUDA graph over enough weight copies to miss L2 (quant_kernels.py's
method), PDL on where the engine turns it on; the fused q is checked bit for bit against the
unfused one (the contract of tests/plugins/test_gemv_epilogue_triton.py). ``--timeline``: for
each (warps x chunks), batch-1 INT4 decode through EngineCore
(issue12_tenth_pass/batch1_timeline.py) with the qkv projection's config set to it, written to
DIR/timeline_<config>/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_kernels import fragment_copies, time_calls  # noqa: E402

from kiln.plugins.gemv.epilogue import RopeToCache  # noqa: E402
from kiln.plugins.quant_linear import gluon_kernels  # noqa: E402
from kiln.plugins.rotary.triton_kernels import rope_qkv_to_cache  # noqa: E402

HQ, HKV, D, K, GROUP = 32, 8, 128, 4096, 128
N = (HQ + 2 * HKV) * D


def kernels(ms: list[int], configs: list[tuple[int, int]]) -> list[dict]:
    copies = fragment_copies(N, K, GROUP)
    lin = gluon_kernels.int4_fragments_linear
    cache = tuple(torch.zeros(80, HKV, 64, D, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    table = torch.randn(4096, D, device="cuda")
    rows = []
    for m in ms:
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        index = torch.randint(0, 4096, (m,), device="cuda", dtype=torch.int32)
        slots = torch.randperm(80 * 64, device="cuda")[:m].to(torch.int32)
        rope = RopeToCache(rope_qkv_to_cache, table, index, *cache, slots, HQ, HKV, D)
        committed = gluon_kernels.fragments_config(N, K, GROUP, gluon_kernels.token_tiles(m))
        unfused = rope.apply(lin(x, copies[0][0], copies[0][1], GROUP, None))
        row = dict(m=m, committed=list(committed))
        row["unfused_us"] = 1e6 * time_calls(
            [lambda c=c, x=x, rope=rope: rope.apply(lin(x, c[0], c[1], GROUP, None))
             for c in copies])
        row["qkv_alone_us"] = 1e6 * time_calls(
            [lambda c=c, x=x: lin(x, c[0], c[1], GROUP, None) for c in copies])
        for cfg in [None, *configs]:
            label = "fused" if cfg is None else f"fused_{cfg[0]}x{cfg[1]}"
            y = lin(x, copies[0][0], copies[0][1], GROUP, None, cfg, rope)
            row[f"{label}_equal"] = bool(torch.equal(y, unfused))
            row[f"{label}_us"] = 1e6 * time_calls(
                [lambda c=c, cfg=cfg, x=x, rope=rope: lin(x, c[0], c[1], GROUP, None, cfg, rope)
                 for c in copies])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def timeline(config: tuple[int, int], out: Path) -> None:
    """batch1_timeline.py's INT4 run with the qkv projection at ``config``."""
    from issue12_tenth_pass import batch1_timeline
    choose = gluon_kernels.fragments_config

    def fragments_config(n, k, group_size, tiles=1):
        return config if (n, k) == (N, K) else choose(n, k, group_size, tiles)

    gluon_kernels.fragments_config = fragments_config
    try:
        sys.argv = ["batch1_timeline.py", "--formats", "int4_wo", "--out", str(out)]
        batch1_timeline.main()
    finally:
        gluon_kernels.fragments_config = choose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ms", default="1,8")
    parser.add_argument("--configs", default="4x4,8x1,4x2",
                        help="warps x chunks of the fused kernel, beside the committed choice")
    parser.add_argument("--timeline", default="",
                        help="warps x chunks of qkv for batch-1 EngineCore runs")
    args = parser.parse_args()

    def parse(text):
        return [tuple(map(int, c.split("x"))) for c in text.split(",") if c]

    args.out.mkdir(parents=True, exist_ok=True)
    rows = kernels([int(m) for m in args.ms.split(",") if m], parse(args.configs))
    (args.out / "int4_rope.json").write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), shape=[N, K], group=GROUP, results=rows),
        indent=1))
    for cfg in parse(args.timeline):
        timeline(cfg, args.out / f"timeline_{cfg[0]}x{cfg[1]}")


if __name__ == "__main__":
    main()
