"""Where a FP8 + FP8 KV 1000/1000 run's time goes, step by step (issue 12, pending check 2).

    PYTHONPATH=. python3 benchmarks/issue12_seventh_pass/executor_timeline_1000.py --out DIR
    [--requests 512] [--name executor_1000_timeline]  (a CUDA GPU; writes DIR/NAME.json)

Llama-3.1-8B of random weights, calibrated and quantized in memory as benchmarks/gpu_quantized.py
does (variant fp8_kv_fp8), then ``--requests`` prompts of 1000 tokens each generating 1000 greedy
tokens through kiln's Scheduler and TorchExecutor.step, after gpu.throughput's warm-up (16
tokens each). Per step: CUDA events around ex.step (GPU ms), the host time of ex.step (host ms)
and of the whole step up to the argmax's sync (wall ms); the summary splits them into mixed
(prefill) and decode-only steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from benchmarks import gpu
from benchmarks.gpu_quantized import VARIANTS, calibrate, quantize_in_memory
from kiln.engine import BuildLimits
from kiln.engine.torch_files import pack_weights
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions

PROMPT_LEN = OUTPUT_LEN = 1000
LIMITS = BuildLimits(max_batch_size=1024, max_input_len=2048, max_seq_len=4096,
                     max_num_tokens=8192)


def fp8_executor() -> TorchExecutor:
    """The FP8 + FP8 KV executor: bf16 random weights, calibrated, quantized in memory."""
    config = gpu.llama31_8b()
    tensors, transposed = pack_weights(
        gpu.random_weights(config, torch.device("cuda"), torch.bfloat16), torch.bfloat16)
    ex = TorchExecutor(config, tensors, LIMITS, transposed=transposed, device="cuda",
                       options=TorchExecutorOptions(kv_cache_free_gpu_memory_fraction=0.9))
    amax = calibrate(ex)
    ex.close()
    del ex
    torch.cuda.empty_cache()
    quant = VARIANTS["fp8_kv_fp8"].quant()
    packed, transposed = quantize_in_memory(config, tensors, quant, amax)
    del tensors
    return TorchExecutor(config, packed, LIMITS, transposed=transposed, device="cuda",
                         options=TorchExecutorOptions(kv_cache_free_gpu_memory_fraction=0.9),
                         quant=quant)


def timed_run(ex: TorchExecutor, prompts: list[list[int]]) -> tuple[float, list[dict]]:
    """Greedy generation as gpu.run_requests does, timing every step; (seconds, steps)."""
    sched = Scheduler(LIMITS, ex.reserve, ex.release)
    for i, p in enumerate(prompts):
        sched.add(str(i), p, len(p) + OUTPUT_LEN - 1)
    steps, outs = [], {str(i): 0 for i in range(len(prompts))}
    t0 = time.perf_counter()
    while sched.has_work():
        out = sched.schedule()
        chunks = [row.chunk for row in out.chunks]
        a = time.perf_counter()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        logits = ex.step(chunks)
        e1.record()
        host = time.perf_counter() - a
        sched.commit(out)
        tokens = logits.argmax(-1).tolist()
        wall = time.perf_counter() - a
        steps.append(dict(rows=len(chunks),
                          prefill_tokens=sum(len(c.tokens) for c in chunks if len(c.tokens) > 1),
                          decode_rows=sum(len(c.tokens) == 1 for c in chunks),
                          max_ctx=max(c.start + len(c.tokens) for c in chunks),
                          sum_ctx=sum(c.start + len(c.tokens) for c in chunks),
                          gpu_ms=e0.elapsed_time(e1), host_ms=host * 1e3, wall_ms=wall * 1e3))
        for row, token in zip(out.chunks, tokens, strict=True):
            if not row.samples:
                continue
            outs[row.request_id] += 1
            if outs[row.request_id] >= OUTPUT_LEN:
                sched.finish(row.request_id)
            else:
                sched.append(row.request_id, token)
    return time.perf_counter() - t0, steps


def seconds(steps: list[dict], key: str) -> float:
    return sum(s[key] for s in steps) / 1e3


def summary(total: float, requests: int, steps: list[dict]) -> dict:
    mixed = [s for s in steps if s["prefill_tokens"]]
    dec = [s for s in steps if not s["prefill_tokens"]]
    return dict(total_s=total, tok_s=requests * OUTPUT_LEN / total, steps=len(steps),
                gpu_s=seconds(steps, "gpu_ms"), host_s=seconds(steps, "host_ms"),
                mixed_steps=len(mixed), mixed_gpu_s=seconds(mixed, "gpu_ms"),
                mixed_wall_s=seconds(mixed, "wall_ms"),
                decode_steps=len(dec), decode_gpu_s=seconds(dec, "gpu_ms"),
                decode_wall_s=seconds(dec, "wall_ms"), decode_host_s=seconds(dec, "host_ms"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--name", default="executor_1000_timeline",
                        help="the output file's name, less .json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: torch sees none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    ex = fp8_executor()
    prompts = gpu.random_prompts(args.requests, PROMPT_LEN, ex.vocab_size, 3)
    gpu.run_requests(ex, prompts, 16)  # warm-up as gpu.throughput does
    total, steps = timed_run(ex, prompts)
    summ = summary(total, args.requests, steps)
    print(json.dumps(summ, indent=1))
    for s in steps[::50]:
        print(s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(dict(summary=summ, steps=steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
