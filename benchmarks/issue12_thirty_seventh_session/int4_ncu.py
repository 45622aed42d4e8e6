"""A few plain launches of the INT4 Gluon kernel on Llama-3.1-8B's gate_up (silu * up fused, as
the engine runs it) and down at one token, group 128, committed configs: for ncu (hardware
counters: the H100s' runtime has them, the H200s' has not).

    ncu --clock-control none -k regex:_int4_fragments_kernel --launch-skip 2 --launch-count 2 \\
        --section WarpStateStats --section SchedulerStats --section Occupancy \\
        --section LaunchStats --section MemoryWorkloadAnalysis --section SourceCounters \\
        python3 benchmarks/issue12_thirty_seventh_session/int4_ncu.py [--shapes gate_up,down]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_kernels import fragment_copies  # noqa: E402

from kiln.plugins.quant_linear import gluon_kernels  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="gate_up,down")
    args = parser.parse_args()
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        words, ws = fragment_copies(n, k, 128)[0]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(4):
            gluon_kernels.int4_fragments_linear(x, words, ws, 128, None,
                                                silu_mul=name == "gate_up")
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
