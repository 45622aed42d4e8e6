"""INT4 tensor-core kernel at one token (and 16): more weight rows per warp, with split-K.

    PYTHONPATH=. python3 benchmarks/issue12_fourteenth_pass/int4_mma_rows.py --out DIR \
        [--round first|second]

Compiled for sm90 (the loop's SASS), the INT4 tensor-core kernel spends 5.0 instructions per
weight byte with 16 rows per warp (BLOCK_N 32 on 2 warps, today's one-token tile) and 4.3 with
32 rows per warp (BLOCK_N 64 on 2 warps, 128 on 4): each group's activations are shuffled
into the dots' operand layout once per warp, so more rows per warp share that work. The
conversion (LOP3, SHF, HFMA2: 2.75 per byte) is the same. Timed like
benchmarks/quant_kernels.py (a CUDA graph over weight copies >= 3x the L2, g128, random
bytes), beside the default path of each shape. Writes DIR/int4_mma_rows_ROUND.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import quant_kernels as qk

# (BLOCK_N, BLOCK_M, groups per iteration, num_warps, num_stages), then the splits to try
ROUNDS = {
    "first": {1: [((32, 8, 2, 2, 4), (1, 2, 4)),  # today's M <= 8 tile: 16 rows per warp
                  ((64, 8, 2, 2, 4), (1, 2, 4, 8)),
                  ((64, 8, 2, 2, 3), (1, 2, 4)),
                  ((64, 8, 1, 2, 6), (1, 2, 4)),
                  ((128, 8, 2, 4, 3), (1, 2, 4, 8)),
                  ((128, 8, 1, 4, 4), (1, 2, 4))],
              16: [((32, 16, 2, 2, 4), (1, 2)),  # today's M = 9..16 tile
                   ((16, 16, 2, 1, 4), (1,)),
                   ((64, 16, 2, 2, 3), (1, 2, 4)),
                   ((128, 16, 2, 4, 3), (1, 2, 4))]},
    # after the first: 64 rows per warp, fewer stages; M = 8 on the one-token tiles
    "second": {1: [((128, 8, 2, 4, 3), (1, 4, 8)),
                   ((128, 8, 2, 2, 3), (1, 4, 8)),
                   ((256, 8, 2, 4, 3), (1, 4)),
                   ((256, 8, 1, 4, 4), (1, 4)),
                   ((128, 8, 2, 4, 2), (1, 4, 8))],
               8: [((32, 8, 2, 2, 4), (1, 2, 4)),
                   ((128, 8, 2, 4, 3), (1, 2, 4, 8))],
               16: [((64, 16, 2, 2, 3), (1, 4)),
                    ((64, 16, 2, 2, 4), (1, 4)),
                    ((64, 16, 1, 2, 6), (1, 4)),
                    ((128, 16, 2, 2, 3), (1, 4))]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--round", choices=sorted(ROUNDS), default="first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: torch sees none")
    torch.manual_seed(0)
    results: list[dict] = []
    for name, (n, k) in qk.SHAPES.items():
        weights = qk.make_weights("int4", n, k, 128, 1)
        weights += qk.make_weights("int4", n, k, 128, qk.copies_for(qk.nbytes(weights[0])) - 1)
        for m, tiles in ROUNDS[args.round].items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for path in ("gemv", "mma") if m == 1 else ("mma",):  # the library's defaults
                sec = qk.time_calls(qk.calls("int4", path, x, weights, 128))
                qk.record(results, "int4", f"default_{path}", name, n, k, m, 128, weights, sec)
            for tile, splits in tiles:
                for split in splits:
                    config = tile + (split,)
                    try:
                        sec = qk.time_calls(qk.calls("int4", "mma", x, weights, 128, config))
                    except Exception as e:  # noqa: BLE001 - a tile may not fit; say which
                        print(f"{name} M={m} {config}: {str(e).splitlines()[0][:150]}")
                        continue
                    qk.record(results, "int4", "mma", name, n, k, m, 128, weights, sec,
                           config=list(config))
        del weights
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"int4_mma_rows_{args.round}.json"
    path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=results),
                               indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
