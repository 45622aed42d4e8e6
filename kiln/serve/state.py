"""The server's hold on one AsyncLLM: submitting, merging streams, aborting, counting.

Invariant: every request the server submits has exactly one *pump* task, owned by the server and
never by an HTTP handler, that reads the request's AsyncLLM stream to its end, records its
metrics and drops it from :attr:`ServerState.live`. Handlers only read what pumps forward; a
handler that stops early (client gone, error) aborts its unfinished requests and the pumps
drain the ``abort`` ends. So a client that disconnects frees its engine slots within one engine
step, and no AsyncLLM stream is left unread.

``running`` = live requests holding an engine slot (``Scheduler.running``, read from the event
loop: a dict membership test, atomic under the GIL); ``waiting`` = the other live ones (queued
in the scheduler or still in AsyncLLM's inbox).

Queue time (arrival in the engine to admission into a slot) is the engine's: the core stamps
admission when its scheduler admits a request, and every delta after that carries the wait
(:attr:`~kiln.runtime.results.StreamDelta.queue_s`); the pump observes it at the request's
first such delta (its first token, or its end). A request aborted before admission is not
observed (vLLM observes only scheduled requests).

A stall: an engine (the engine thread, a replica, the engine process) with requests
outstanding and no progress for longer than ``stall_timeout`` seconds (:meth:`AsyncLLM.progress
<kiln.runtime.async_llm.AsyncLLM.progress>`). :meth:`ServerState.stalls` names them (``/health``
answers 503 while there is one) and logs a WARNING once when one begins and once when it ends;
while requests are live a watch task looks every second (less with a shorter timeout), so the
log does not wait for a probe.

Non-goals: priorities, per-client fairness, more than one engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from kiln.engine import BuildLimits
from kiln.errors import counted, option
from kiln.runtime.async_llm import INLINE_ENCODE_CHARS, AsyncLLM, Progress
from kiln.runtime.core import output_room
from kiln.runtime.errors import RequestError
from kiln.runtime.llm import Prompt
from kiln.runtime.params import SamplingParams
from kiln.runtime.results import StreamDelta
from kiln.serve.metrics import ServeMetrics
from kiln.serve.protocol import ApiError

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Job:
    """One engine request of an HTTP request: its choice index, prompt and params."""

    index: int
    prompt: Prompt
    params: SamplingParams
    label: str = ""  # how an error names a prompt of the list forms ("prompt[1]"); "" for
    # the request's one prompt (a string or token ids)
    max_tokens_field: str | None = None  # the request field that gave params.max_tokens
    # (max_tokens, max_completion_tokens): a prompt that leaves less room is refused
    # (too_long); None where it is the endpoint's default, which the runtime cuts to the room


class ServerState:
    """Submits jobs to the engine and streams their deltas back (see the module docstring)."""

    def __init__(self, engine: AsyncLLM, max_queue: int | None, stall_timeout: float):
        self.engine = engine
        self.max_queue = max_queue
        self.stall_timeout = stall_timeout
        self._timeout_named = option("stall_timeout", int(stall_timeout)
                                     if stall_timeout.is_integer() else stall_timeout)
        self._stalled: set[str] = set()  # the engines logged as stalled
        self._watch: asyncio.Task | None = None
        self.live: dict[str, None] = {}
        self.draining = False  # set at shutdown: /health answers 503
        self.stopping = asyncio.Event()  # set in the event loop as draining begins: a body
        # still arriving is not waited for (:func:`kiln.serve.app._body`)
        self._pumps: set[asyncio.Task] = set()
        self.metrics = ServeMetrics(self.running, self.waiting, self.kv_usage,
                                    self.since_progress)
        self._next = 0

    # -- gauges ------------------------------------------------------------------------------
    def running(self) -> int:
        running = self.engine.llm.core.scheduler.running
        return sum(1 for rid in list(self.live) if rid in running)

    def waiting(self) -> int:
        return len(self.live) - self.running()

    def kv_usage(self) -> float:
        scheduler = self.engine.llm.core.scheduler
        return len(scheduler.running) / max(1, scheduler.limits.max_batch_size)

    def since_progress(self) -> float:
        """The longest an engine with requests outstanding has gone without progress (0:
        none has any outstanding)."""
        return max((p.seconds for p in self._progress() if p.seconds is not None), default=0.0)

    def healthy(self) -> bool:
        """Not shutting down, and the engine can serve (open, its loop running, not failed)."""
        return not self.draining and self.engine.healthy()

    def unhealthy(self) -> ApiError:
        """Why :meth:`healthy` is False, as /health tells it (a 503)."""
        if self.draining:
            return ApiError(503, "the server is shutting down")
        if self.engine.error is not None:  # (a --dp replica that died names itself here)
            failed = engine_failed(self.engine.error, list(self.live))
            return ApiError(503, failed.message, code=failed.code)
        return ApiError(503, "the engine is not running")

    # -- stalls (module docstring) -----------------------------------------------------------
    def stalls(self) -> list[Progress]:
        """The engines stalled now: requests outstanding, no progress for over the timeout."""
        return [p for p in self._progress() if self._over(p)]

    def _over(self, progress: Progress) -> bool:
        return progress.seconds is not None and progress.seconds > self.stall_timeout

    def _progress(self) -> list[Progress]:
        """The engine's progress, each stall's beginning and end logged once."""
        progress = self.engine.progress()
        stalled = {p.engine: p for p in progress if self._over(p)}
        for name in stalled.keys() - self._stalled:
            logger.warning("%s: /health answers 503 until it does",
                           self.stall_text(stalled[name]))
        for name in self._stalled - stalled.keys():
            logger.warning("%s makes progress again (or has no request outstanding): the "
                           "stall is over", name)
        self._stalled = set(stalled)
        return progress

    def stall_text(self, stall: Progress) -> str:
        return (f"{stall.engine} has made no progress for {stall.seconds:.1f} s with requests "
                f"outstanding (over {self._timeout_named})")

    async def _watch_stalls(self) -> None:
        """Look for stalls while requests are live or an engine is busy (their log lines)."""
        period = min(1.0, self.stall_timeout / 4)
        while True:
            await asyncio.sleep(period)
            idle = all(p.seconds is None for p in self._progress())
            if idle and not self.live:
                return

    # -- requests ----------------------------------------------------------------------------
    async def abort_all(self) -> None:
        """End every live request now (shutdown after the grace period): each stream then
        finishes with finish_reason ``abort`` and ``[DONE]``, so no handler is left to cancel."""
        for rid in list(self.live):
            await self.engine.abort(rid)
        if self.live:  # a long step (a CPU prefill: seconds) would hold the aborts
            self.engine.interrupt_step()

    def free_slots(self) -> int:
        scheduler = self.engine.llm.core.scheduler
        return max(0, scheduler.limits.max_batch_size - len(scheduler.running))

    def admit(self, count: int) -> None:
        """Raise a 429 when ``count`` more requests would queue beyond --max_queue: those not
        yet running (submitted or queued) beyond the engine's free slots would wait."""
        if self.max_queue is None:
            return
        most = self.engine.llm.core.scheduler.limits.max_batch_size + self.max_queue
        if count > most:  # never admitted, however long the client retries
            raise ApiError(400, f"this request asks for {count} completions at once (n times "
                                f"the prompts), and the server admits at most {most} (the "
                                f"engine's max_batch_size running, --max_queue "
                                f"{self.max_queue} waiting); lower n or send fewer prompts",
                           param="n")
        would_wait = self.waiting() + count - self.free_slots()
        if would_wait > self.max_queue:
            raise ApiError(429, f"the server's queue is full: "
                                f"{counted(would_wait, 'completion')} would wait for an engine "
                                f"slot, this request's {count} included, past --max_queue "
                                f"{self.max_queue}; retry later",
                           code="queue_full", headers={"Retry-After": "1"})

    async def submit(self, jobs: Sequence[Job], param: str) -> Submitted:
        """Submit every job (all or none: a RequestError is a 400 naming ``param``, or the job's
        label where it has one); once the engine has failed, a 500 saying why, before any
        response (or stream) begins."""
        if self.engine.error is not None:
            raise engine_failed(self.engine.error, [])
        self.admit(len(jobs))
        out: asyncio.Queue = asyncio.Queue()
        rids = await self._submit_all(jobs, out, param)
        return Submitted(self.engine, rids, out)

    async def _submit_all(self, jobs: Sequence[Job], out: asyncio.Queue,
                          param: str) -> list[str]:
        prompts = await self._sized(jobs, param)
        rids = []
        for _ in jobs:
            self._next += 1
            rids.append(f"kiln-{self._next}")
            self.live[rids[-1]] = None
        queued: list[str] = []

        async def submit(job: Job, prompt: Prompt, rid: str) -> None:
            await self.engine.submit(prompt, job.params, request_id=rid)
            queued.append(rid)

        # All at once: the engine thread takes them between the same two steps. One after
        # another, each had waited for a step, and a retest's n of 8 ran 2.0 s against 0.5-0.8
        # for 8 requests of one choice (40 prompts in a list: 10.0 s against 2.1).
        outcomes = None
        try:
            outcomes = await asyncio.gather(*map(submit, jobs, prompts, rids),
                                            return_exceptions=True)
        finally:
            if outcomes is None or any(isinstance(o, BaseException) for o in outcomes):
                for rid in rids:  # none of the request's prompts stays queued or counted
                    self.live.pop(rid, None)
                for rid in queued:
                    await self.engine.abort(rid)
        for job, rid, outcome in zip(jobs, rids, outcomes, strict=True):
            if isinstance(outcome, RequestError):  # the first failure in the request's order
                raise refused(outcome, job, param, rid) from None
            if isinstance(outcome, BaseException):
                raise outcome
        for job, rid in zip(jobs, rids, strict=True):
            task = asyncio.get_running_loop().create_task(self._pump(rid, job.index, out))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_stalls())
        return rids

    async def _sized(self, jobs: Sequence[Job], param: str) -> list[Prompt]:
        """Each job's prompt for the engine: as given, or, where the job's max_tokens was
        given, its token ids, checked against the context (:func:`too_long`): all of them
        before any job is submitted, so a refused request leaves no engine request behind (a
        prompt of ``n`` jobs is encoded once)."""
        encoded: dict[int, list[int]] = {}  # by id() of the prompt its jobs share
        prompts: list[Prompt] = []
        for job in jobs:
            if job.max_tokens_field is None:
                prompts.append(job.prompt)
                continue
            if id(job.prompt) not in encoded:
                try:
                    encoded[id(job.prompt)] = await self._encode(job.prompt)
                except RequestError as e:
                    raise refused(e, job, param) from None
            ids = encoded[id(job.prompt)]
            if (refusal := too_long(job, len(ids), self.engine.llm.limits)) is not None:
                raise refusal
            prompts.append(ids)
        return prompts

    async def _encode(self, prompt: Prompt) -> list[int]:
        """``prompt``'s token ids, as AsyncLLM.submit encodes it (a long text in a worker
        thread, the event loop serving others meanwhile); RequestError as it raises it."""
        if isinstance(prompt, str) and len(prompt) > INLINE_ENCODE_CHARS:
            return await asyncio.to_thread(self.engine.llm.encode, prompt)
        return self.engine.llm.encode(prompt)

    async def _pump(self, rid: str, index: int, out: asyncio.Queue) -> None:
        queued = True  # its queue time is not observed yet (module docstring)
        try:
            async for delta in self.engine.stream(rid):
                if queued and delta.queue_s is not None:
                    self.metrics.queue_time.observe(delta.queue_s)
                    queued = False
                self.metrics.produced(delta.token_ids)
                if delta.result is not None:
                    self.metrics.finished(delta.result)
                    self.live.pop(rid, None)
                out.put_nowait(dataclasses.replace(delta, index=index))
        except Exception as e:  # the executor failed: AsyncLLM raises in every stream
            logger.error("request %s failed: %s", rid, e)
            out.put_nowait(e)
        finally:
            self.live.pop(rid, None)


