"""A data-parallel replica: one process running a whole single-rank engine behind its own
:class:`~kiln.runtime.core.EngineCore` (scheduler, KV cache, sampling, detokenization).

Life of a replica (spawned by :class:`~kiln.runtime.distributed.replicas.ReplicaPool`):

1. :func:`~kiln.runtime.distributed.process.detach` (SIGINT ignored: the driver stops its
   replicas; the process ends within half a second once the driver is gone); on CUDA,
   ``CUDA_VISIBLE_DEVICES`` is set to the replica's GPU before anything initializes CUDA, so
   every backend (torch, onnx, tensorrt) sees it as device 0;
2. open the engine (:func:`~kiln.runtime.loader.open_engine`, one executor) and, when the
   driver has one, its tokenizer; reply ``("ready", ReplicaInfo)``;
3. loop until ``("exit",)`` or the pipe closes (the driver is gone): apply the driver's
   commands (``("add", id, prompt ids, params, prompt text)``, ``("abort", id)``,
   ``("warm_up",)``: run :func:`~kiln.runtime.warm_up.warm_up`, answered ``("warmed", ran)``),
   waiting for one only when the core has no work, then run one core step and send
   ``("step", updates, admitted)``: an :class:`Update` per request that progressed, and
   ``(id, seconds it waited in this replica's scheduler)`` for each request admitted since the
   last message (it holds a KV-cache slot now, or held one: a request may finish in the step
   that admitted it), after every step with either, and after any step at least every
   :data:`PROGRESS_S` (the steps of a long prompt's prefill make no tokens: the driver's
   watch on stalled replicas hears them step). A wait, not a time: no clock is compared
   across processes. An abort is
   answered ``("aborted", id)``: no update of that request comes after it (the driver may
   reuse the id).

Any exception ends the replica: it sends ``("error", text)`` and exits 1.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from kiln.errors import Wording, worded

logger = logging.getLogger(__name__)

PROGRESS_S = 1.0  # a replica that steps sends a message this often at least


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica process needs (pickled to it)."""

    index: int
    engine_dir: str
    options: Any  # ExecutorOptions, dp 1
    policy: Any  # scheduler Policy or None
    with_tokenizer: bool
    cuda_device: str | None  # its entry of the driver's visible GPUs; None on the CPU
    threads: int
    parent_pid: int
    log_level: int
    name: str  # in its log lines: "replica 1", or "engine" when it is the only one
    warned: frozenset[str] = frozenset()  # the checks' warnings the driver has said already
    wording: Wording = Wording()  # of its messages: its driver's (kiln.errors.wording)


@dataclass(frozen=True)
class ReplicaInfo:
    """What the driver learns from a replica once its engine is loaded."""

    limits: Any  # BuildLimits of the engine (one replica's)
    vocab_size: int
    gathers_context_logits: bool


@dataclass(frozen=True)
class Outcome:
    """A finished request's final state, sent with its last delta."""

    text: str
    output_ids: tuple[int, ...]
    logprobs: tuple | None
    prompt_logprobs: tuple | None
    stop_reason: str | int | None
    error: str | None


@dataclass(frozen=True)
class Update:
    """One request's delta of a step (a :class:`~kiln.runtime.core.RequestDelta`) and, on its
    last, its :class:`Outcome`."""

    delta: Any
    outcome: Outcome | None = None


def main(spec: ReplicaSpec, conn: Connection) -> None:
    """Entry of the spawned process, detached from SIGINT and ending with its driver
    (:func:`~.process.spawned`)."""
    if spec.cuda_device is not None:  # before anything initializes CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.cuda_device
    logging.basicConfig(level=spec.log_level,
                        format=f"%(levelname)s %(name)s [{spec.name}]: %(message)s")
    code = 0
    try:
        with worded(spec.wording):
            _Replica(spec, conn).serve()
    except BaseException as e:  # every failure is reported, then the replica ends
        code = 1
        first = str(e).splitlines()[0] if str(e) else ""
        logger.debug("replica %d failed", spec.index, exc_info=True)
        try:
            conn.send(("error", f"failed: {type(e).__name__}" + (f": {first}" if first else "")))
        except OSError:
            pass  # the driver is gone
    conn.close()
    os._exit(code)  # no interpreter teardown: a backend's destructors may wait on the GPU


