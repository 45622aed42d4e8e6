"""Issue 15, step 2: throughput and batch-1 decode of tensor/pipeline-parallel torch engines on
random weights made on the GPUs (a 70B checkpoint does not fit the 2-GPU machine's disk).

    PYTHONPATH=. python3 benchmarks/multi_gpu.py --out DIR --tp 2 [--pp 1] [--shape 70b|8b|tiny]
        [--formats bf16,fp8] [--workloads 128x128,1000x1000] [--requests 1024,512]
        [--max_batch_size 1024] [--modes async,sync] [--device cuda|cpu]

One engine per format (``fp8``: kiln's FP8 W8A8 with an FP8 KV cache, quantized by kiln's own
formula from the random float weights: kiln/engine/random_weights.py), opened on ``tp x pp``
GPUs (one process per rank, NCCL). Per engine: batch-1 decode tok/s (128-token prompt, 128 new
tokens) and, for each workload IN x OUT, that many requests all queued at once (TensorRT-LLM's
table method), output tok/s, through EngineCore in each ``--modes`` loop (async: the driver
broadcasts the sampled ids to every rank). The bf16 batch-1 row also prints the memory roofline:
a rank's weight bytes (every matrix but the embedding) over the copy bandwidth measured on this
machine's GPU 0 in the same run (read + write of 1 GiB), and the fraction reached (issue 15's
goal: >= 70% at tp 4). Anchors (TensorRT-LLM v1.0, H200, Llama-3.3-70B FP8): 128/128 3,605 /
6,428 / 10,407 tok/s at tp 1 / 2 / 4, 1000/1000 2,744 / 5,120 / 8,685; goal >= 90% at tp 2 and
4. ``--device cpu --shape tiny`` checks the script on a CPU (gloo). Writes
DIR/multi_gpu_tp{TP}_pp{PP}_results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks.gpu import llama31_8b, random_prompts
from benchmarks.quant_kernels import copy_bandwidth
from kiln.config import DecoderConfig, Mapping
from kiln.engine import BuildLimits
from kiln.engine.random_weights import random_engine_manifest
from kiln.quantization.config import QuantConfig
from kiln.runtime.core import EngineCore, freeze_loaded_objects
from kiln.runtime.loader import ExecutorOptions
from kiln.runtime.params import SamplingParams
from kiln.runtime.torch_executor import load_executor

log = logging.getLogger("benchmarks.multi_gpu")
ANCHORS = {  # TensorRT-LLM v1.0, H200, Llama-3.3-70B FP8: (workload, tp) -> output tok/s
    ("128x128", 1): 3605, ("128x128", 2): 6428, ("128x128", 4): 10407,
    ("1000x1000", 1): 2744, ("1000x1000", 2): 5120, ("1000x1000", 4): 8685}
SHAPES = {  # Llama-3.x shapes
    "70b": dict(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                intermediate_size=28672, vocab_size=128256),
    "8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
               intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=8,
                 intermediate_size=128, vocab_size=256),
}


def decoder(shape: str) -> DecoderConfig:
    """Llama-3.1-8B's config (gpu.py's) with the shape's sizes."""
    return dataclasses.replace(llama31_8b(), **SHAPES[shape])


def run(executor, prompts: list[list[int]], new_tokens: int, async_scheduling: bool,
        ) -> tuple[float, list]:
    """All ``prompts`` queued at once through EngineCore: (seconds, requests)."""
    core = EngineCore(executor, async_scheduling=async_scheduling)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    requests = [core.add_request(p, params) for p in prompts]
    while core.has_work():
        core.step()
    return time.perf_counter() - started, requests


def decode_weight_bytes(config: DecoderConfig, mapping: Mapping, bytes_per_weight: float,
                        ) -> float:
    """A rank's bytes read per decode step: its share of every matrix but the embedding."""
    h, q, kv, i = (config.hidden_size, config.q_size, config.kv_size,
                   config.intermediate_size)
    per_layer = h * (q + 2 * kv) + q * h + 2 * i * h + i * h
    matrices = config.num_layers * per_layer + config.vocab_size * h  # + lm_head
    return matrices * bytes_per_weight / mapping.world_size


