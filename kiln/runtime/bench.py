"""A synthetic serving workload in the manner of trtllm-bench, and its latency/throughput report.

Contract: :func:`run_benchmark` sends ``num_requests`` requests of random token ids
(``input_len`` tokens each, seeded) that each generate exactly ``output_len`` tokens (greedy,
EOS ignored). Requests are all queued at the start (``request_rate`` None) or arrive as a
Poisson process of ``request_rate`` per second; at most ``concurrency`` are in the engine at
once (the rest wait outside, and their clock starts when they are sent). One thread drives the
engine, so arrival times are exact to within one step.

Metrics per request: TTFT (send -> first token), TPOT ((last - first) / (n - 1)), every
inter-token latency, end-to-end latency; summarized as mean, p50, p90, p99. Throughput:
output tokens/s and requests/s over the whole run (first send to last token).

Every request's prompt is made up front, and its token times are kept until the report:
:meth:`Workload.host_bytes` is what they hold, for a check before a workload that cannot fit.

A request that ends in error (non-finite logits: see kiln.runtime.core) fails the whole run
with a RequestError counting the failures and quoting the first: there are no figures to report.

Non-goals: real datasets, HTTP serving overheads.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.core import EngineCore
from kiln.runtime.errors import RequestError
from kiln.runtime.params import SamplingParams, check_seed, seeded_random
from kiln.runtime.results import RequestTimings
from kiln.runtime.stats import Stats
from kiln.sizes import need_and_available

# Host bytes a request of the workload holds until the report, from tracemalloc on the onnx
# executor (per request past the first 1,024 of 4,096: 1,268 bytes, 22.6 a prompt token, 48.3 a
# generated token), rounded up: the request's objects; each prompt token (a list slot: the ids
# are the vocabulary's int objects); each generated token (its id, its time).
REQUEST_BYTES, INPUT_TOKEN_BYTES, OUTPUT_TOKEN_BYTES = 1536, 32, 64


@dataclass(frozen=True)
class Workload:
    input_len: int = 128
    output_len: int = 128
    num_requests: int = 16
    request_rate: float | None = None  # requests/s (Poisson); None: all queued at t=0
    concurrency: int | None = None  # requests in flight at most; None: no limit
    # of the prompts and arrivals: SamplingParams.seed's range, read modulo 2**64 as the
    # generators read it (kiln.runtime.params.seeded_random: -1 is 2**64 - 1)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("input_len", "output_len", "num_requests"):
            if getattr(self, name) < 1:
                raise RequestError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise RequestError(f"request_rate must be > 0, found {self.request_rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise RequestError(f"concurrency must be >= 1, found {self.concurrency}")
        check_seed(self.seed, RequestError)

    def host_bytes(self) -> int:
        """Host memory the workload's requests hold until the report (estimate)."""
        return self.num_requests * (REQUEST_BYTES + INPUT_TOKEN_BYTES * self.input_len
                                    + OUTPUT_TOKEN_BYTES * self.output_len)

    def host_memory_problem(self, available: int | None) -> str | None:
        """Why the workload cannot fit in ``available`` bytes of host memory (None: it can, or
        nothing is known); checked before any request is made, since Linux's OOM killer ends
        the process before an allocation fails."""
        need = self.host_bytes()
        if available is None or need <= available:
            return None
        need_text, have = need_and_available(need, available)
        return f"would hold ~{need_text} of host memory, and {have} is available"


