"""The generation loop: requests in, one executor step at a time, token and text deltas out.

Invariant: each request owns its sampling generator, detokenizer and stop matcher, and only the
scheduler decides what runs; so a request's tokens depend on its prompt, its parameters and the
executor's logits for its own sequence, never on the other requests of a step.

:class:`EngineCore` is single-threaded: one caller drives :meth:`EngineCore.step` (the sync API
directly, the asyncio API from its engine thread). A step schedules, runs the executor once,
samples one token for every chunk that ends a sequence's known tokens, applies stop conditions,
and releases finished slots before returning, so the next step can admit waiting requests.
Each request is stamped (``time.perf_counter``) when it arrives (``add_request``), when the
scheduling of a step admits it into an engine slot (its queue time ends there), at each sampled
token and when it finishes (:class:`~kiln.runtime.results.RequestTimings`).

Prompt logprobs (``SamplingParams.prompt_logprobs``): the request's prompt chunks ask the
executor for context logits (engines built with ``--gather_context_logits``; others refuse the
request at once), and each step turns them into the logprobs of the prompt tokens they
predict, so chunked prefill and batching give the same list as one prefill alone. The first
prompt token has none (None). ``max_tokens=0`` (allowed only with prompt_logprobs) feeds the
prompt and finishes with ``length`` without sampling.

Stop strings: a request's token ids and logprobs cover its text and no more, as OpenAI's
logprobs cover the returned text. A token is released (in a delta, then in the result) once some
of its text is, so tokens whose text the stop matcher holds back wait with it; at a matched stop
string, those whose text starts at or past the cut are dropped with their timings (the stop
string's own tokens, unless ``include_stop_str_in_output``), and so are those held back at an
abort. A token that spans the cut stays. Without stop strings a token is released when sampled.

Finish reasons: ``stop`` (EOS, a stop token id or a stop string), ``length`` (max_tokens, or the
engine's max_seq_len), ``abort`` (asked by the caller), ``error`` (the request can never be
served by this executor, or its logits turned non-finite: NaN or Inf, as from corrupt weights or
a 16-bit overflow; its message is in :attr:`Request.error`, and the other requests go on).

Async scheduling (the default where the executor ``prefers_async``: the torch executor on CUDA;
``async_scheduling=True`` also runs it where it is only supported, the torch executor on the
CPU, where it gains nothing: the CPU computes each step as it is launched, so every token but
the last would wait one step longer; ``async_scheduling=False``, and other executors such as
onnx and tensorrt, run the synchronous loop above). The host prepares step n+1 while the device runs
step n, and reads step n's tokens once per step:

1. step n is launched: its forward, then the sampling of its rows on the device
   (:func:`~kiln.runtime.sampling.launch_rows`); the tokens stay in a device tensor. Each
   request that sampled is assumed to go on, and the scheduler gets a placeholder for its token
   (:data:`~kiln.runtime.scheduler.PLACEHOLDER`), unless it certainly ends at n (max_tokens, or
   max_seq_len, which caps max_tokens): that one leaves the scheduler at once, its slot free
   for step n+1 as in the synchronous loop.
2. the next :meth:`EngineCore.step` schedules step n+1 with those placeholders and launches its
   forward; a placeholder chunk takes its token from step n's device tensor
   (:class:`~kiln.runtime.executor.DeviceTokens`), so the host needs no value from step n.
3. only then it reads step n's tokens (one transfer, waiting on an event of step n's sampling,
   not on step n+1), fills the placeholders, detokenizes and applies stop conditions.
4. it launches step n+1's sampling with every request's full token history (penalties) and
   returns step n's deltas.

So a request gets the tokens of the synchronous loop: the same tokens fed at the same positions,
the same sampling rules and generator draws, hence the same logits up to the executor's batch
invariance (the two loops may batch a request with different company, as the synchronous loop
itself does when requests arrive at other times; float GEMMs can differ in the last bit). A
request that stopped at
n (EOS, stop token or string, non-finite logits) or was aborted while a row of it was in flight
wastes that row: its result is dropped, and its slot is released now, while the launched step
n+1 may still write its KV blocks. That is safe because the executor runs steps in launch order
on one stream (its ``supports_async`` contract): a later owner of those blocks writes them only
in a step launched later, after the stray write, and reads only what it wrote itself. Prompt
logprobs steps still read their context logits on the host at their sampling launch.

The core leaves process-wide settings alone (torch's thread count included): CPU sampling runs
in numpy so that it never wakes torch's thread pool (see :mod:`kiln.runtime.sampling`). A
process that owns its loop (``kiln bench`` and ``kiln serve`` after their warm-up, a replica's or
a rank's worker once its engine is ready) calls :func:`freeze_loaded_objects`; the ``LLM`` API
and ``kiln run`` do not (a user's long-running process may call it itself).

Non-goals: multi-process ranks (executors hide them), beam search.
"""

