"""Issue 15: what float32 partial sums cost a tensor-parallel rank's row-parallel projections.

    PYTHONPATH=. python3 benchmarks/tp_partials.py --out DIR  (a CUDA GPU; writes
    DIR/tp_partials_results.json)

At tp > 1 a 16-bit engine's ``o`` and ``down`` give float32 partial sums (the sum is rounded
once after the all-reduce, as tp 1 rounds it: kiln/runtime/torch_backend/model.py, Linear).
This times, on one GPU, one rank's share of those projections for Llama-3.x-70B at tp 2 and 4
(``o``: [T, 8192/tp] x [8192/tp, 8192]; ``down``: [T, 28672/tp] x [28672/tp, 8192]), bfloat16
output against float32 output, at decode and prefill token counts: the one-row GEMV
(``out_dtype``) at T = 1, cuBLAS (``torch.mm(..., out_dtype=torch.float32)`` against
``F.linear``) above. It also prints the bytes each all-reduce of the partials moves in both
dtypes. The all-reduce itself needs two GPUs (the 2- and 4-GPU kinds): not timed here.
Method as benchmarks/quant_kernels.py: CUDA graphs cycling over weight copies (>= 3x the L2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.quant_kernels import copies_for, time_calls
from kiln.plugins.gemv import triton_kernels
from kiln.plugins.gemv.triton_reference import wide_linear

HIDDEN, INTERMEDIATE = 8192, 28672  # Llama-3.x-70B
TOKENS = (1, 16, 256, 1024, 2048)


def case(name: str, n: int, k: int, tokens: int) -> dict:
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
               for _ in range(copies_for(n * k * 2))]
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    if tokens == 1:
        bf16 = [lambda w=w: triton_kernels.gemv(x, w) for w in weights]
        fp32 = [lambda w=w: triton_kernels.gemv(x, w, out_dtype=torch.float32)
                for w in weights]
    else:
        bf16 = [lambda w=w: F.linear(x, w) for w in weights]
        fp32 = [lambda w=w: wide_linear(x, w, None, torch.float32) for w in weights]
    t16, t32 = time_calls(bf16), time_calls(fp32)
    return dict(projection=name, n=n, k=k, tokens=tokens, bf16_us=t16 * 1e6,
                float32_us=t32 * 1e6, ratio=t32 / t16,
                all_reduce_bytes_bf16=tokens * n * 2, all_reduce_bytes_float32=tokens * n * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tp", default="2,4")
    args = parser.parse_args()
    rows = []
    for tp in (int(t) for t in args.tp.split(",")):
        for name, k in (("o", HIDDEN // tp), ("down", INTERMEDIATE // tp)):
            for tokens in TOKENS:
                row = dict(tp=tp, **case(name, HIDDEN, k, tokens))
                rows.append(row)
                print(f"tp {tp} {name:4} T={tokens:5}: bf16 {row['bf16_us']:9.1f} us, "
                      f"float32 out {row['float32_us']:9.1f} us ({row['ratio']:.2f}x); "
                      f"all-reduce {row['all_reduce_bytes_bf16'] / 2**20:.2f} -> "
                      f"{row['all_reduce_bytes_float32'] / 2**20:.2f} MiB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tp_partials_results.json"
    path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1)
                    + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