class Submitted:
    """The jobs of one HTTP request, submitted: iterate :meth:`deltas` (each delta's ``index``
    is its job's) or :meth:`abort` them; leaving ``deltas`` early aborts the ones running."""

    def __init__(self, engine: AsyncLLM, rids: list[str], out: asyncio.Queue):
        self.engine, self.out = engine, out
        self.rids, self.open = rids, set(rids)

    async def deltas(self) -> AsyncIterator[StreamDelta]:
        try:
            while self.open:
                item = await self.out.get()
                if isinstance(item, BaseException):
                    raise engine_failed(item, self.rids)
                if item.finished:
                    self.open.discard(item.request_id)
                yield item
        finally:
            await self.abort()

    async def abort(self) -> None:
        for rid in list(self.open):
            await self.engine.abort(rid)  # never suspends: safe while being cancelled


def refused(error: RequestError, job: Job, param: str, rid: str | None = None) -> ApiError:
    """The 400 of a job the runtime refused (as engine request ``rid``, if submitted): naming
    ``param``, or the job's label where it has one, or the stop_token_ids entry at fault."""
    message = public(str(error), [rid] if rid else [])
    if (error.field or "").startswith("stop_token_ids"):  # outside the vocabulary: not the
        param = error.field  # prompt's fault (nor prompt[0]'s, which it had been told of)
    elif job.label:  # the prompt at fault in a list: prompt[1], as its message
        message, param = f"{job.label}: {message}", job.label
    return ApiError(400, message, param=param, code=error_code(message))