from __future__ import annotations

import bisect
import gc
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kiln.engine import BuildLimits
from kiln.errors import build_with, described, outside_vocabulary
from kiln.runtime.detokenize import IncrementalDetokenizer, StopStringMatcher
from kiln.runtime.errors import RequestError, prompt_too_long
from kiln.runtime.executor import DeviceTokens, Executor, StepLogits
from kiln.runtime.params import SamplingParams, TokenLogprobs
from kiln.runtime.sampling import (
    Generators,
    Picked,
    Row,
    SampledRows,
    context_logprobs,
    launch_rows,
    sample_rows,
)
from kiln.runtime.scheduler import PLACEHOLDER, Policy, Scheduler, SchedulerOutput
from kiln.runtime.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)


def freeze_loaded_objects() -> int:
    """Move every object alive now out of the garbage collector's sight (``gc.freeze``) and
    return how many; for a process that has just loaded the engine it will serve. Python's full
    collections scan every tracked object; after loading torch, the model and their libraries
    that is ~200,000 objects, and under a steady load the loop's own allocations trigger one
    every ~90 steps. Measured on an H200 host (FP8 + FP8 KV cache, 512 x 1000/1000 through
    EngineCore, benchmarks/GPU_NOTES.md): 12 of them took 1.5 s (up to 164 ms each, the GPU
    idle meanwhile); frozen, 0.6 s, and the run went from 15,016 to 15,393 tok/s. Frozen
    objects are still freed when their count of references drops to zero; only those in
    reference cycles that become garbage later stay (the loaded model and libraries live as
    long as the process anyway)."""
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    logger.debug("froze %d objects: the collector's full passes skip them", count)
    return count


def _broken(engine_dir: Path | None) -> str:
    """What a request failed on NaN/Inf logits is told (a trial's damaged engine file had been
    sent to its checkpoint, which was fine, and to a float32 build, which it was)."""
    where = "ENGINE_DIR" if engine_dir is None else shlex.quote(str(engine_dir))
    return (f"the engine's weights or numerics are broken: check its files with kiln verify "
            f"{where} and the checkpoint it was built from; a float16 engine may overflow "
            f"where a bfloat16 or float32 build does not")


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
    # stop strings (module docstring): where each output token's text starts in the text the
    # stop matcher was given, and how many output tokens deltas have released
    token_starts: list[int] = field(default_factory=list)
    released: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    admitted_time: float | None = None  # when the scheduler gave it an engine slot
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


@dataclass
class _InFlight:
    """A launched step whose sampled tokens are still on the device (async scheduling)."""

    rows: list[tuple[int, Request, bool]]  # (logits row, request, placeholder appended)
    sampled: SampledRows | None  # None when no row samples
    placeholders: dict[str, int]  # request id -> its logits row, for each placeholder


