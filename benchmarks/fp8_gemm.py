"""cuBLASLt's FP8 GEMMs (``torch._scaled_mm``) with and without fast accumulation, 8B shapes.

    PYTHONPATH=. python3 benchmarks/fp8_gemm.py --out DIR  (a GPU of compute capability >= 8.9;
    writes DIR/fp8_gemm_results.json)

For each Llama-3.1-8B projection and token count: the time per call (median of CUDA-graph
replays, benchmarks.quant_kernels.time_calls), TFLOP/s, and the relative L2 error of the bf16
output against the exact float32 product of the same FP8 operands (tensorwise scales of 1), for
``use_fast_accum`` False (partial sums promoted to float32 every few K steps) and True (what the
FP8 projections use: kiln.plugins.quant_linear.triton_kernels._scaled_mm). A bf16 output's own
rounding is ~2^-9 relative per value.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from benchmarks.quant_kernels import SHAPES, copy_bandwidth, time_calls, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--ms", default="512,1024,2048,8192", help="token counts (comma-separated)")
    args = parser.parse_args()
    try:
        ms = [int(m) for m in args.ms.split(",")]
    except ValueError:
        parser.error(f"--ms takes comma-separated integers, found {args.ms!r}")
    if min(ms) < 1:
        parser.error("--ms: token counts are positive")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        parser.error("needs a CUDA GPU of compute capability >= 8.9 (FP8 tensor cores)")
    torch.manual_seed(0)
    copy = copy_bandwidth()
    one = torch.tensor(1.0, device="cuda")
    results = []
    for m in ms:
        for name, (n, k) in SHAPES.items():
            a = (torch.randn(m, k, device="cuda") * 0.5).to(torch.float8_e4m3fn)
            w = (torch.randn(n, k, device="cuda") * 0.5).to(torch.float8_e4m3fn)
            exact = a.float() @ w.float().t()
            row = dict(shape=name, m=m, n=n, k=k)
            for fast in (False, True):
                call = partial(torch._scaled_mm, a, w.t(), one, one, out_dtype=torch.bfloat16,
                               use_fast_accum=fast)
                sec = time_calls([call])
                err = (call().float() - exact).norm() / exact.norm()
                key = "fast" if fast else "promoted"
                row.update({f"{key}_us": sec * 1e6, f"{key}_tflops": 2 * m * n * k / sec / 1e12,
                            f"{key}_rel_l2": err.item()})
            results.append(row)
            print(f"{name:8} M {m:5}: promoted {row['promoted_us']:7.1f} us "
                  f"({row['promoted_tflops']:6.0f} TFLOP/s, rel L2 {row['promoted_rel_l2']:.4f}); "
                  f"fast {row['fast_us']:7.1f} us ({row['fast_tflops']:6.0f}, "
                  f"{row['fast_rel_l2']:.4f}): {row['promoted_us'] / row['fast_us']:.3f}x",
                  flush=True)
            del a, w, exact
    write_results(args.out / "fp8_gemm_results.json", results, copy)


if __name__ == "__main__":
    main()
