"""EngineCore (async scheduling) on FP8 + FP8 KV 1000/1000: GPU busy vs idle (issue 12, check 2).

    PYTHONPATH=. python3 benchmarks/issue12_seventh_pass/engine_timeline_1000.py --out DIR
    [--requests 512] [--freeze] [--name NAME]  (a CUDA GPU; writes DIR/NAME.json, by default
    engine_1000_timeline_plain.json, or engine_1000_timeline_freeze.json with --freeze)

Llama-3.1-8B of random weights, calibrated and quantized in memory as benchmarks/gpu_quantized.py
does (variant fp8_kv_fp8), behind an EngineCore with async scheduling: ``--requests`` prompts of
1000 tokens generating 8 greedy tokens each (warm-up), then 1000 in a fresh EngineCore, the run
measured. Each forward (executor.step_logits) is bracketed by CUDA events and timed on the host;
the gaps between one forward's end and the next one's start are the GPU's idle time.
EngineCore._collect's host time (mostly waiting on the GPU) and every garbage collection's time
per generation are recorded too. ``--freeze`` runs gc.collect() then gc.freeze() before the
measured run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import gpu
from benchmarks.issue12_seventh_pass.executor_timeline_1000 import PROMPT_LEN, fp8_executor
from kiln.runtime.core import EngineCore
from kiln.runtime.sampling import SamplingParams


class ForwardTimer:
    """Stands in for executor.step_logits: records (start, end event, rows, prefill, host s)."""

    def __init__(self, step_logits):
        self.step_logits = step_logits
        self.records: list[tuple] = []

    def __call__(self, chunks, pending=None):
        e0 = torch.cuda.Event(enable_timing=True)
        e0.record()
        a = time.perf_counter()
        out = self.step_logits(chunks, pending)
        h = time.perf_counter() - a
        e1 = torch.cuda.Event(enable_timing=True)
        e1.record()
        prefill = sum(len(c.tokens) for c in chunks if len(c.tokens) > 1)
        self.records.append((e0, e1, len(chunks), prefill, h))
        return out


class GcTimer:
    """A gc callback: (generation, seconds) of every collection."""

    def __init__(self):
        self.started = 0.0
        self.times: list[tuple[int, float]] = []

    def __call__(self, phase, info):
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.times.append((info["generation"], time.perf_counter() - self.started))


def timed_collect(collect, waits: list[float]):
    """EngineCore._collect, appending each call's host seconds to ``waits``."""
    def wrapper(inflight):
        a = time.perf_counter()
        result = collect(inflight)
        waits.append(time.perf_counter() - a)
        return result
    return wrapper


def summary(total, steps, reqs, waits, rec, fwd, gaps, gc_times) -> dict:
    mixed = [i for i, r in enumerate(rec) if r[3]]
    summ = dict(total_s=total, tok_s=sum(len(r.output_ids) for r in reqs) / total, steps=steps,
                forwards=len(rec), gpu_span_s=rec[0][0].elapsed_time(rec[-1][1]) / 1e3,
                forward_sum_s=sum(fwd) / 1e3, gap_sum_s=sum(gaps) / 1e3,
                gap_after_mixed_s=sum(gaps[i] for i in mixed if i < len(gaps)) / 1e3,
                mixed_forward_s=sum(fwd[i] for i in mixed) / 1e3,
                host_forward_s=sum(r[4] for r in rec),
                host_forward_mixed_s=sum(rec[i][4] for i in mixed), collect_wait_s=sum(waits))
    summ["gc"] = {g: [sum(1 for x in gc_times if x[0] == g),
                      sum(x[1] for x in gc_times if x[0] == g)] for g in (0, 1, 2)}
    summ["gc_gen2_max_ms"] = 1e3 * max([x[1] for x in gc_times if x[0] == 2] or [0])
    return summ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--freeze", action="store_true",
                        help="gc.collect() then gc.freeze() before the measured run")
    parser.add_argument("--name", help="the output file's name, less .json (default: "
                        "engine_1000_timeline_plain, or _freeze with --freeze)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: torch sees none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    name = args.name or f"engine_1000_timeline_{'freeze' if args.freeze else 'plain'}"
    logging.basicConfig(level=logging.WARNING)
    ex = fp8_executor()
    prompts = gpu.random_prompts(args.requests, PROMPT_LEN, ex.vocab_size, 3)
    forwards = ForwardTimer(ex.step_logits)
    ex.step_logits = forwards
    gc_timer = GcTimer()
    gc.callbacks.append(gc_timer)
    for tokens in (8, 1000):  # the first run is the warm-up
        forwards.records.clear()
        if tokens == 1000 and args.freeze:
            gc.collect()
            gc.freeze()
            print("frozen objects", gc.get_freeze_count())
        gc_timer.times.clear()
        core = EngineCore(ex, async_scheduling=True)
        waits: list[float] = []
        core._collect = timed_collect(core._collect, waits)
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        reqs = [core.add_request(p, params) for p in prompts]
        steps = 0
        while core.has_work():
            core.step()
            steps += 1
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    rec = forwards.records
    fwd = [r[0].elapsed_time(r[1]) for r in rec]
    gaps = [rec[i][1].elapsed_time(rec[i + 1][0]) for i in range(len(rec) - 1)]
    summ = summary(total, steps, reqs, waits, rec, fwd, gaps, gc_timer.times)
    print(json.dumps(summ, indent=1))
    for i in sorted(range(len(gaps)), key=gaps.__getitem__, reverse=True)[:4]:
        print("gap after forward", i, "ms", round(gaps[i], 2), "rows", rec[i][2], "prefill",
              rec[i][3], "next rows", rec[i + 1][2], "next prefill", rec[i + 1][3])
    dec_gaps = [gaps[i] for i in range(len(gaps)) if not rec[i][3] and not rec[i + 1][3]]
    print("decode->decode gaps: n", len(dec_gaps), "median ms", statistics.median(dec_gaps),
          "sum s", sum(dec_gaps) / 1e3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(dict(
        summary=summ, fwd=fwd, gaps=gaps, rows=[r[2] for r in rec], prefill=[r[3] for r in rec],
        host=[r[4] for r in rec])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
