"""silu(gate) * up fused into the INT4 Gluon kernel (``SILU_MUL``: a program takes gate tile i
and up tile i + N / 32, sharing their activations) against the kernel then the gated-MLP op,
Llama-3.1-8B's gate_up (28,672 x 4,096), group 128, bf16 activations:

    PYTHONPATH=. python3 benchmarks/issue12_twenty_ninth_session/int4_silu_mul.py --out DIR
        [--ms 1,8,16,32,64] [--configs 2x2,2x1,4x1]

Each variant is timed in a CUDA graph over enough weight copies to miss L2 (quant_kernels.py's
method), PDL on where the engine turns it on; the fused result is checked bit for bit against
the unfused one (the contract of tests/plugins/test_gemv_epilogue_triton.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_kernels import fragment_copies, time_calls  # noqa: E402

from kiln.plugins.gated_mlp.triton_kernels import silu_and_mul  # noqa: E402
from kiln.plugins.quant_linear import gluon_kernels  # noqa: E402

N, K, GROUP = 28672, 4096, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ms", default="1,8,16,32,64")
    parser.add_argument("--configs", default="2x2,2x1,4x1,4x2",
                        help="warps x chunks of the fused kernel, beside the committed choice")
    args = parser.parse_args()
    copies = fragment_copies(N, K, GROUP)
    lin = gluon_kernels.int4_fragments_linear
    rows = []
    for m in map(int, args.ms.split(",")):
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        committed = gluon_kernels.fragments_config(N, K, GROUP, gluon_kernels.token_tiles(m))
        unfused = silu_and_mul(lin(x, copies[0][0], copies[0][1], GROUP, None))
        row = dict(m=m, committed=list(committed))
        row["unfused_us"] = 1e6 * time_calls(
            [lambda c=c, x=x: silu_and_mul(lin(x, c[0], c[1], GROUP, None)) for c in copies])
        row["gate_up_alone_us"] = 1e6 * time_calls(
            [lambda c=c, x=x: lin(x, c[0], c[1], GROUP, None) for c in copies])
        configs = [None] + [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
        for cfg in configs:
            label = "fused" if cfg is None else f"fused_{cfg[0]}x{cfg[1]}"
            y = lin(x, copies[0][0], copies[0][1], GROUP, None, cfg, silu_mul=True)
            row[f"{label}_us"] = 1e6 * time_calls(
                [lambda c=c, cfg=cfg, x=x: lin(x, c[0], c[1], GROUP, None, cfg, silu_mul=True)
                 for c in copies])
            if cfg is None or cfg == committed:
                row[f"{label}_equal"] = bool(torch.equal(y, unfused))
            row[f"{label}_max_diff"] = (y.float() - unfused.float()).abs().max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4_silu_mul.json").write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), shape=[N, K], group=GROUP, results=rows),
        indent=1))


if __name__ == "__main__":
    main()
