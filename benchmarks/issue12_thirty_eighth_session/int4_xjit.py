"""The INT4 Gluon kernel with its activations loaded in the iteration that uses them (``XJIT``,
the config's fourth item) and its words and scales one or two iterations ahead (``DEPTH``, the
third), against the committed kernel (one ahead for both), Llama-3.1-8B shapes, group 128, bf16.
Measured and not kept (benchmarks/GPU_NOTES.md, thirty-eighth session): the kernel's DEPTH and
XJIT are in ``int4_xjit_not_kept.patch`` beside this script; apply it (``git apply``) to run this,
on the kernel before run 2's CACHE 2 was kept (``git checkout 01071f6 -- kiln/plugins/quant_linear
tests/plugins/test_quant_linear_triton.py`` first; ``run1.sh`` and ``run2.sh`` do the same).

    PYTHONPATH=. python3 benchmarks/issue12_thirty_eighth_session/int4_xjit.py --out DIR [--ms 1,16]
        [--run 1|2]
    PYTHONPATH=. python3 benchmarks/issue12_thirty_eighth_session/int4_xjit.py --out DIR \\
        --timeline best|committed|qkv=4x4x1x1,...

Why: the kernel is latency-bound (ncu, thirty-seventh session: 3.3 warps a scheduler, long
scoreboard 4.3 of 7.4 cycles between a warp's instructions), with one iteration of words in
flight a warp. Two iterations ahead had cost registers past one wave (155-163 a thread,
thirty-third session). Compiled for sm_90a on the CPU, the activations held one iteration ahead
are most of those registers: gate_up's 2 x 2 takes 127 with them and 76 without, so its words
fit two ahead in 128 (one wave: 7 programs of 2 warps an SM hold 146). The activations are 8 KB
a token that every program reads: L1 hits after an SM's first warp.

Method as int4_ahead.py (thirty-seventh session): each call timed in a CUDA graph over weight
copies that miss L2; every output compared bit for bit with the committed config's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "issue12_thirty_seventh_session"))

import int4_ahead  # noqa: E402

from kiln.plugins.quant_linear import gluon_kernels  # noqa: E402

# Configs past the committed (W, U): (DEPTH, XJIT, CACHE) items added. Run 1 (an H100): XJIT
# slower everywhere, the activations no cheap L1 hit. Run 2: the words past L1 (CACHE 1,
# ``ld.global.cg``) or first out of it (2, ``L1::evict_first``), so that the 8 KB of activations
# every program reads stay there. Registers a thread (ptxas, sm_90a, pointers 16-byte aligned as
# the JIT specializes them): gate_up 2 x 2 with XJIT 78, two ahead 104; down and o 8 x 4 76 and
# 108; qkv 4 x 4 71 and 108 (one wave: gate_up 144, down and o 128, qkv 168).
RUN1 = {
    "gate_up": [(2, 2, 1, 1), (2, 2, 2, 1), (2, 1, 2, 1), (4, 2, 2, 1), (2, 2, 2, 0)],
    "down": [(8, 4, 1, 1), (8, 2, 2, 1), (4, 4, 2, 1), (8, 2, 1, 1), (4, 4, 1, 1)],
    "qkv": [(4, 4, 1, 1), (4, 2, 2, 1), (4, 4, 2, 1), (8, 2, 2, 1)],
    "o": [(8, 4, 1, 1), (8, 2, 2, 1), (4, 4, 2, 1)],
}
RUN2 = [(1, 0, 1), (1, 0, 2), (1, 1, 0), (1, 1, 1), (1, 1, 2), (2, 1, 0), (2, 1, 1), (2, 1, 2)]
SHAPE_OF = {v: k for k, v in int4_ahead.SHAPES.items()}


def xjit_configs(args, n: int, k: int, tiles: int) -> list[tuple]:
    """The committed (W, U) first; then at one token tile run 1's or RUN2's items added to it,
    at more the committed (W, U) with the words past L1, and two ahead with XJIT."""
    w, u = gluon_kernels.fragments_config(n, k, 128, tiles)[:2]
    if tiles == 1:
        if args.run == 1:
            return [(w, u)] + RUN1[SHAPE_OF[(n, k)]]
        return [(w, u)] + [(w, u, *extra) for extra in RUN2]
    return [(w, u), (w, u, 1, 0, 1), (w, u, 2, 1, 1)]


def _arguments(parser) -> None:
    parser.add_argument("--run", type=int, default=2, help="1: run 1's configs; 2: run 2's")


if __name__ == "__main__":
    int4_ahead.main(xjit_configs, "int4_xjit", __doc__, _arguments)
