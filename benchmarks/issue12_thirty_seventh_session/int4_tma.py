"""The INT4 Gluon kernel with its words brought by TMA into a ring of ``STAGES`` slots in shared
memory (the config's third item; 0: the committed register prefetch), Llama-3.1-8B shapes,
group 128, bf16 activations, swept over warps x chunks x stages. Measured and not kept
(benchmarks/GPU_NOTES.md, thirty-seventh session): the ring is in
``int4_tma_ring_not_kept.patch`` beside this script; apply it (``git apply``) to run this.

    PYTHONPATH=. python3 benchmarks/issue12_thirty_seventh_session/int4_tma.py --out DIR
        [--ms 1,8] [--warps 1,2,4,8] [--chunks 1,2,4] [--stages 2,4,6] [--max_smem_kb 96]
    PYTHONPATH=. python3 benchmarks/issue12_thirty_seventh_session/int4_tma.py --out DIR \\
        --timeline best|committed|qkv=4x4x4,...   (batch-1 INT4 g128 through EngineCore)

Why: ncu on an H100 (this session, ``int4_ncu.py``) has the committed kernel at one token
latency-bound: 3.3 warps a scheduler, long-scoreboard stalls 4.3 of its 7.4 cycles between
instructions, 70% of DRAM's bandwidth on gate_up. Its bytes in flight are what its registers
hold (one iteration ahead: ~27 KB an SM); words held two iterations ahead in registers cost
warps (thirty-third session), and an L2 prefetch ahead was slower (``int4_ahead.py``). A TMA
ring holds STAGES iterations of words in shared memory without registers (76 registers a
thread at gate_up's 2 x 2, against 128), one thread a program issuing each copy.

Timing and checks as ``int4_ahead.py`` (whose sweep this runs): every output bit for bit the
committed config's (the ring changes no arithmetic).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import int4_ahead  # noqa: E402

from kiln.plugins.quant_linear import gluon_kernels  # noqa: E402


def ring_configs(args, n: int, k: int, tiles: int) -> list[tuple]:
    """The committed config first, then every (W, U, S) of the command line whose W U divides
    the row's chunks in whole groups and whose ring fits ``--max_smem_kb`` a program."""
    committed = gluon_kernels.fragments_config(n, k, int4_ahead.GROUP, tiles)
    tiles_read = 2 if (n, k) == int4_ahead.SHAPES["gate_up"] else 1  # silu * up: gate and up
    configs = [committed]
    for s in map(int, args.stages.split(",")):
        for w in map(int, args.warps.split(",")):
            for u in map(int, args.chunks.split(",")):
                if (k // 64) % (w * u) or (w * u * 64) % int4_ahead.GROUP:
                    continue
                if s * w * u * 512 * tiles_read > args.max_smem_kb * 1024:
                    continue
                if (w, u, s) not in configs:
                    configs.append((w, u, s))
    return configs


def _arguments(parser) -> None:
    parser.add_argument("--warps", default="1,2,4,8")
    parser.add_argument("--chunks", default="1,2,4")
    parser.add_argument("--stages", default="2,4,6")
    parser.add_argument("--max_smem_kb", type=int, default=96)


if __name__ == "__main__":
    int4_ahead.main(ring_configs, "int4_tma", __doc__, _arguments)
