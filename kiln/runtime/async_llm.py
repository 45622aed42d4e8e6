"""asyncio front end for web servers: submit, stream and abort requests while others run.

Contract:
- :class:`AsyncLLM` takes over an :class:`~kiln.runtime.llm.LLM`: one engine thread drives its
  core (so the event loop never blocks on a model step); the sync ``generate`` methods of that
  LLM refuse to run while the AsyncLLM is open. ``AsyncLLM(model=..., options=..., policy=...,
  **build_options)`` opens its own ``LLM(model=...)`` (the build cache's engine for a Hugging
  Face checkpoint) and closes it on ``close()``.
- ``await submit(prompt, params)`` validates and queues a request and returns its id, or raises
  :class:`~kiln.runtime.errors.RequestError` for that request alone; requests join the running
  batch at the next step. A text longer than :data:`INLINE_ENCODE_CHARS` is encoded in a worker
  thread (the tokenizer lets go of the GIL), so the event loop is not held while it is.
- ``async for delta in stream(request_id)`` yields :class:`StreamDelta` objects until the
  request finishes; ``await abort(request_id)`` ends it (its last delta has finish_reason
  ``abort``) and frees its slot at once; the others continue. Cancelling the task that reads a
  stream, or leaving the stream early, aborts its request too.
- A request that fails alone (non-finite logits, more KV cache than the executor has) ends its
  stream with finish_reason ``error`` and the reason in ``result.error``; the others go on.
- An engine failure (an exception out of a step: a rank or replica that died, a CUDA error;
  or an engine process or replica found dead while idle, checked every :data:`IDLE_CHECK_S`) is
  terminal: it is logged in one line, every running request's stream raises it, the engine
  thread ends, :meth:`AsyncLLM.healthy` is False from then on, and every later request is
  accepted by ``submit`` (an id, as before) and its stream raises the same error at once, so a
  consumer has one place to turn it into an error event. The LLM keeps the error
  (:attr:`~kiln.runtime.llm.LLM.error`): its sync calls raise it too.
- :meth:`AsyncLLM.progress` tells, from any thread, how long each engine has gone without
  progress while it had requests outstanding: the engine thread (a step that does not end: a
  hung kernel, a stopped rank) and, where the engine runs in processes of its own, each of
  them (:meth:`~kiln.runtime.distributed.replicas.ReplicaCore.progress`). An idle engine has
  none to make. Telling a stall from a long step is the caller's (kiln serve's
  ``--stall_timeout``).
- An AsyncLLM dropped without ``close()`` stops its engine thread when it is garbage collected
  (the thread holds the LLM, never the AsyncLLM), so an unreferenced LLM under it is freed too;
  one still open when the interpreter exits has its engine thread stopped and waited for
  (:func:`_stop_at_exit`).

Non-goals: fairness between event loops, back-pressure on slow consumers (deltas queue up).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import copy
import logging
import os
import queue
import signal
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import described
from kiln.interrupts import interrupt_in
from kiln.runtime.errors import EngineClosedError, RequestError
from kiln.runtime.llm import LLM, Prompt
from kiln.runtime.options import ExecutorOptions
from kiln.runtime.params import SamplingParams
from kiln.runtime.results import StreamDelta
from kiln.runtime.scheduler import Policy

logger = logging.getLogger(__name__)

# a longer text prompt is encoded in a worker thread, so the event loop goes on serving others
# (a 3.5 MB prompt had held a server's /health for 1.8 s); a shorter one costs under 2 ms
INLINE_ENCODE_CHARS = 4096
IDLE_CHECK_S = 0.5  # an idle engine thread checks this often that the engine's processes live
EXIT_WAIT_S = 5.0  # at the interpreter's exit, the wait for an open AsyncLLM's engine thread


@dataclass(frozen=True)
class Progress:
    """One engine's progress (:meth:`AsyncLLM.progress`): ``seconds`` since it last made some
    while it had requests outstanding, None while it has none (idle)."""

    engine: str  # "the engine thread", "replica 1 (pid 12)", "the engine process (pid 12)"
    seconds: float | None


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    streamed: bool = False  # a stream() reads it: one reader a request

    def put(self, item: Any) -> None:
        _post(self.loop, [(self.queue, item)])


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
    """Hand ``items`` to their queues on ``loop``: one wake-up of the loop for all of them."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the caller's event loop is closed: nobody is left to read it
        pass


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue_, item in items:
        queue_.put_nowait(item)