class EngineCore:
    """Scheduler + executor + per-request sampling (see the module docstring).

    ``async_scheduling``: overlap the host's work with the device's (module docstring); None
    (the default) where the executor prefers it, True wherever it supports it, False never;
    True where it cannot is said at INFO, and the synchronous loop runs. ``engine_dir``: where
    the executor's engine lies, for the messages that send a user to check it."""

    def __init__(self, executor: Executor, tokenizer: ModelTokenizer | None = None,
                 policy: Policy | None = None, async_scheduling: bool | None = None,
                 engine_dir: Path | None = None):
        self._broken = _broken(engine_dir)
        wanted = executor.prefers_async if async_scheduling is None else async_scheduling
        self.async_scheduling = wanted and executor.supports_async
        if async_scheduling and not executor.supports_async:
            logger.info("%s cannot take tokens still on the device; the engine runs the "
                        "synchronous loop (one host round trip between steps)",
                        type(executor).__name__)
        self._inflight: _InFlight | None = None
        self.executor = executor
        self.tokenizer = tokenizer
        self.limits = executor.limits
        self.scheduler = Scheduler(self.limits, executor.reserve, executor.release,
                                   policy or Policy())
        self.requests: dict[str, Request] = {}
        self._eos = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else frozenset()
        self._next_id = 0

    def new_request_id(self) -> str:
        """The next ``req-N`` no request holds (a caller's own ``req-2`` had made the
        automatic one a refusal: "already in use")."""
        while True:
            self._next_id += 1
            if (request_id := f"req-{self._next_id}") not in self.requests:
                return request_id

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None, prompt: str | None = None) -> Request:
        """Validate and queue a request; raises :class:`RequestError` for this request only."""
        if not isinstance(params, SamplingParams):  # AsyncLLM's engine thread had died of it
            raise RequestError(f"sampling params must be a SamplingParams, found "
                               f"{described(params)}; SamplingParams(**options) makes one")
        if request_id is not None and (not isinstance(request_id, str)
                                       or not request_id.strip()):  # " " reads as none in logs
            raise RequestError(f"a request id must be a non-blank string, found "
                               f"{described(request_id)}; or leave it out for a new one")
        request_id = request_id or self.new_request_id()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use; pick another")
        max_new = check_request(request_id, prompt_ids, params, self.limits,
                                self.executor.vocab_size, self.tokenizer is not None,
                                self.executor.gathers_context_logits)
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

    def check_prompt(self, label: str, prompt_ids: Sequence[int], path: str = "prompt") -> None:
        """Raise RequestError if the engine cannot take it (:func:`check_prompt`)."""
        check_prompt(label, prompt_ids, self.limits, self.executor.vocab_size, path)

    @property
    def vocab_size(self) -> int:
        return self.executor.vocab_size

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def wake(self) -> None:
        """Nothing to do: a step here never waits (ReplicaCore's does, and ends its wait)."""

    def check_alive(self) -> None:
        """Nothing to check: this engine runs in this process (ReplicaCore's may die)."""

    def progress(self) -> list[tuple[str, float | None]]:
        """None: no engine process of its own to watch; its steps are the engine thread's,
        which AsyncLLM watches (ReplicaCore's replicas are watched by their messages)."""
        return []

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
        if self.async_scheduling:
            return self._step_async()
        output = self._schedule()
        if output.empty:
            return []
        logits = self.executor.step_logits([row.chunk for row in output.chunks])
        self.scheduler.commit(output)
        failed = self._prompt_logprobs(output, logits)
        deltas, sampled = self._to_sample(output, {d.request_id for d in failed})
        picks = sample_rows(logits.last, self._rows(sampled), logits.greedy)
        now = time.perf_counter()
        for (_, request), picked in zip(sampled, picks, strict=True):
            deltas.append(self._take(request, picked, now, appended=False))
        return failed + deltas

    def _schedule(self) -> SchedulerOutput:
        """The scheduler's next step; the requests it admits are stamped admitted now."""
        output = self.scheduler.schedule()
        if output.admitted:
            now = time.perf_counter()
            for request_id in output.admitted:
                self.requests[request_id].admitted_time = now
        return output

    # -- async scheduling (module docstring) ---------------------------------------------
    def _step_async(self) -> list[RequestDelta]:
        """Launch step n+1, then collect step n and launch n+1's sampling; n's deltas.
        With nothing in flight, step n is launched first (the pipeline fills)."""
        deltas: list[RequestDelta] = []
        if self._inflight is None:
            output = self._schedule()
            if output.empty:
                return []
            deltas = self._launch(output, self._forward(output, None))
        previous, self._inflight = self._inflight, None
        output = self._schedule()
        logits = None if output.empty else self._forward(output, previous)
        deltas += self._collect(previous)
        if logits is not None:
            deltas += self._launch(output, logits)
        return deltas

    def _forward(self, output: SchedulerOutput, previous: _InFlight | None) -> StepLogits:
        """Launch the step's forward; placeholder tokens come from ``previous``'s ids."""
        chunks = [row.chunk for row in output.chunks]
        feeds = {j: previous.placeholders[row.request_id]
                 for j, row in enumerate(output.chunks) if row.chunk.tokens[-1] == PLACEHOLDER}
        pending = DeviceTokens(previous.sampled.ids, feeds) if feeds else None
        logits = self.executor.step_logits(chunks, pending)
        self.scheduler.commit(output)
        return logits

    def _launch(self, output: SchedulerOutput, logits: StepLogits) -> list[RequestDelta]:
        """Score prompt chunks, launch the sampling of the step's rows and leave it in
        flight; a placeholder for each request that goes on, the scheduler released for each
        that certainly ends here. Deltas of the requests that ended without sampling."""
        failed = self._prompt_logprobs(output, logits)
        deltas, sampled = self._to_sample(output, {d.request_id for d in failed})
        rows = []
        for i, request in sampled:
            goes_on = len(request.output_ids) + 1 < request.max_new_tokens
            if goes_on:
                self.scheduler.append(request.request_id, PLACEHOLDER)
            else:  # its last KV write is in this launched step: the slot may be reused now
                self.scheduler.finish(request.request_id)
            rows.append((i, request, goes_on))
        launched = launch_rows(logits.last, self._rows(sampled), logits.greedy) \
            if sampled else None
        self._inflight = _InFlight(rows, launched,
                                   {r.request_id: i for i, r, appended in rows if appended})
        return failed + deltas

    def _collect(self, inflight: _InFlight) -> list[RequestDelta]:
        """Read a launched step's tokens (the step's one host read) and apply them."""
        if inflight.sampled is None:
            return []
        picks = inflight.sampled.collect()
        now, deltas = time.perf_counter(), []
        for (_, request, placeholder), picked in zip(inflight.rows, picks, strict=True):
            if request.finished:  # aborted while its row was in flight: dropped
                continue
            if placeholder and picked is not None:
                self.scheduler.fill(request.request_id, picked[0])
            deltas.append(self._take(request, picked, now, appended=placeholder))
        return deltas

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
                                         f"are not finite (NaN or Inf); {self._broken}"))
                continue
            request.prompt_logprobs.extend(scored)
        return failed

    def _to_sample(self, output: SchedulerOutput, failed: set[str],
                   ) -> tuple[list[RequestDelta], list[tuple[int, Request]]]:
        """The step's rows that sample, (logits row, request), and the deltas of requests that
        finish without sampling (max_tokens 0: scored only). Rows of finished requests (async:
        stopped or aborted while this step was in flight) and of ``failed`` ones are skipped."""
        deltas, sampled = [], []
        for i, row in enumerate(output.chunks):
            request = self.requests[row.request_id]
            if not row.samples or request.finished or row.request_id in failed:
                continue
            if request.max_new_tokens == 0:
                self.scheduler.finish(request.request_id)  # scored, nothing to generate
                deltas.append(self._finish(request, "length", None))
            else:
                sampled.append((i, request))
        return deltas, sampled

    @staticmethod
    def _rows(sampled: list[tuple[int, Request]]) -> list[Row]:
        return [Row(i, r.params, r.prompt_ids, r.output_ids, r.generators.on)
                for i, r in sampled]

    def _take(self, request: Request, picked: Picked | None, now: float,
              appended: bool) -> RequestDelta:
        """Apply one sampled token (None: non-finite logits, the request fails);
        ``appended``: the scheduler already holds it (async placeholder, filled)."""
        if picked is None:  # never sample garbage from NaN/Inf logits
            return self._fail(request, f"the model's logits for output token "
                              f"{len(request.output_ids) + 1} are not finite (NaN or Inf); "
                              f"{self._broken}")
        token, logprobs = picked
        request.output_ids.append(token)
        request.token_times.append(now)
        if logprobs is not None:
            request.logprobs.append(logprobs)
        return self._advance(request, token, appended)

    def _advance(self, request: Request, token: int, appended: bool = False) -> RequestDelta:
        text = ""
        # A token that ends the request (an EOS, a stop_token_ids entry) leaves its text out
        # unless include_stop_str_in_output, as vLLM's: an EOS kept by skip_special_tokens
        # false had ended the text ("...<|im_end|>"), a stop token of plain text was shown
        stop_token = token in request.eos_ids or token in request.params.stop_token_ids
        if request.detokenizer is not None:
            request.token_starts.append(len(request.stops.text) + request.detokenizer.held)
            if not stop_token or request.params.include_stop_str_in_output:
                text = request.stops.push(request.detokenizer.push(token))
        reason, stop_reason = None, None
        if request.stops is not None and request.stops.matched is not None:
            reason, stop_reason = "stop", request.stops.matched
        elif token in request.eos_ids:  # vLLM's stop_reason: None at EOS, even one listed
            reason = "stop"                # in stop_token_ids (EOS is checked first)
        elif token in request.params.stop_token_ids:
            reason, stop_reason = "stop", token
        elif len(request.output_ids) >= request.max_new_tokens:
            reason = "length"
        request.text += text
        if reason is None:
            if not appended:
                self.scheduler.append(request.request_id, token)
            ids, logprobs = _release(request, _covering(request) if request.params.stop
                                     else len(request.output_ids))
            return RequestDelta(request.request_id, ids, text, logprobs)
        self.scheduler.finish(request.request_id)
        final = self._finish(request, reason, stop_reason)
        return RequestDelta(request.request_id, final.token_ids, text + final.text,
                            final.logprobs, reason)

    def _finish(self, request: Request, reason: str, stop_reason: str | int | None,
                ) -> RequestDelta:
        """Mark finished; the delta carries the text and tokens still held back. At a stop
        string, tokens past the cut are dropped (module docstring); at an abort, every token
        not released yet (its text is dropped too)."""
        tail = ""
        if request.detokenizer is not None and reason != "abort":
            if request.stops.matched is None:
                tail = request.stops.push(request.detokenizer.flush())
            tail += request.stops.flush()
        request.text += tail
        if reason == "abort":
            keep = request.released
        elif request.stops is not None and request.stops.matched is not None:
            keep = _covering(request)
        else:
            keep = len(request.output_ids)
        ids, logprobs = _release(request, keep)
        del request.output_ids[keep:], request.token_times[keep:]
        if request.logprobs is not None:
            del request.logprobs[keep:]
        request.finish_reason, request.stop_reason = reason, stop_reason
        request.finish_time = time.perf_counter()
        return RequestDelta(request.request_id, ids, tail, logprobs, reason)

    def _fail(self, request: Request, message: str) -> RequestDelta:
        request.error = f"request {request.request_id}: {message}"
        logger.info("%s", request.error)  # the caller gets it: finish "error", request.error
        self.scheduler.finish(request.request_id)
        return self._finish(request, "error", None)

    def pop(self, request_id: str) -> Request:
        """Forget a finished request (callers collect results first)."""
        return self.requests.pop(request_id)


