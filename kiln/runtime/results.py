"""What the API returns: per-request results, stream deltas and timings (plain frozen data)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.runtime.core import Request, RequestDelta
from kiln.runtime.params import TokenLogprobs


@dataclass(frozen=True)
class RequestTimings:
    """Wall-clock marks of one request (``time.perf_counter`` seconds) and what follows."""

    arrival: float
    token_times: tuple[float, ...]  # when each output token was sampled
    finished: float | None
    admitted: float | None = None  # when it got an engine slot; None: never (aborted waiting)

    @property
    def queue_s(self) -> float | None:
        """Queue time (s): arrival to admission into an engine slot."""
        return None if self.admitted is None else self.admitted - self.arrival

    @property
    def ttft_s(self) -> float | None:
        """Time to first token (s)."""
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (s): (last - first) / (n - 1)."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def itl_s(self) -> tuple[float, ...]:
        """Inter-token latencies (s) between consecutive output tokens."""
        t = self.token_times
        return tuple(b - a for a, b in zip(t, t[1:], strict=False))

    @property
    def latency_s(self) -> float | None:
        """Arrival to finish (s)."""
        return None if self.finished is None else self.finished - self.arrival


@dataclass(frozen=True)
class CompletionResult:
    """One request's outcome. ``finish_reason``: stop, length, abort or error."""

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    text: str
    token_ids: tuple[int, ...]  # with logprobs and timings: the tokens of ``text``, those past
                                # a stop string's cut dropped (kiln.runtime.core)
    finish_reason: str | None
    stop_reason: str | int | None  # the stop string or stop token id that ended it
                                   # (None at EOS, as vLLM's)
    logprobs: tuple[TokenLogprobs, ...] | None
    timings: RequestTimings
    error: str | None = None
    # SamplingParams.prompt_logprobs: one per prompt token, None for the first (as vLLM); None
    # when not asked
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None

    @classmethod
    def from_request(cls, request: Request) -> CompletionResult:
        return cls(request.request_id, request.prompt, tuple(request.prompt_ids), request.text,
                   tuple(request.output_ids), request.finish_reason, request.stop_reason,
                   None if request.logprobs is None else tuple(request.logprobs),
                   RequestTimings(request.arrival_time, tuple(request.token_times),
                                  request.finish_time, request.admitted_time), request.error,
                   None if request.prompt_logprobs is None else tuple(request.prompt_logprobs))


@dataclass(frozen=True)
class StreamDelta:
    """A streamed piece of one request: new text/tokens; ``result`` is set on its last delta."""

    index: int  # position of the prompt in the call (0 for single-request streams)
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: str | None = None
    result: CompletionResult | None = None
    # arrival to admission into an engine slot (s), on every delta once the request was
    # admitted (so a server can observe it at its first delta); None if it never was
    queue_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def of(cls, index: int, delta: RequestDelta, request: Request) -> StreamDelta:
        result = CompletionResult.from_request(request) if delta.finished else None
        queue_s = None if request.admitted_time is None \
            else request.admitted_time - request.arrival_time
        return cls(index, delta.request_id, delta.text, delta.token_ids, delta.logprobs,
                   delta.finish_reason, result, queue_s)