class AsyncLLM:
    """See the module docstring. Use as ``async with AsyncLLM(llm) as engine: ...``."""

    def __init__(self, llm: LLM | None = None, *, model: str | Path | None = None,
                 options: ExecutorOptions | None = None, policy: Policy | None = None,
                 **build_options: Any):
        if (llm is None) == (model is None):
            raise TypeError("AsyncLLM() takes an LLM or model=... (a Hugging Face checkpoint "
                            "dir or hub id, built through the build cache)"
                            + (", not both" if model is not None else ""))
        if llm is not None and not isinstance(llm, LLM):
            hint = f" (an engine dir: AsyncLLM(LLM({str(llm)!r})))" \
                if isinstance(llm, (str, os.PathLike)) else ""
            raise TypeError(f"AsyncLLM() takes an LLM or model=..., found "
                            f"{type(llm).__name__} {llm!r:.60}{hint}")
        if llm is not None and (options is not None or policy is not None or build_options):
            raise TypeError("AsyncLLM(llm) takes no options: the LLM was opened with its own")
        self._owns_llm = llm is None  # close() closes an LLM this AsyncLLM opened
        if llm is None:
            with _ctrl_c_raises():
                llm = LLM(model=model, options=options, policy=policy, **build_options)
        try:
            self._start(llm)
        except BaseException:
            if self._owns_llm:
                llm.close()
            raise

    def _start(self, llm: LLM) -> None:
        llm.check_open()
        if getattr(llm, "async_owner", None) is not None:
            raise RuntimeError("this LLM is already driven by an AsyncLLM; close that one first")
        self.llm = llm
        self._loop = _EngineLoop(llm)
        llm.async_owner = self._loop
        self._closed = False
        # in the caller's context: the engine's messages name options as its caller's do
        # (kiln serve's flags: kiln.errors.option), not as a new thread's defaults would
        self._thread = threading.Thread(target=contextvars.copy_context().run,
                                        args=(self._loop.run,), name="kiln-engine", daemon=True)
        self._thread.start()
        self._loop.thread = self._thread
        _RUNNING.add(self._loop)
        # dropped without close(): the thread stops when this is collected, and lets the LLM go
        weakref.finalize(self, self._loop.send, ("close",)).atexit = False

    @property
    def error(self) -> BaseException | None:
        """The engine's failure (terminal), or None."""
        return self._loop.error

    def healthy(self) -> bool:
        """True while the engine can serve requests: open, its thread running, not failed."""
        return not self._closed and self._loop.error is None and self._thread.is_alive()

    def progress(self) -> list[Progress]:
        """Each engine's :class:`Progress` (module docstring): the engine thread's (the time
        since its last step ended, or since it was given work while idle) and, with engine
        processes, each one's (since its last message). Nothing once the engine has failed
        or is closed (:meth:`healthy` tells that)."""
        if not self.healthy():
            return []
        core, now = self.llm.core, time.monotonic()
        clocks = [("the engine thread", self._loop.came_round if core.has_work() else None),
                  *core.progress()]
        return [Progress(name, None if at is None else max(0.0, now - at))
                for name, at in clocks]

    async def submit(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> str:
        """Queue a request; returns its id (raises RequestError for a bad request)."""
        if self._closed:
            raise self._closed_error()
        if isinstance(prompt, str) and len(prompt) > INLINE_ENCODE_CHARS:
            ids = await asyncio.to_thread(self.llm.encode, prompt)
        else:
            ids = self.llm.encode(prompt)
        future: concurrent.futures.Future = concurrent.futures.Future()
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        text = prompt if isinstance(prompt, str) else None
        params = self.llm.default_params if params is None else params  # ({} is refused)
        self._loop.send(("add", ids, params, request_id, text, sink, future))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # (a timeout, a server's client gone)
            # nobody will stream it: not queued if the engine thread had not taken it yet
            # (``future`` cancelled with the wait), aborted once queued if it had
            future.add_done_callback(self._abort_orphan)
            raise

    def _abort_orphan(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._loop.sinks.pop(future.result(), None)
            self._loop.send(("abort", future.result()))

    async def stream(self, request_id: str) -> AsyncIterator[StreamDelta]:
        """Deltas of a submitted request until it finishes (raises the engine's failure).
        Cancelling the consuming task, or leaving the stream before its end (``break``, then
        the generator's ``aclose()``), aborts the request."""
        _check_id(request_id)
        sink = self._loop.sinks.get(request_id)
        if sink is None:
            if self._loop.error is not None:
                raise _again(self._loop.error)
            raise RequestError(f"unknown request id {request_id!r} (not submitted, or finished "
                               f"and already streamed)")
        if sink.streamed:  # two readers had each got some of its deltas, one waited for good
            raise RequestError(f"request {request_id!r} is streamed already; read its deltas "
                               f"from that one stream")
        sink.streamed = True
        ended = False
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise _again(item)
                yield item
                if item.finished:
                    ended = True
                    return
        finally:
            self._loop.sinks.pop(request_id, None)
            if not ended:  # the consumer was cancelled or stopped reading: its slot is freed
                self._loop.send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """End a request now; its stream ends with finish_reason ``abort``."""
        _check_id(request_id)  # (an unhashable one had killed the engine thread)
        self._loop.send(("abort", request_id))

    def interrupt_step(self) -> None:
        """End the engine's step under way early (:meth:`kiln.runtime.LLM.interrupt_step`):
        after :meth:`abort` of every request in it (a server's shutdown), so that their streams
        end now, not when a long prefill does."""
        self.llm.interrupt_step()

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None):
        """Submit and wait for the result; cancelling the awaiting task aborts the request."""
        request_id = await self.submit(prompt, params)
        async for delta in self.stream(request_id):  # a cancel there aborts the request
            if delta.result is not None:
                return delta.result
        raise RuntimeError(f"request {request_id} ended without a result")

    def close(self, now: bool = False) -> None:
        """Stop the engine thread (running requests are aborted) and hand the LLM back, or
        close it if this AsyncLLM opened it (``model=``; engine processes killed at once with
        ``now``: :meth:`LLM.close`)."""
        if self._closed:
            return
        self._closed = True
        self._loop.send(("close",))
        self.llm.interrupt_step()  # a long step (a CPU prefill: seconds) ends now
        self._thread.join()
        if self._owns_llm:
            self.llm.close(now)

    async def __aenter__(self) -> AsyncLLM:
        if self._closed:
            raise self._closed_error()
        return self

    def _closed_error(self) -> EngineClosedError:
        again = f"Async{self.llm.opened_as}" if self._owns_llm \
            else "AsyncLLM(llm), over an open LLM"
        return EngineClosedError(f"AsyncLLM is closed; make a new one ({again})")

    async def __aexit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        # Left by Ctrl-C (asyncio.run cancels the main task) or a cancel: engine processes
        # are killed at once, not asked to exit after a step of seconds (--dp 2 on a CPU: 5.9 s).
        now = isinstance(error, asyncio.CancelledError) or interrupt_in(error) is not None
        await asyncio.to_thread(self.close, now)


@contextlib.contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in the body, as outside asyncio, where the body blocks
    a running event loop (``AsyncLLM(model=...)``'s convert and build, minutes for a large
    model): ``asyncio.run``'s own SIGINT handler only cancels its main task, which that task
    sees once the body returns (a retest's build ran on 9 s past Ctrl-C, to the end)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no event loop here: Python's own handling, or the caller's
        yield
        return
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.default_int_handler,
                                                None):  # (None: not Python's to restore)
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_RUNNING: weakref.WeakSet[_EngineLoop] = weakref.WeakSet()  # every engine thread's loop


@atexit.register
def _stop_at_exit() -> None:
    """AsyncLLMs left open when the interpreter exits: their engine threads are stopped (the
    step under way interrupted, the requests aborted) and waited for. A daemon thread still
    inside an ONNX Runtime run while the interpreter tore down had aborted the process
    (``terminate called without an active exception``, exit 134; a retest's script)."""
    loops = [loop for loop in list(_RUNNING) if loop.thread.is_alive()]
    for loop in loops:
        loop.send(("close",))
        loop.llm.interrupt_step()
    deadline = time.monotonic() + EXIT_WAIT_S
    for loop in loops:
        loop.thread.join(max(0.0, deadline - time.monotonic()))


def _check_id(request_id: object) -> None:
    if not isinstance(request_id, str):
        raise RequestError(f"a request id is a string, found {described(request_id)}")


def _again(error: BaseException) -> BaseException:
    """``error`` to raise once more in another stream: a copy without the earlier traceback."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:  # noqa: BLE001 - an exception that does not copy: raise it as it is
        return error


class _EngineLoop:
    """The engine thread's state and loop. It holds the LLM, never its AsyncLLM.

    ``send`` and the failure share a lock: once the loop has ended (failed or closed) nothing
    more enters the inbox; a message sent after that is answered on the sender's thread.
    """

    def __init__(self, llm: LLM):
        self.llm = llm
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.sinks: dict[str, _Sink] = {}
        self.error: BaseException | None = None
        self.ended = False
        self._gate = threading.Lock()
        self.came_round = time.monotonic()  # the loop's last turn began (a step had ended)
        self.thread: threading.Thread  # the engine thread that runs it (AsyncLLM._start)

    def send(self, message: tuple) -> None:
        with self._gate:
            if not self.ended:
                self.inbox.put(message)
                self.wake.set()
                self.llm.core.wake()  # a step waiting on engine processes ends its wait
                return
        self._refuse(message)

    def run(self) -> None:
        core = self.llm.core
        try:
            while True:
                self.came_round = time.monotonic()  # AsyncLLM.progress's clock
                self.wake.clear()
                with self.llm.lock:
                    if not self._drain():
                        for rid in list(core.requests):
                            self._deliver(core.abort(rid))
                        return
                    try:
                        deltas = self.llm._step() if core.has_work() else []
                    except Exception as e:  # the engine failed: terminal (module docstring)
                        self._fail(e)
                        return
                # one wake-up per event loop per step, not one per request (a server's loop
                # serves every stream: 16 streams were 16 cross-thread wake-ups a step)
                posts: dict[asyncio.AbstractEventLoop, list] = {}
                for delta in deltas:
                    self._deliver(delta, posts)
                for loop, items in posts.items():
                    _post(loop, items)
                if not core.has_work() and not self._idle():
                    return
        finally:
            with self._gate:
                self.ended = True
            while True:  # sent before the loop ended, never read
                try:
                    self._refuse(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if self.llm.async_owner is self:
                self.llm.async_owner = None

    def _idle(self) -> bool:
        """Wait for a command; meanwhile check every :data:`IDLE_CHECK_S` that the engine's
        processes live (one that died is the engine's failure now, not at the next request).
        False when the engine failed."""
        while not self.wake.wait(IDLE_CHECK_S):
            try:
                self.llm.check_alive()
            except Exception as e:  # noqa: BLE001 - the engine failed: terminal
                self._fail(e)
                return False
        return True

    def _drain(self) -> bool:
        """Apply queued commands; False when asked to close."""
        core = self.llm.core
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return True
            if message[0] == "close":
                return False
            if message[0] == "abort":
                self._deliver(core.abort(message[1]))
                continue
            _, ids, params, request_id, text, sink, future = message
            if not future.set_running_or_notify_cancel():  # its submit was cancelled
                continue
            # an id is in use until its stream is read, also once its request finished (the
            # core forgets it then): taken again, the unread stream had been lost
            if request_id is None:
                while (request_id := core.new_request_id()) in self.sinks:
                    pass
            elif isinstance(request_id, str) and request_id in self.sinks:
                future.set_exception(RequestError(f"request id {request_id!r} is already in "
                                                  f"use; pick another"))
                continue
            try:
                request = core.add_request(ids, params, request_id, text)
            except RequestError as e:
                future.set_exception(e)
                continue
            self.sinks[request.request_id] = sink
            future.set_result(request.request_id)

    def _refuse(self, message: tuple) -> None:
        """A message for a loop that has ended: a request gets an id and a stream that raises
        the engine's failure (or is refused if the AsyncLLM was closed); the rest is moot."""
        if message[0] != "add":
            return
        _, _, _, request_id, _, sink, future = message
        if not future.set_running_or_notify_cancel():  # its submit was cancelled
            return
        if self.error is None:
            future.set_exception(EngineClosedError("AsyncLLM is closed; make a new one"))
            return
        request_id = request_id or self.llm.core.new_request_id()
        self.sinks[request_id] = sink
        sink.put(self.error)
        future.set_result(request_id)

    def _deliver(self, delta, posts: dict | None = None) -> None:
        """Send ``delta`` to its stream now, or gather it in ``posts`` (per event loop)."""
        if delta is None:
            return
        request = self.llm.core.requests[delta.request_id]
        sink = self.sinks.get(delta.request_id)
        if delta.finished:
            self.llm.core.pop(delta.request_id)
        if sink is None:
            return
        item = StreamDelta.of(0, delta, request)
        if posts is None:
            sink.put(item)
        else:
            posts.setdefault(sink.loop, []).append((sink.queue, item))

    def _fail(self, error: Exception) -> None:
        """Every running request's stream gets ``error``; later ones too (:meth:`_refuse`)."""
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.error("the engine failed, every request fails from now on: %s", first)
        logger.debug("engine failure", exc_info=error)
        with self._gate:
            self.error, self.ended = error, True
        core = self.llm.core
        for rid in list(core.requests):
            core.abort(rid)
            core.pop(rid)
            sink = self.sinks.get(rid)
            if sink is not None:
                sink.put(error)