def check_prompt(label: str, prompt_ids: Sequence[int], limits: BuildLimits,
                 vocab_size: int, path: str = "prompt") -> None:
    """Raise RequestError (message starting with ``label``) if the engine cannot take it.
    ``path``: the ids' name in an out-of-vocabulary refusal (``path[k]``); where it is the
    label (``prompts[1]``), the refusal starts with ``prompts[1][k]`` alone."""
    if not prompt_ids:
        raise RequestError(f"{label}: the prompt is empty; give at least one token")
    if len(prompt_ids) > limits.max_input_len:
        raise RequestError(f"{label}: "
                           f"{prompt_too_long(str(len(prompt_ids)), limits.max_input_len)}")
    outside = outside_vocabulary(prompt_ids, vocab_size, path)
    if outside is not None:
        where = "" if path == label else f"{label}: "
        raise RequestError(f"{where}{outside}", field=outside.path)


def check_encoded(ids: list[int], vocab_size: int) -> list[int]:
    """``ids``, which the engine's own tokenizer gave, if the model has every one: one past its
    vocabulary means tokenizer files of another model (a retest's SmolLM2 tokenizer beside a
    256-token model had been told to pass ids of the model's tokenizer, for a text prompt)."""
    outside = outside_vocabulary(ids, vocab_size)
    if outside is not None:
        raise RequestError(f"the engine's tokenizer encodes it to token id {outside.token}, past "
                           f"the model's vocabulary of {vocab_size} (decoder.vocab_size): the "
                           f"engine dir's tokenizer files are not its model's; build it again "
                           f"from a checkpoint converted from the model's own Hugging Face dir")
    return ids


