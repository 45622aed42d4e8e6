"""The tensor-core swap-AB GEMM (_w8_gemm_kernel) at M = 1 against the GEMV, fp8 and int8_wo.

    PYTHONPATH=. python3 benchmarks/issue12_seventh_pass/gemv_tensor_core_probe.py --out DIR
    [--name gemv_tensor_core_probe]  (a CUDA GPU; writes DIR/NAME.json)

For each Llama-3.1-8B projection (benchmarks.quant_kernels.SHAPES) and format: the GEMV's time
per call on one bf16 token, then _launch_w8_gemm's over CONFIGS, as benchmarks/quant_kernels.py
times them (CUDA-graph replays cycling over enough weight copies to stream from HBM; effective
TB/s = weight + scale bytes / time). fp8 runs the GEMM on the token quantized with a scale of
0.01. Rows: shape, fmt, path (gemv or tc), config (tc only), us, tbps.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

from benchmarks.quant_kernels import SHAPES, copies_for, make_weights, nbytes, time_calls

CONFIGS = [(64, 16, 256, 4, 4), (64, 16, 128, 4, 6), (64, 16, 512, 4, 3), (128, 16, 128, 4, 4),
           (128, 16, 256, 4, 3), (128, 16, 256, 8, 3), (64, 16, 256, 4, 6), (64, 16, 1024, 4, 2)]


def gemv_calls(q, fmt: str, ws: list[tuple], x: torch.Tensor, s: torch.Tensor) -> list:
    if fmt == "fp8":
        return [partial(q._fp8_gemv, x, w, scale, s, None) for w, scale in ws]
    return [partial(q._int8_wo_gemv, x, w, scale, None) for w, scale in ws]


def tc_calls(q, fmt: str, ws: list[tuple], x: torch.Tensor, qx: torch.Tensor | None,
             s: torch.Tensor, config: tuple) -> list:
    if fmt == "fp8":
        return [partial(q._launch_w8_gemm, qx, w, scale, s, None, torch.bfloat16, 1, config)
                for w, scale in ws]
    return [partial(q._launch_w8_gemm, x, w, scale, None, None, torch.bfloat16, 0, config)
            for w, scale in ws]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--name", default="gemv_tensor_core_probe",
                        help="the output file's name, less .json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: torch sees none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    from kiln.plugins.quant_linear import triton_kernels as q  # needs triton (a GPU machine)
    rows = []
    for name, (n, k) in SHAPES.items():
        for fmt in ("fp8", "int8_wo"):
            ws = make_weights(fmt, n, k, 128, 1)
            ws += make_weights(fmt, n, k, 128, copies_for(nbytes(ws[0])) - 1)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            s = torch.tensor([0.01], device="cuda")
            qx = (x / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn) if fmt == "fp8" else None
            b = nbytes(ws[0])
            sec = time_calls(gemv_calls(q, fmt, ws, x, s))
            rows.append(dict(shape=name, fmt=fmt, path="gemv", us=sec * 1e6, tbps=b / sec / 1e12))
            print(f"{name:8} {fmt:8} gemv            {sec * 1e6:7.1f} us "
                  f"{b / sec / 1e12:5.2f} TB/s", flush=True)
            for c in CONFIGS:
                try:
                    sec = time_calls(tc_calls(q, fmt, ws, x, qx, s, c))
                except Exception as e:
                    print(name, fmt, c, "failed", type(e).__name__, str(e)[:100])
                    continue
                rows.append(dict(shape=name, fmt=fmt, path="tc", config=c, us=sec * 1e6,
                                 tbps=b / sec / 1e12))
                print(f"{name:8} {fmt:8} tc {str(c):22} {sec * 1e6:7.1f} us "
                      f"{b / sec / 1e12:5.2f} TB/s", flush=True)
            del ws
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
