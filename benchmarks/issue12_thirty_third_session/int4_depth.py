"""The INT4 Gluon kernel with its words and scales two iterations ahead in registers (``DEPTH``
2, the config's third item) against one (``DEPTH`` 1, the kernel before), Llama-3.1-8B shapes,
group 128, bf16 activations, one token tile. Measured and not kept (benchmarks/GPU_NOTES.md,
thirty-third session): the kernel's DEPTH is in ``int4_depth_not_kept.patch`` beside this
script, with its tests; apply it (``git apply``) to run this.

    PYTHONPATH=. python3 benchmarks/issue12_thirty_third_session/int4_depth.py --out DIR
        [--ms 1,8] [--warps 2,4,8] [--chunks 1,2,4] [--stages 1,2]
    PYTHONPATH=. python3 benchmarks/issue12_thirty_third_session/int4_depth.py --out DIR \\
        --timeline best      (batch-1 INT4 g128 through EngineCore with the sweep's fastest
                              (warps, chunks, depth) per shape at one token tile)

Why: under PDL at one token a program's iterations form a chain of dependent loads, and the
kernel is one wave; a second iteration of words in flight halves the chain's exposed latency
where registers allow it (~30 more a thread, no shared memory, no barriers: the twenty-ninth
session's ring paid two block barriers an iteration). The sweep and the timeline are the
twenty-ninth session's (``int4_stages.py``), whose third config item is now the depth.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "issue12_twenty_ninth_session"))

import int4_stages  # noqa: E402

if __name__ == "__main__":
    if "--stages" not in sys.argv:
        sys.argv += ["--stages", "1,2"]
    int4_stages.main()