def check_request(request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                  limits: BuildLimits, vocab_size: int, has_tokenizer: bool,
                  gathers_context_logits: bool) -> int:
    """Raise RequestError if an engine of these properties cannot serve the request; else the
    tokens it may generate (max_tokens, cut to what max_seq_len allows)."""
    check_prompt(f"request {request_id}", prompt_ids, limits, vocab_size)
    # never sampled: a stop that cannot fire is a mistake (a wrong id or engine)
    outside = outside_vocabulary(params.stop_token_ids, vocab_size, "stop_token_ids")
    if outside is not None:
        raise RequestError(f"request {request_id}: {outside}", field=outside.path)
    if params.stop and not has_tokenizer:
        raise RequestError(f"request {request_id}: stop strings need a tokenizer")
    if params.prompt_logprobs is not None and not gathers_context_logits:
        raise RequestError(f"request {request_id}: prompt_logprobs need every prompt "
                           f"position's logits, and this engine returns the last one only; "
                           f"rebuild it with {build_with('gather_context_logits')}")
    return min(params.max_tokens, output_room(limits, len(prompt_ids)))


def output_room(limits: BuildLimits, prompt_len: int) -> int:
    """New tokens at most after a prompt of ``prompt_len`` tokens: the KV cache holds the
    prompt and every output token but the last."""
    return limits.max_seq_len - prompt_len + 1


def _covering(request: Request) -> int:
    """How many output tokens the request's released text covers: those whose text starts
    before its end (a token still mid-character has no text yet: it waits for the next)."""
    return bisect.bisect_left(request.token_starts, len(request.text))


def _release(request: Request, upto: int,
             ) -> tuple[tuple[int, ...], tuple[TokenLogprobs, ...]]:
    """The output tokens (and logprobs) from the last released one up to ``upto``; marks them
    released."""
    start, request.released = request.released, upto
    logprobs = () if request.logprobs is None else tuple(request.logprobs[start:upto])
    return tuple(request.output_ids[start:upto]), logprobs