def bench_format(fmt: str, args, mapping: Mapping, copy_tbs: float | None) -> dict:
    config = decoder(args.shape)
    quant = QuantConfig("fp8", kv_cache_dtype="fp8") if fmt == "fp8" else None
    lengths = [[int(v) for v in w.split("x")] for w in args.workloads.split(",")]
    longest_prompt = max(128, *(inp for inp, _ in lengths))
    limits = BuildLimits(max_batch_size=args.max_batch_size, max_input_len=longest_prompt,
                         max_seq_len=max(256, *(inp + out for inp, out in lengths)),
                         max_num_tokens=8192)
    manifest = random_engine_manifest(config, mapping, "bfloat16", limits, quant)
    started = time.perf_counter()
    executor = load_executor(Path(f"random-{args.shape}-{fmt}"), manifest,
                             ExecutorOptions(device=args.device), random_seed=0)
    row: dict = dict(format=fmt, setup_s=time.perf_counter() - started)
    try:
        vocab = config.vocab_size
        for mode in args.modes.split(","):
            sync = mode == "sync"
            run(executor, random_prompts(2, 128, vocab, 9), 8, not sync)  # warm-up
            freeze_loaded_objects()  # as kiln bench does
            seconds, (request,) = run(executor, random_prompts(1, 128, vocab, 1), 128, not sync)
            times = request.token_times
            row[f"decode_{mode}_tok_s"] = (len(times) - 1) / (times[-1] - times[0])
            log.info("%s %s batch-1 decode: %.1f tok/s", fmt, mode, row[f"decode_{mode}_tok_s"])
            for workload, n in zip(args.workloads.split(","), args.requests.split(","),
                                   strict=True):
                inp, out = (int(v) for v in workload.split("x"))
                prompts = random_prompts(int(n), inp, vocab, 3)
                seconds, requests = run(executor, prompts, out, not sync)
                tok_s = sum(len(r.output_ids) for r in requests) / seconds
                row[f"{workload}_{mode}_tok_s"] = tok_s
                log.info("%s %s %s: %d requests, %.0f output tok/s", fmt, mode, workload,
                         int(n), tok_s)
            gc.unfreeze()
    finally:
        executor.close()
    if fmt == "bf16" and copy_tbs:
        weight = decode_weight_bytes(config, mapping, 2.0)
        row["roofline_tok_s"] = copy_tbs * 1e12 / weight
        best = max(v for k, v in row.items() if k.startswith("decode_"))
        row["roofline_fraction"] = best / row["roofline_tok_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--shape", default="70b", choices=sorted(SHAPES))
    parser.add_argument("--formats", default="bf16,fp8")
    parser.add_argument("--workloads", default="128x128,1000x1000")
    parser.add_argument("--requests", default="1024,512", help="requests per workload")
    parser.add_argument("--max_batch_size", type=int, default=1024)
    parser.add_argument("--modes", default="async,sync")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    mapping = Mapping(tp_size=args.tp, pp_size=args.pp)
    if args.device == "cuda" and torch.cuda.device_count() < mapping.world_size:
        raise SystemExit(f"error: tp {args.tp} x pp {args.pp} needs {mapping.world_size} GPUs, "
                         f"this machine has {torch.cuda.device_count()}")
    copy_tbs = copy_bandwidth() if args.device == "cuda" else None  # GPU 0's
    results = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                   tp=args.tp, pp=args.pp, shape=args.shape, copy_tb_s=copy_tbs, rows=[])
    for fmt in args.formats.split(","):
        results["rows"].append(bench_format(fmt, args, mapping, copy_tbs))
    print(f"== kiln tp {args.tp} x pp {args.pp}, {args.shape} shape, random weights, "
          f"{results['device']} ==")
    for row in results["rows"]:
        for key, value in row.items():
            if not key.endswith("_tok_s"):
                continue
            workload = key.split("_")[0]
            anchor = ANCHORS.get((workload, args.tp * args.pp)) if row["format"] == "fp8" \
                and args.shape == "70b" and args.pp == 1 else None
            extra = f"  TensorRT-LLM {anchor:,}: {value / anchor:.0%} (goal 90%)" if anchor \
                else ""
            print(f"{row['format']:5} {key:28} {value:10.1f}{extra}")
        if "roofline_fraction" in row:
            print(f"{row['format']:5} batch-1 decode vs roofline "
                  f"{row['roofline_tok_s']:.1f} tok/s: {row['roofline_fraction']:.0%} (goal 70%)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"multi_gpu_tp{args.tp}_pp{args.pp}_results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