class _Replica:
    def __init__(self, spec: ReplicaSpec, conn: Connection):
        # Imported here, after CUDA_VISIBLE_DEVICES is set (main).
        import torch

        from kiln.runtime.core import EngineCore, freeze_loaded_objects
        from kiln.runtime.loader import mark_warned, open_engine
        from kiln.runtime.tokenizer import load_tokenizer

        torch.set_num_threads(spec.threads)
        self.conn = conn
        mark_warned(spec.warned)  # said once by the driver, not once per replica
        _, self.executor = open_engine(spec.engine_dir, spec.options)
        tokenizer = load_tokenizer(spec.engine_dir) if spec.with_tokenizer else None
        self.core = EngineCore(self.executor, tokenizer, spec.policy,
                               engine_dir=Path(spec.engine_dir))
        freeze_loaded_objects()
        self.reported: set[str] = set()  # admitted ids the driver was told of
        self.sent = time.monotonic()  # when the last "step" message went
        conn.send(("ready", ReplicaInfo(self.executor.limits, self.executor.vocab_size,
                                        self.executor.gathers_context_logits)))

    def serve(self) -> None:
        try:
            while True:
                while not self.core.has_work() or self.conn.poll():
                    try:
                        message = self.conn.recv()
                    except EOFError:
                        return  # the driver closed its end: it is gone
                    if message[0] == "exit":
                        return
                    self.apply(message)
                self.step()
        finally:
            self.executor.close()

    def apply(self, message: tuple) -> None:
        from kiln.runtime.errors import RequestError

        if message[0] == "warm_up":
            from kiln.runtime.warm_up import warm_up

            self.conn.send(("warmed", warm_up(self.core)))
            return
        if message[0] == "abort":
            self.core.abort(message[1])
            self._forget(message[1])
            self.conn.send(("aborted", message[1]))  # nothing of it follows
            return
        _, request_id, prompt_ids, params, prompt = message
        try:
            self.core.add_request(prompt_ids, params, request_id, prompt)
        except RequestError as e:  # the driver checked it first: an engine that disagrees
            self.conn.send(("step", [_refused(request_id, str(e))], []))

    def step(self) -> None:
        deltas = self.core.step()
        admitted = [(rid, r.admitted_time - r.arrival_time)
                    for rid, r in self.core.requests.items()
                    if r.admitted_time is not None and rid not in self.reported]
        self.reported.update(rid for rid, _ in admitted)
        updates = []
        for delta in deltas:
            outcome = None
            if delta.finished:
                outcome = _outcome(self.core.requests[delta.request_id])
                self._forget(delta.request_id)
            updates.append(Update(delta, outcome))
        now = time.monotonic()
        if updates or admitted or now - self.sent >= PROGRESS_S:
            self.conn.send(("step", updates, admitted))
            self.sent = now

    def _forget(self, request_id: str) -> None:
        if request_id in self.core.requests:
            self.core.pop(request_id)
        self.reported.discard(request_id)


def _outcome(request) -> Outcome:
    return Outcome(request.text, tuple(request.output_ids),
                   None if request.logprobs is None else tuple(request.logprobs),
                   None if request.prompt_logprobs is None else tuple(request.prompt_logprobs),
                   request.stop_reason, request.error)


def _refused(request_id: str, message: str) -> Update:
    from kiln.runtime.core import RequestDelta

    return Update(RequestDelta(request_id, (), "", (), "error"),
                  Outcome("", (), None, None, None, message))
