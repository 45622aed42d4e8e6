"""asyncio front end for web servers: submit, stream and abort requests while others run.

Contract:
- :class:`AsyncLLM` takes over an :class:`~kiln.runtime.llm.LLM`: one engine thread drives its
  core (so the event loop never blocks on a model step); the sync ``generate`` methods of that
  LLM refuse to run while the AsyncLLM is open.
- ``await submit(prompt, params)`` validates and queues a request and returns its id, or raises
  :class:`~kiln.runtime.errors.RequestError` for that request alone; requests join the running
  batch at the next step.
- ``async for delta in stream(request_id)`` yields :class:`StreamDelta` objects until the
  request finishes; ``await abort(request_id)`` ends it (its last delta has finish_reason
  ``abort``) and frees its slot at once; the others continue.
- A request that fails alone (non-finite logits, more KV cache than the executor has) ends its
  stream with finish_reason ``error`` and the reason in ``result.error``; the others go on. If
  the executor itself fails, every open stream raises the error.

Non-goals: fairness between event loops, back-pressure on slow consumers (deltas queue up).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kiln.runtime.errors import RequestError
from kiln.runtime.llm import LLM, Prompt
from kiln.runtime.params import SamplingParams
from kiln.runtime.results import StreamDelta

logger = logging.getLogger(__name__)


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is left to read it
            pass


class AsyncLLM:
    """See the module docstring. Use as ``async with AsyncLLM(llm) as engine: ...``."""

    def __init__(self, llm: LLM):
        if getattr(llm, "async_owner", None) is not None:
            raise RuntimeError("this LLM is already driven by an AsyncLLM; close that one first")
        self.llm = llm
        llm.async_owner = self
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    async def submit(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> str:
        """Queue a request; returns its id (raises RequestError for a bad request)."""
        if self._closed:
            raise RuntimeError("AsyncLLM is closed")
        ids = self.llm.encode(prompt)
        future: concurrent.futures.Future = concurrent.futures.Future()
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        text = prompt if isinstance(prompt, str) else None
        self._send(("add", ids, params or self.llm.default_params, request_id, text, sink, future))
        return await asyncio.wrap_future(future)

    async def stream(self, request_id: str) -> AsyncIterator[StreamDelta]:
        """Deltas of a submitted request until it finishes."""
        sink = self._sinks.get(request_id)
        if sink is None:
            raise RequestError(f"unknown request id {request_id!r} (not submitted, or finished "
                               f"and already streamed)")
        while True:
            item = await sink.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                self._sinks.pop(request_id, None)
                return

    async def abort(self, request_id: str) -> None:
        """End a request now; its stream ends with finish_reason ``abort``."""
        self._send(("abort", request_id))

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None):
        """Submit and wait for the result; cancelling the awaiting task aborts the request."""
        request_id = await self.submit(prompt, params)
        try:
            async for delta in self.stream(request_id):
                if delta.result is not None:
                    return delta.result
        except asyncio.CancelledError:
            self._send(("abort", request_id))
            raise
        raise RuntimeError(f"request {request_id} ended without a result")

    def close(self) -> None:
        """Stop the engine thread (running requests are aborted) and hand the LLM back."""
        if self._closed:
            return
        self._closed = True
        self._send(("close",))
        self._thread.join()
        self.llm.async_owner = None

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    # -- engine thread -----------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _run(self) -> None:
        core = self.llm.core
        while True:
            self._wake.clear()
            with self.llm.lock:
                if not self._drain():
                    for rid in list(core.requests):
                        self._deliver(core.abort(rid))
                    return
                try:
                    deltas = core.step() if core.has_work() else []
                except Exception as e:  # the executor failed: every stream gets the error
                    logger.exception("engine step failed")
                    self._fail_all(e)
                    deltas = []
            for delta in deltas:
                self._deliver(delta)
            if not core.has_work():
                self._wake.wait()

    def _drain(self) -> bool:
        """Apply queued commands; False when asked to close."""
        core = self.llm.core
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if message[0] == "close":
                return False
            if message[0] == "abort":
                self._deliver(core.abort(message[1]))
                continue
            _, ids, params, request_id, text, sink, future = message
            try:
                request = core.add_request(ids, params, request_id, text)
            except RequestError as e:
                future.set_exception(e)
                continue
            self._sinks[request.request_id] = sink
            future.set_result(request.request_id)

    def _deliver(self, delta) -> None:
        if delta is None:
            return
        request = self.llm.core.requests[delta.request_id]
        sink = self._sinks.get(delta.request_id)
        if delta.finished:
            self.llm.core.pop(delta.request_id)
        if sink is not None:
            sink.put(StreamDelta.of(0, delta, request))

    def _fail_all(self, error: Exception) -> None:
        core = self.llm.core
        for rid in list(core.requests):
            core.abort(rid)
            core.pop(rid)
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                sink.put(error)