@dataclass(frozen=True)
class BenchReport:
    workload: Workload
    duration_s: float
    output_tokens: int
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    latency_ms: Stats
    output_tokens_per_s: float
    requests_per_s: float
    engine: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None  # kiln bench --baseline hf: HF's run beside kiln's

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, allow_nan=False)  # JSON has none

    def table(self) -> str:
        w = self.workload
        rate = "all queued" if w.request_rate is None else f"{w.request_rate:g} req/s"
        lines = [f"requests {w.num_requests} ({w.input_len} in / {w.output_len} out), {rate}, "
                 f"concurrency {w.concurrency or 'unlimited'}; {self.duration_s:.2f} s",
                 f"{'metric':<24}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
        for name, stats in (("TTFT (ms)", self.ttft_ms), ("TPOT (ms)", self.tpot_ms),
                            ("inter-token (ms)", self.itl_ms), ("latency (ms)", self.latency_ms)):
            lines.append(f"{name:<24}{stats.cells()}")
        lines.append(f"{'output tokens/s':<24}{self.output_tokens_per_s:>10.1f}")
        lines.append(f"{'requests/s':<24}{self.requests_per_s:>10.3f}")
        return "\n".join(lines)


def make_prompts(workload: Workload, vocab_size: int, avoid: frozenset[int] = frozenset(),
                 ) -> list[list[int]]:
    rng = seeded_random(workload.seed)
    ids = [t for t in range(vocab_size) if t not in avoid]
    return [[rng.choice(ids) for _ in range(workload.input_len)]
            for _ in range(workload.num_requests)]


def arrival_offsets(workload: Workload) -> list[float]:
    if workload.request_rate is None:
        return [0.0] * workload.num_requests
    rng = seeded_random(workload.seed, 1)
    t, out = 0.0, []
    for _ in range(workload.num_requests):
        out.append(t)
        t += rng.expovariate(workload.request_rate)
    return out


def run_benchmark(core: EngineCore, workload: Workload,
                  avoid_tokens: frozenset[int] = frozenset(), progress: bool = False,
                  label: str = "bench") -> BenchReport:
    """Drive ``core`` (an EngineCore, or data-parallel replicas' ReplicaCore: the same request
    API) through the workload (see the module docstring); ``progress``: a bar of finished
    requests on stderr, named ``label``."""
    from kiln.progress import progress_bar

    params = SamplingParams(temperature=0, max_tokens=workload.output_len, ignore_eos=True)
    prompts = deque(zip(make_prompts(workload, core.vocab_size, avoid_tokens),
                        arrival_offsets(workload), strict=True))
    limit = workload.concurrency or workload.num_requests
    start = time.perf_counter()
    timings: list[RequestTimings] = []
    errors: list[str] = []
    live: set[str] = set()
    bar = progress_bar(total=workload.num_requests, unit="req", desc=label, show=progress,
                       dynamic_ncols=True)
    with bar:
        while prompts or live:
            now = time.perf_counter() - start
            while prompts and prompts[0][1] <= now and len(live) < limit:
                prompt, _ = prompts.popleft()
                live.add(core.add_request(prompt, params).request_id)
            if not live:  # a second at most, so that any wait fits the platform's sleep
                time.sleep(min(1.0, max(0.0, prompts[0][1] - now)))
                continue
            for delta in core.step():
                if not delta.finished:
                    continue
                live.discard(delta.request_id)
                request = core.pop(delta.request_id)
                bar.update(1)
                if request.finish_reason == "error":
                    errors.append(str(request.error))
                    continue
                timings.append(RequestTimings(request.arrival_time, tuple(request.token_times),
                                              request.finish_time))
    if errors:  # a benchmark of a broken engine has no figures: say why instead
        raise RequestError(f"{len(errors)} of {workload.num_requests} benchmark requests failed; "
                           f"the first: {errors[0]}")
    return _report(workload, timings, start)


def _report(workload: Workload, timings: list[RequestTimings], start: float) -> BenchReport:
    end = max(t.token_times[-1] for t in timings)
    duration = end - start
    tokens = sum(len(t.token_times) for t in timings)
    ms = lambda values: Stats.of([v * 1000 for v in values if v is not None])  # noqa: E731
    return BenchReport(
        workload, duration, tokens, ms([t.ttft_s for t in timings]),
        ms([t.tpot_s for t in timings]), ms([x for t in timings for x in t.itl_s]),
        ms([t.latency_s for t in timings]), tokens / duration, len(timings) / duration)