def too_long(job: Job, prompt_len: int, limits: BuildLimits) -> ApiError | None:
    """The 400 of a job whose prompt of ``prompt_len`` tokens and given max_tokens exceed the
    engine's context, in vLLM's and OpenAI's words (clients read the numbers back from them);
    kiln serve had taken it and run it to the end of the context (finish_reason length, even
    for ``"max_tokens": 1e30``). None where they fit, where max_tokens is the endpoint's default,
    and where the prompt alone does not fit: the engine refuses that one in its own words.

    vLLM (vllm/renderers/params.py, TokenizeParams: max_output_tokens is the request's
    max_tokens, or max_completion_tokens, in chat) refuses a prompt longer than max_model_len
    less the max_tokens asked for; its context, ``max_model_len`` (/v1/models), is
    ``max_seq_len + 1`` here, as the last token needs no cache slot (output_room)."""
    if job.max_tokens_field is None or not 0 < prompt_len <= limits.max_input_len:
        return None
    asked = job.params.max_tokens
    if asked <= output_room(limits, prompt_len):
        return None
    context = limits.max_seq_len + 1
    where = f"{job.label}: " if job.label else ""
    return ApiError(400, f"{where}This model's maximum context length is {context} tokens. "
                         f"However, you requested {prompt_len + asked} tokens ({prompt_len} in "
                         f"the messages, {asked} in the completion). Please reduce the length of "
                         f"the messages or completion.",
                    param=job.max_tokens_field, code="context_length_exceeded")


def engine_failed(error: BaseException, rids: Sequence[str]) -> ApiError:
    """The 500 of a request that the engine's failure ended (or refused)."""
    return ApiError(500, f"the engine failed: {public(str(error), rids)}", code="engine_error")


def public(message: str, rids: Sequence[str]) -> str:
    """A runtime message fit for a client: without the server's internal request ids
    (``request kiln-7: ...``), which mean nothing to it (its response has its own id)."""
    for rid in rids:
        message = message.replace(f"request {rid}: ", "").replace(rid, "the request")
    return message


def error_code(message: str) -> str | None:
    """OpenAI's error code for a refused request's message (a prompt over the context)."""
    return "context_length_exceeded" if "max_input_len" in message else None
