"""The generation loop: requests in, one executor step at a time, token and text deltas out.

Invariant: each request owns its sampling generator, detokenizer and stop matcher, and only the
scheduler decides what runs; so a request's tokens depend on its prompt, its parameters and the
executor's logits for its own sequence, never on the other requests of a step.

:class:`EngineCore` is single-threaded: one caller drives :meth:`EngineCore.step` (the sync API
directly, the asyncio API from its engine thread). A step schedules, runs the executor once,
samples one token for every chunk that ends a sequence's known tokens, applies stop conditions,
and releases finished slots before returning, so the next step can admit waiting requests.

Prompt logprobs (``SamplingParams.prompt_logprobs``): the request's prompt chunks ask the
executor for context logits (engines built with ``--gather_context_logits``; others refuse the
request at once), and each step turns them into the logprobs of the prompt tokens they
predict, so chunked prefill and batching give the same list as one prefill alone. The first
prompt token has none (None). ``max_tokens=0`` (allowed only with prompt_logprobs) feeds the
prompt and finishes with ``length`` without sampling.

Finish reasons: ``stop`` (EOS, a stop token id or a stop string), ``length`` (max_tokens, or the
engine's max_seq_len), ``abort`` (asked by the caller), ``error`` (the request can never be
served by this executor, or its logits turned non-finite: NaN or Inf, as from corrupt weights or
a 16-bit overflow; its message is in :attr:`Request.error`, and the other requests go on).

The core leaves process-wide settings alone (torch's thread count included): CPU sampling runs
in numpy so that it never wakes torch's thread pool (see :mod:`kiln.runtime.sampling`).

Non-goals: multi-process ranks (executors hide them), beam search.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kiln.runtime.detokenize import IncrementalDetokenizer, StopStringMatcher
from kiln.runtime.errors import RequestError
from kiln.runtime.executor import Executor, StepLogits
from kiln.runtime.params import SamplingParams, TokenLogprobs
from kiln.runtime.sampling import Generators, Row, context_logprobs, sample_rows
from kiln.runtime.scheduler import Policy, Scheduler, SchedulerOutput
from kiln.runtime.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """A request's live state. ``text`` holds the text released so far (stop-safe)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_tokens, cut to what max_seq_len allows
    generators: Generators  # its random source, one generator per device the logits are on
    eos_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer | None
    stops: StopStringMatcher | None
    prompt: str | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    # prompt_logprobs: one entry per prompt token known so far (None for the first)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestDelta:
    """What one step added to one request: new tokens, newly released text, maybe its end."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCore:
    """Scheduler + executor + per-request sampling (see the module docstring)."""

    def __init__(self, executor: Executor, tokenizer: ModelTokenizer | None = None,
                 policy: Policy | None = None):
        self.executor = executor
        self.tokenizer = tokenizer
        self.limits = executor.limits
        self.scheduler = Scheduler(self.limits, executor.reserve, executor.release,
                                   policy or Policy())
        self.requests: dict[str, Request] = {}
        self._eos = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else frozenset()
        self._next_id = 0

    def new_request_id(self) -> str:
        self._next_id += 1
        return f"req-{self._next_id}"

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None, prompt: str | None = None) -> Request:
        """Validate and queue a request; raises :class:`RequestError` for this request only."""
        request_id = request_id or self.new_request_id()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use; pick another")
        self.check_prompt(f"request {request_id}", prompt_ids)
        vocab = self.executor.vocab_size
        bad = [t for t in params.stop_token_ids if not t < vocab]
        if bad:  # never sampled: a stop that cannot fire is a mistake (a wrong id or engine)
            raise RequestError(f"request {request_id}: stop_token_ids {bad[:5]} are outside the "
                               f"vocabulary [0, {vocab}); pass ids of this engine's tokenizer")
        if params.stop and self.tokenizer is None:
            raise RequestError(f"request {request_id}: stop strings need a tokenizer")
        if params.prompt_logprobs is not None and not self.executor.gathers_context_logits:
            raise RequestError(f"request {request_id}: prompt_logprobs need every prompt "
                               f"position's logits, and this engine returns the last one only; "
                               f"rebuild it with kiln build --gather_context_logits")
        max_new = min(params.max_tokens, self.limits.max_seq_len - len(prompt_ids) + 1)
        skip = params.skip_special_tokens
        request = Request(
            request_id, list(prompt_ids), params, max_new, Generators(params.seed),
            frozenset() if params.ignore_eos else self._eos,
            None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                                                       skip),
            None if self.tokenizer is None else StopStringMatcher(
                params.stop, params.include_stop_str_in_output),
            prompt, logprobs=None if params.logprobs is None else [],
            prompt_logprobs=None if params.prompt_logprobs is None else [None])
        # The last sampled token is never fed back, so the cache holds prompt + max_new - 1
        # (the whole prompt when max_new is 0: it is fed to be scored).
        self.scheduler.add(request_id, prompt_ids, len(prompt_ids) + max(max_new, 1) - 1,
                           context_logits=params.prompt_logprobs is not None)
        self.requests[request_id] = request
        return request

    def check_prompt(self, label: str, prompt_ids: Sequence[int]) -> None:
        """Raise RequestError (message starting with ``label``) if the engine cannot take it."""
        if not prompt_ids:
            raise RequestError(f"{label}: the prompt is empty; give at least one token")
        if len(prompt_ids) > self.limits.max_input_len:
            raise RequestError(f"{label}: prompt of {len(prompt_ids)} tokens exceeds "
                               f"the engine's max_input_len {self.limits.max_input_len}; shorten "
                               f"it or rebuild with a larger --max_input_len")
        vocab = self.executor.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"{label}: token ids {bad[:5]} are outside the "
                               f"vocabulary [0, {vocab})")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> RequestDelta | None:
        """End a request now (its slot is freed); None if it is unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return None
        self.scheduler.finish(request_id)
        return self._finish(request, "abort", None)

    def step(self) -> list[RequestDelta]:
        """One scheduling round and executor step; deltas of every request that progressed."""
        stalled = self.scheduler.stalled()
        if stalled is not None:
            return [self._fail(self.requests[stalled.request_id],
                               f"needs {stalled.capacity} tokens of KV cache, more than the "
                               f"executor can ever hold; lower max_tokens or the prompt")]
        output = self.scheduler.schedule()
        if output.empty:
            return []
        logits = self.executor.step_logits([row.chunk for row in output.chunks])
        self.scheduler.commit(output)
        failed = self._prompt_logprobs(output, logits)
        return failed + self._sample(output, logits.last, {d.request_id for d in failed})

    def _prompt_logprobs(self, output: SchedulerOutput, logits: StepLogits,
                         ) -> list[RequestDelta]:
        """Extend each request's prompt logprobs from its chunk's context logits: row j
        predicts the token at ``start + j + 1`` (the prompt's part only); the deltas of the
        requests whose logits were not finite (they fail)."""
        failed = []
        for i, row in enumerate(output.chunks):
            if i not in logits.context:
                continue
            request, chunk = self.requests[row.request_id], row.chunk
            targets = request.prompt_ids[chunk.start + 1:chunk.start + len(chunk.tokens) + 1]
            scored = context_logprobs(logits.context[i], targets,
                                      request.params.prompt_logprobs)
            if scored is None:
                failed.append(self._fail(request, f"the model's logits for prompt tokens "
                                         f"{chunk.start + 2}..{chunk.start + len(targets) + 1} "
                                         f"are not finite (NaN or Inf); the engine's weights or "
                                         f"numerics are broken (check the checkpoint, or build "
                                         f"in float32)"))
                continue
            request.prompt_logprobs.extend(scored)
        return failed

    def _sample(self, output: SchedulerOutput, logits: torch.Tensor,
                failed: set[str] = frozenset()) -> list[RequestDelta]:
        now = time.perf_counter()
        sampled = [(i, self.requests[row.request_id]) for i, row in enumerate(output.chunks)
                   if row.samples and row.request_id not in failed]
        deltas = []
        for _, request in [s for s in sampled if s[1].max_new_tokens == 0]:
            self.scheduler.finish(request.request_id)  # scored, nothing to generate
            deltas.append(self._finish(request, "length", None))
        sampled = [s for s in sampled if s[1].max_new_tokens > 0]
        picks = sample_rows(logits, [Row(i, r.params, r.prompt_ids, r.output_ids,
                                         r.generators.on) for i, r in sampled])
        for (_, request), picked in zip(sampled, picks, strict=True):
            if picked is None:  # never sample garbage from NaN/Inf logits
                deltas.append(self._fail(request, f"the model's logits for output token "
                                         f"{len(request.output_ids) + 1} are not finite (NaN "
                                         f"or Inf); the engine's weights or numerics are "
                                         f"broken (check the checkpoint, or build in float32)"))
                continue
            token, logprobs = picked
            request.output_ids.append(token)
            request.token_times.append(now)
            if logprobs is not None:
                request.logprobs.append(logprobs)
            deltas.append(self._advance(request, token, logprobs))
        return deltas

    def _advance(self, request: Request, token: int,
                 logprobs: TokenLogprobs | None) -> RequestDelta:
        text = ""
        if request.detokenizer is not None:
            text = request.stops.push(request.detokenizer.push(token))
        reason, stop_reason = None, None
        if request.stops is not None and request.stops.matched is not None:
            reason, stop_reason = "stop", request.stops.matched
        elif token in request.params.stop_token_ids or token in request.eos_ids:
            reason, stop_reason = "stop", token
        elif len(request.output_ids) >= request.max_new_tokens:
            reason = "length"
        request.text += text
        if reason is None:
            self.scheduler.append(request.request_id, token)
            return RequestDelta(request.request_id, (token,), text, _one(logprobs))
        self.scheduler.finish(request.request_id)
        final = self._finish(request, reason, stop_reason)
        return RequestDelta(request.request_id, (token,), text + final.text, _one(logprobs),
                            reason)

    def _finish(self, request: Request, reason: str, stop_reason: str | int | None,
                ) -> RequestDelta:
        """Mark finished; the delta carries the text still held back (no tokens)."""
        tail = ""
        if request.detokenizer is not None and reason != "abort":
            if request.stops.matched is None:
                tail = request.stops.push(request.detokenizer.flush())
            tail += request.stops.flush()
        request.text += tail
        request.finish_reason, request.stop_reason = reason, stop_reason
        request.finish_time = time.perf_counter()
        return RequestDelta(request.request_id, (), tail, (), reason)

    def _fail(self, request: Request, message: str) -> RequestDelta:
        request.error = f"request {request.request_id}: {message}"
        logger.info("%s", request.error)  # the caller gets it: finish "error", request.error
        self.scheduler.finish(request.request_id)
        return self._finish(request, "error", None)

    def pop(self, request_id: str) -> Request:
        """Forget a finished request (callers collect results first)."""
        return self.requests.pop(request_id)


def _one(logprobs: TokenLogprobs | None) -> tuple[TokenLogprobs, ...]:
    return () if logprobs is None else (logprobs,)
