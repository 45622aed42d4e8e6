"""Batch-1 decode through EngineCore under several values of one environment variable.

    PYTHONPATH=. python3 benchmarks/issue12_fifteenth_pass/env_sweep.py --out DIR --env NAME
        --values "A;B;A" [--formats fp8,int8_wo] [--trace_values "A;B"] [--name RESULTS]
        (a CUDA GPU; writes DIR/RESULTS.json, and DIR/batch1_trace_<format>_<i>.json for the
        runs whose value is in --trace_values, i: the value's index in --values)

Llama-3.1-8B of random weights, as ``issue12_tenth_pass/batch1_timeline.py`` (whose request,
timing and trace it runs). A kernel reads the variable when it is launched, so each value gets
an executor of its own (its CUDA graphs captured under it), on the same weights, in the order
given: repeat a value to see the spread between loads. Used for the fifteenth pass's
experiments (GPU_NOTES.md), each variable read by a patch of this directory applied to the tree
(``git apply``): ``KILN_L2_PREFETCH_MB`` (l2_prefetch_not_kept.patch, on b6b5434), and
``KILN_GEMV_EARLY``, ``KILN_GEMV_GATE_UP`` (experiment_hooks.patch, on 29e1152).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import gpu
from benchmarks.issue12_tenth_pass.batch1_timeline import engine_batch1, format_weights, replay_us
from kiln.engine import BuildLimits
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--formats", default="fp8,int8_wo,bf16")
    parser.add_argument("--env", required=True)
    parser.add_argument("--values", required=True,
                        help="';'-separated values of --env, one executor each, in this order")
    parser.add_argument("--trace_values", default="")
    parser.add_argument("--name", default="env_sweep")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: torch sees none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    values = args.values.split(";")
    traced = set(args.trace_values.split(";")) if args.trace_values else set()
    config = gpu.llama31_8b()
    tensors = gpu.random_weights(config, torch.device("cuda"), torch.bfloat16)
    limits = BuildLimits(max_batch_size=8, max_input_len=2048, max_seq_len=4096,
                         max_num_tokens=8192)
    options = TorchExecutorOptions(kv_cache_free_gpu_memory_fraction=0.5)
    results: dict = {"env": args.env, "values": values, "runs": []}
    calibration: dict = {}
    for label in args.formats.split(","):
        packed, transposed, quant = format_weights(label, config, tensors, limits, options,
                                                   calibration)
        for i, value in enumerate(values):
            started = time.perf_counter()
            os.environ[args.env] = value
            ex = TorchExecutor(config, packed, limits, transposed=transposed, device="cuda",
                               options=options, quant=quant)
            r, prof = engine_batch1(ex, args.tokens)
            r.update(format=label, value=value, replay_us=replay_us(ex),
                     setup_s=time.perf_counter() - started)
            if value in traced:
                prof.export_chrome_trace(str(args.out / f"batch1_trace_{label}_{i}.json"))
            results["runs"].append(r)
            print(label, repr(value), f"{r['tok_s']:.1f} tok/s", f"replay {r['replay_us']:.1f} us",
                  flush=True)
            ex.close()
            del ex
            torch.cuda.empty_cache()
            (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
        del packed
    return 0


if __name__ == "__main__":
    sys.exit(main())
