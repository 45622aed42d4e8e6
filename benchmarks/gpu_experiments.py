"""GPU experiments behind two design choices of the torch backend, kept apart from the
benchmark (benchmarks/gpu.py) whose model and timing helpers they share:

- ``gemm``: the model's projections through cuBLAS, ``[out, in]`` (F.linear) vs pre-transposed
  ``[in, out]`` (x @ W), at several token counts (decided the packing layout).
- ``gemv``: a plain Triton GEMV against cuBLAS at one row (the experiment behind the gemv
  plugin).

    PYTHONPATH=. python3 benchmarks/gpu_experiments.py --out "$OUT" [--sections gemm,gemv]

Results go to ``<out>/gpu_experiments.json``. Findings: benchmarks/GPU_NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu import bench_ms, llama31_8b
from kiln.config import DecoderConfig

log = logging.getLogger("benchmarks.gpu_experiments")
EXPERIMENTS = ("gemm", "gemv")


_turn = [0]


def _rotating(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """fn(x, next weight): successive calls cycle through copies so none stays in L2."""
    _turn[0] += 1
    return fn(x, weights[_turn[0] % len(weights)])


def gemm_layouts(results: dict, config: DecoderConfig) -> None:
    shapes = {"qkv": (config.hidden_size, config.q_size + 2 * config.kv_size),
              "o": (config.q_size, config.hidden_size),
              "gate_up": (config.hidden_size, 2 * config.intermediate_size),
              "down": (config.intermediate_size, config.hidden_size),
              "lm_head": (config.hidden_size, config.vocab_size)}
    rows = []
    for name, (k, n) in shapes.items():
        copies = max(1, math.ceil(200e6 / (k * n * 2)))  # rotate past the 50 MB L2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        for m in (1, 16, 128, 512, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_lin = bench_ms(partial(_rotating, F.linear, x, ws))
            t_tr = bench_ms(partial(_rotating, torch.matmul, x, wts))
            byt = k * n * 2
            rows.append({"proj": name, "m": m, "linear_us": t_lin * 1e3,
                         "transposed_us": t_tr * 1e3, "linear_tb_s": byt / t_lin / 1e9,
                         "linear_tflops": 2 * m * k * n / t_lin / 1e9})
        ws = wts = None
    results["gemm_layouts"] = rows
    for r in rows:
        log.info("gemm %-8s m=%-5d F.linear %8.1f us (%.2f TB/s, %.0f TFLOP/s)  x@Wt %8.1f us",
                 r["proj"], r["m"], r["linear_us"], r["linear_tb_s"], r["linear_tflops"],
                 r["transposed_us"])


def _gemv_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, y_ptr, n, k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * k + cols[None, :],
                        mask=(rows < n)[:, None] & (cols < k)[None, :], other=0.0)
            x = tl.load(x_ptr + cols, mask=cols < k, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=rows < n)
    return triton, gemv


def _gemv_run(gemv, grid, x, ws, y, n, k, bn, bk, warps, stages) -> None:
    _turn[0] += 1
    gemv[(grid,)](x, ws[_turn[0] % len(ws)], y, n, k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                  num_stages=stages)


def gemv_experiment(results: dict, config: DecoderConfig) -> None:
    """A plain Triton GEMV (batch 1) against cuBLAS, to decide whether decode needs its own."""
    triton, gemv = _gemv_kernel()
    rows = []
    for name, k, n in (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672),
                       ("down", 14336, 4096)):
        copies = max(1, math.ceil(200e6 / (k * n * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(n, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x, ws[0])[0].float()
        best = None
        for bn, bk, warps, stages in ((8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 8, 3),
                                      (32, 256, 8, 3), (4, 1024, 4, 3)):
            run = partial(_gemv_run, gemv, triton.cdiv(n, bn), x, ws, y, n, k, bn, bk, warps,
                          stages)
            _turn[0] = -1
            run()
            err = float((y.float() - want).norm() / want.norm())
            us = 1e3 * bench_ms(run)
            if best is None or us < best[0]:
                best = (us, bn, bk, warps, stages, err)
        cublas = 1e3 * bench_ms(partial(_rotating, F.linear, x, ws))
        rows.append({"proj": name, "triton_us": best[0], "config": best[1:5], "rel_err": best[5],
                     "cublas_us": cublas, "triton_tb_s": k * n * 2 / best[0] / 1e6,
                     "cublas_tb_s": k * n * 2 / cublas / 1e6})
        log.info("gemv %-8s triton %.1f us (%.2f TB/s, %s, err %.1e) cuBLAS %.1f us (%.2f TB/s)",
                 name, best[0], rows[-1]["triton_tb_s"], best[1:5], best[5], cublas,
                 rows[-1]["cublas_tb_s"])
        ws = None
    results["gemv_experiment"] = rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_bench_out"))
    parser.add_argument("--sections", default=",".join(EXPERIMENTS),
                        help=f"comma-separated, from {EXPERIMENTS}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stdout)
    sections = args.sections.split(",")
    unknown = set(sections) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {EXPERIMENTS}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    run = {"gemm": gemm_layouts, "gemv": gemv_experiment}
    for name in sections:
        run[name](results, llama31_8b())
        torch.cuda.empty_cache()
        (args.out / "gpu_experiments.json").write_text(json.dumps(results, indent=1,
                                                                   default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
