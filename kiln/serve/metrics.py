"""Prometheus metrics of kiln serve, with vLLM's names under a ``kiln:`` prefix.

Each app has its own :class:`prometheus_client.CollectorRegistry` (so several apps in one test
process never collide). Gauges are read when scraped: requests running (holding an engine slot)
and waiting (accepted, not yet admitted), the share of KV-cache slots in use, and the
seconds an engine with requests outstanding has gone without progress (kiln.serve.state's
stalls). Generated
tokens are counted as each delta brings them (:meth:`ServeMetrics.produced`); queue time
(arrival to admission into an engine slot, as the engine stamped it) is observed by the server
at a request's first delta after its admission (kiln.serve.state); the other counters and
histograms are fed by :meth:`ServeMetrics.finished` from each request's result.

Non-goals: multiprocess collection, per-model labels (one engine per server).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kiln.runtime.results import CompletionResult

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0)


class ServeMetrics:
    """The registry and its metrics; ``running``/``waiting``/``kv_usage`` are read at scrape."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int],
                 kv_usage: Callable[[], float], since_progress: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("kiln:num_requests_running", "Requests holding an engine slot.",
              registry=r).set_function(running)
        Gauge("kiln:num_requests_waiting", "Requests accepted and waiting for a slot.",
              registry=r).set_function(waiting)
        Gauge("kiln:kv_cache_usage_perc", "Share of KV-cache slots in use (0-1).",
              registry=r).set_function(kv_usage)
        Gauge("kiln:seconds_since_engine_progress", "Longest time an engine (thread, replica) "
              "with requests outstanding has gone without progress; 0 while idle.",
              registry=r).set_function(since_progress)
        self.prompt_tokens = Counter("kiln:prompt_tokens", "Prompt tokens processed.",
                                     registry=r)
        self.generation_tokens = Counter("kiln:generation_tokens", "Tokens generated.",
                                         registry=r)
        self.success = Counter("kiln:request_success", "Finished requests by finish reason.",
                               ["finished_reason"], registry=r)
        self.ttft = Histogram("kiln:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kiln:inter_token_latency_seconds", "Time between output tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.queue_time = Histogram("kiln:request_queue_time_seconds",
                                    "Arrival to admission into an engine slot.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kiln:e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def produced(self, token_ids: Sequence[int]) -> None:
        """Tokens a request just generated (counted now, not when the request ends)."""
        if token_ids:
            self.generation_tokens.inc(len(token_ids))

    def finished(self, result: CompletionResult) -> None:
        self.prompt_tokens.inc(len(result.prompt_token_ids))
        self.success.labels(finished_reason=str(result.finish_reason)).inc()
        timings = result.timings
        if timings.ttft_s is not None:
            self.ttft.observe(timings.ttft_s)
        for gap in timings.itl_s:
            self.itl.observe(gap)
        if timings.latency_s is not None:
            self.e2e.observe(timings.latency_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
