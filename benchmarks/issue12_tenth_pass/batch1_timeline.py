"""Batch-1 decode through EngineCore: where a token's time goes besides the captured graph.

    PYTHONPATH=. python3 benchmarks/issue12_tenth_pass/batch1_timeline.py --out DIR
        [--formats bf16,fp8] [--tokens 256] [--baseline]   (a CUDA GPU; writes
        DIR/batch1_timeline[_baseline].json and DIR/batch1_trace_<format>[_baseline].json,
        a Chrome trace of a few steps)

Llama-3.1-8B of random weights (benchmarks/gpu.py), bf16 and quantized in memory
(benchmarks/gpu_quantized.py). One request of 128 prompt tokens generating ``--tokens`` greedy
tokens through EngineCore with async scheduling, as ``kiln bench`` runs it. Each decode step's
``DecodeGraphs.run`` is bracketed by CUDA events (before its input copy, after its replay is
launched), so per step the GPU time splits into the graph's segment (input copy, feed, replay)
and what runs between two graphs (the float32 logits, the sampling kernels, the copy of the
sampled ids to the host; since the thirtieth session the graph runs the greedy pass and the
replay's segment holds the copy to the host, so nothing runs between graphs at batch 1). Beside them: tok/s from the request's token times, and the replay
alone back to back (gpu.py's GPU step). A torch.profiler trace of a few steps names the kernels.
``--baseline``: the sampler as it was before the tenth pass (the greedy pass as torch ops, the
copy to the host on the current stream), for a before/after on one machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import gpu
from kiln.engine import BuildLimits
from kiln.engine.torch_files import pack_weights
from kiln.runtime.core import EngineCore
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions
from kiln.runtime.torch_backend.inputs import make_plan


class GraphTimer:
    """Wraps DecodeGraphs.run: a CUDA event before it (its input copy) and after it."""

    def __init__(self, run):
        self.run = run
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(self, plan, feeds=None):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = self.run(plan, feeds)
        b.record()
        self.events.append((a, b))
        return out


def engine_batch1(ex: TorchExecutor, tokens: int) -> dict:
    prompt = gpu.random_prompts(1, 128, ex.vocab_size, 1)[0]
    timer = GraphTimer(ex.graphs.run)
    ex.graphs.run = timer
    try:
        for n in (16, tokens):  # the first is the warm-up
            timer.events.clear()
            core = EngineCore(ex, async_scheduling=True)
            request = core.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0,
                                                              ignore_eos=True))
            while core.has_work():
                core.step()
            torch.cuda.synchronize()
        times = request.token_times
        ev = timer.events[8:-8]  # steady state
        graph = [a.elapsed_time(b) * 1e3 for a, b in ev]
        between = [ev[i][1].elapsed_time(ev[i + 1][0]) * 1e3 for i in range(len(ev) - 1)]
        period = [ev[i][0].elapsed_time(ev[i + 1][0]) * 1e3 for i in range(len(ev) - 1)]
        trace = _trace(ex, prompt)
    finally:
        ex.graphs.run = timer.run
    return dict(tok_s=(len(times) - 1) / (times[-1] - times[0]),
                step_us_median=statistics.median(period),
                graph_segment_us_median=statistics.median(graph),
                between_graphs_us_median=statistics.median(between),
                between_graphs_us_p90=sorted(between)[int(0.9 * len(between))],
                steps=len(ev)), trace


def _trace(ex: TorchExecutor, prompt: list[int]):
    from torch.profiler import ProfilerActivity, profile
    core = EngineCore(ex, async_scheduling=True)
    core.add_request(prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    for _ in range(30):
        core.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            core.step()
        torch.cuda.synchronize()
    while core.has_work():
        core.step()
    return prof


def replay_us(ex: TorchExecutor) -> float:
    assert ex.reserve(0, 200)
    ex._lengths[0] = 150
    plan = make_plan([SequenceChunk(0, [1], 150)], ex.cache.allocator)
    try:
        return 1e3 * gpu._replay_ms(ex, plan)
    finally:
        ex.release(0)


def use_baseline_sampler() -> None:
    """The sampler's greedy pass and host copy as before the tenth pass (module docstring)."""
    from kiln.plugins.greedy import triton_reference
    from kiln.runtime import sampling

    def same_stream_copy(packed):
        host = packed.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    sampling.finite_argmax = triton_reference.finite_argmax
    sampling._copy_to_host = same_stream_copy


def format_weights(label: str, config, tensors: dict, limits: BuildLimits,
                   options: TorchExecutorOptions, calibration: dict):
    """(packed weights, transposed names, QuantConfig or None) of format ``label`` (a
    gpu_quantized VARIANTS key) of the random weights; ``calibration`` keeps the bf16 amax
    across calls, so that it is measured once."""
    from benchmarks.gpu_quantized import VARIANTS, calibrate, quantize_in_memory
    quant = VARIANTS[label].quant()
    if quant is None:
        return (*pack_weights(tensors, torch.bfloat16), None)
    if "amax" not in calibration:
        packed, transposed = pack_weights(tensors, torch.bfloat16)
        ex = TorchExecutor(config, packed, limits, transposed=transposed, device="cuda",
                           options=options)
        calibration["amax"] = calibrate(ex)
        ex.close()
    return (*quantize_in_memory(config, tensors, quant, calibration["amax"]), quant)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--formats", default="bf16,fp8")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--baseline", action="store_true",
                        help="the sampler as before the tenth pass (module docstring)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: torch sees none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    suffix = "_baseline" if args.baseline else ""
    if args.baseline:
        use_baseline_sampler()
    args.out.mkdir(parents=True, exist_ok=True)
    config = gpu.llama31_8b()
    tensors = gpu.random_weights(config, torch.device("cuda"), torch.bfloat16)
    limits = BuildLimits(max_batch_size=8, max_input_len=2048, max_seq_len=4096,
                         max_num_tokens=8192)
    options = TorchExecutorOptions(kv_cache_free_gpu_memory_fraction=0.5)
    results: dict = {}
    calibration: dict = {}
    for label in args.formats.split(","):
        started = time.perf_counter()
        packed, transposed, quant = format_weights(label, config, tensors, limits, options,
                                                   calibration)
        ex = TorchExecutor(config, packed, limits, transposed=transposed, device="cuda",
                           options=options, quant=quant)
        r, prof = engine_batch1(ex, args.tokens)
        r["replay_us"] = replay_us(ex)
        r["setup_s"] = time.perf_counter() - started
        prof.export_chrome_trace(str(args.out / f"batch1_trace_{label}{suffix}.json"))
        results[label] = r
        print(label, json.dumps(r), flush=True)
        ex.close()
        del ex, packed
        torch.cuda.empty_cache()
    (args.out / f"batch1_timeline{suffix}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
