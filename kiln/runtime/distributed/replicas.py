"""Data-parallel replicas: N copies of a single-rank engine behind one scheduler front.

``LLM(engine_dir, ExecutorOptions(dp=N))`` (``kiln run --dp N``, ``kiln bench --dp N``) starts
N replica processes (:mod:`.replica_worker`), one per GPU on CUDA (replica i on the driver's
i-th visible GPU) or N CPU processes (the cores split between them), and drives them through
:class:`ReplicaCore`, which has the request API of :class:`~kiln.runtime.core.EngineCore`
(``add_request``, ``step``, ``abort``, ``pop``, ``requests``), so ``LLM``, ``AsyncLLM`` and the
benchmark run unchanged over it.

Design: the front routes whole requests; each replica is a complete engine (its own
``EngineCore``: scheduler, KV cache, sampling, detokenization, stop strings) and runs its own
steps at its own pace. The alternative, a driver that owns N executors and schedules and
samples every replica's steps itself, was not taken: every step of every replica would pass
through one process (its logits, [batch, vocab] floats, or a lockstep of plans), the replicas
would wait on each other and on the driver's sampling, and the torch executor's async
scheduling and CUDA graphs would stop at a process boundary. Here only requests go down and
token ids and text come up: a replica never waits for another.

Routing (the front's invariant): a request is sent to a replica only when that replica has a
free slot (fewer live requests than its ``max_batch_size``), to the one with the fewest live
requests, ties to the fewest tokens still to process (prompt + max new tokens - generated), then
the lowest index; requests beyond every free slot wait in the front, first come first served,
and go to the first replica that frees a slot. So no request waits in one replica's queue while
another has room, and a replica gets at most what it can batch at once. The cost: when a slot
frees, its next request reaches the replica one message later (the replica may run one step
without it). A request stays on its replica to the end (no migration); a replica whose paged KV
cache cannot hold a request yet keeps it waiting there, as one engine would.

Per request, a replica returns exactly what one engine returns (its core is EngineCore, its
executor the same engine): the same greedy tokens, text, logprobs and finish reasons. Timings
are the front's: a token's time is when the front received it, arrival is ``add_request``,
admission is when the front routed it plus the wait its replica measured in its own scheduler
(usually none: a request is routed only to a free slot).

``ReplicaCore.limits`` is one replica's, with ``max_batch_size`` and ``max_num_tokens`` times N
(what the front holds at once); ``scheduler.running`` lists the requests that hold a slot in
some replica (for ``kiln serve``'s gauges).

Faults: a replica that dies or fails ends the run: the next :meth:`ReplicaCore.step` (the
front waits on every replica's pipe and process sentinel, so within :data:`STEP_WAIT_S` of the
death when a run is going) raises one :class:`~kiln.runtime.errors.WorkerError` line naming
the replica and the cause; the other replicas are killed; every later step raises it again.
Replicas end by themselves when the driver dies (:mod:`.process`); Ctrl-C in the driver ends
the run and closing the LLM stops every replica; an LLM dropped without closing lets them go
when it is garbage collected (the pool's pipes close: each replica exits at its next wait for
a message).

Stalls: a replica that stops making progress while alive (a stopped process, a hung kernel) is
no fault here: :meth:`ReplicaCore.progress` tells, from any thread, since when each replica
with requests outstanding (an abort not answered yet included) has been silent (``kiln
serve``'s ``/health`` turns 503 past its ``--stall_timeout``). Such a replica silent for more
than :data:`QUIET_S` (a replica that steps says something once a second) is routed no new
request while another is not quiet (they wait in the front for that one's slots): a stopped
one had been given its share of new requests, which waited for it (a retest's 94 of 200 timed
out); one merely in a long step only takes no new work till it speaks. When every replica is
quiet, requests are routed as ever.

One replica (``ExecutorOptions(engine_process=True)``, ``kiln serve --engine_process``) is the
engine in a process of its own: the caller's process keeps only this front, so its Python
threads (a server's event loop: HTTP, JSON, one chunk per token per stream) no longer share a
GIL with the thread that launches the model's kernels. Measured in ``benchmarks/GPU_NOTES.md``
(issue 13): in one process the server's prefill steps took 36-51 ms of host time against 25.

Sending: the front never writes to a replica's pipe itself. Each replica has an outbox
(:class:`_Outbox`): a message is pickled by the caller and handed to a thread of that replica's
own, which writes its messages in order. So a replica that stops reading (SIGSTOP, a hung
kernel) while its pipe is full blocks only its writer, never the front, its step or the other
replicas (nor a shutdown: the replica is killed, and its writer's write fails); and a replica
blocked on sending to the front while the front sends to it cannot deadlock the two. Bound: a
replica whose outbox holds more than ``max_batch_size`` messages not yet written is routed no
new request until they are (each request routed to it adds one message, its abort one more), so
past what the pipe holds, a replica that does not read keeps at most about ``2 *
max_batch_size + 2`` messages in the front, each of one request at most.

Waking: :meth:`ReplicaCore.step` waits up to :data:`STEP_WAIT_S` for the replicas' messages;
:meth:`ReplicaCore.wake` (any thread) ends that wait at once, so a request submitted meanwhile
(``AsyncLLM`` calls it on every command) is routed without waiting for a replica's next step.

Not supported: replicas of a multi-rank engine (dp x tp > 1, refused at load by
:func:`~kiln.runtime.loader.check_replicas`: a replica would start its own ranks, one GPU each,
from a daemon process), replicas on other machines, restarting a failed replica.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

from kiln.engine import BuildLimits, EngineManifest
from kiln.errors import wording
from kiln.runtime.core import EngineCore, Request, RequestDelta, check_prompt, check_request
from kiln.runtime.distributed.process import exit_cause, spawn_args, spawned, start
from kiln.runtime.distributed.replica_worker import ReplicaInfo, ReplicaSpec, Update
from kiln.runtime.errors import RequestError, WorkerError
from kiln.runtime.loader import check_engine, run_device, warned
from kiln.runtime.options import ExecutorOptions
from kiln.runtime.params import SamplingParams
from kiln.runtime.scheduler import Policy

logger = logging.getLogger(__name__)

STEP_WAIT_S = 0.05  # a step waits this long at most for a replica's message
STOP_WAIT_S = 5.0  # a graceful shutdown's wait for the replicas to exit before killing them
QUIET_S = 5.0  # a busy replica silent this long is routed nothing new while another is not
WRITER_WAIT_S = 1.0  # a shutdown's wait for the writers once their replicas are gone


class _Outbox:
    """One replica's messages on their way (module docstring, Sending): pickled by the caller,
    written to the pipe in order by a daemon thread of their own. It holds no reference to the
    pool: a pool dropped without shutdown closes the pipe through :meth:`stop` (the replica
    exits at its next wait for a message)."""

    def __init__(self, conn: Connection, name: str):
        self.conn = conn
        self.backlog = 0  # messages handed over, not written yet (the one being written too)
        self.broken = False  # a write failed: the replica is gone
        self.stopped = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._write, name=name, daemon=True)
        self.thread.start()

    def put(self, message: tuple) -> bool:
        """Queue ``message``; False if the pipe is closed (its replica died, or the pool shut
        down)."""
        if self.broken or self.stopped:
            return False
        data = ForkingPickler.dumps(message)  # now: what the caller sent, as it was
        with self._lock:
            self.backlog += 1
        self._queue.put(data)
        return True

    def stop(self, close: bool = False) -> None:
        """End the writer once what is queued is written (or a write fails), closing the pipe
        with ``close``."""
        self.stopped = True
        self._queue.put(_CLOSE if close else _STOP)

    def _write(self) -> None:
        while (data := self._queue.get()) is not _STOP:
            if data is _CLOSE:
                self.conn.close()
                return
            if not self.broken:
                try:
                    self.conn.send_bytes(data)
                except OSError as e:  # the replica is gone: receive() names it
                    logger.debug("%s: %s", threading.current_thread().name, e)
                    self.broken = True
            with self._lock:
                self.backlog -= 1


_STOP, _CLOSE = object(), object()  # an outbox's last entry: end the writer (and close)


class ReplicaPool:
    """The replica processes, their pipes, and the first fault among them."""

    def __init__(self, engine_dir: Path, options: ExecutorOptions, policy: Policy | None,
                 with_tokenizer: bool, devices: Sequence[str | None]):
        self.size = len(devices)
        self.devices = list(devices)
        # the front's wake-up (ReplicaCore.wake): a self-pipe that receive() also waits on;
        # non-blocking, so a write to a full pipe (a wake-up pending already) is dropped
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # closed with the pool object, never before: a wake() racing a shutdown must not
        # write into a descriptor number that another file has taken since
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self.processes: list[multiprocessing.Process] = []
        self.conns: list[Connection] = []
        self.outboxes: list[_Outbox] = []
        weakref.finalize(self, _close_outboxes, self.outboxes)  # dropped without shutdown
        self._error: WorkerError | None = None
        self._closed = False
        threads = options.num_threads or max(1, len(os.sched_getaffinity(0)) // self.size)
        # the front checked the files (and their checksums, if asked) before any replica starts
        single = dataclasses.replace(options, dp=1, engine_process=False, num_threads=threads,
                                     verify_checksums=False)
        context = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        try:
            for i, device in enumerate(devices):
                spec = ReplicaSpec(i, str(engine_dir), single, policy, with_tokenizer, device,
                                   threads, os.getpid(), level,
                                   f"replica {i}" if self.size > 1 else "engine", warned(),
                                   wording())
                ours, theirs = context.Pipe()
                process = context.Process(target=spawned, args=spawn_args(
                    "kiln.runtime.distributed.replica_worker:main", spec, theirs), daemon=True,
                    name=f"kiln-replica{i}")
                start(process)
                theirs.close()
                self.processes.append(process)
                outbox = _Outbox(ours, f"kiln-replica{i}-writer")  # (ours closed by GC if not)
                self.conns.append(ours)
                self.outboxes.append(outbox)
                self.check_alive()  # one that died while the others start (memory ran out)
            self.infos = self._ready()
        except BaseException:
            self.shutdown(kill=True)
            raise

    def label(self, i: int) -> str:
        gpu = f"GPU {self.devices[i]}, " if self.devices[i] is not None else ""
        name = f"replica {i}" if self.size > 1 else "the engine process"
        return f"{name} ({gpu}pid {self.processes[i].pid})"

    def _ready(self) -> list[ReplicaInfo]:
        infos: dict[int, ReplicaInfo] = {}
        while len(infos) < self.size:
            for i, message in self.receive(None):
                if message[0] != "ready":
                    raise RuntimeError(f"{self.label(i)} sent {message[0]!r} before 'ready'")
                infos[i] = message[1]
        return [infos[i] for i in range(self.size)]

    # -- messages -----------------------------------------------------------------------------
    def send(self, i: int, message: tuple) -> bool:
        """Send to replica ``i`` through its outbox (never blocks); False if its pipe is closed
        (it died: :meth:`receive` says)."""
        return self.outboxes[i].put(message)

    def backlog(self, i: int) -> int:
        """The messages sent to replica ``i`` that its pipe has not taken yet."""
        return self.outboxes[i].backlog

    def receive(self, timeout: float | None) -> list[tuple[int, tuple]]:
        """Every message that arrives within ``timeout`` (None: until one does), as (replica,
        message); raises the pool's WorkerError when a replica died or failed."""
        self.check()
        index = {conn: i for i, conn in enumerate(self.conns)}
        sentinels = {p.sentinel: i for i, p in enumerate(self.processes)}
        out = []
        for ready in wait([*index, *sentinels, self._wake_r], timeout):
            if ready == self._wake_r:
                self._clear_wake()
                continue
            i = index.get(ready)
            if i is None:  # a process ended: its last words first, then its exit
                i = sentinels[ready]
                self.processes[i].join(1.0)
                self._fail(i, exit_cause(self.processes[i].exitcode), self._drain(i))
            for message in self._drain(i):
                if message[0] == "error":
                    self._fail(i, message[1])
                out.append((i, message))
        return out

    def wake(self) -> None:
        """End a :meth:`receive` that waits now, or the next one, at once (any thread)."""
        try:
            os.write(self._wake_w, b"w")
        except (BlockingIOError, OSError):  # full: a wake-up is pending; closed: shut down
            pass

    def _clear_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _drain(self, i: int) -> list[tuple]:
        messages = []
        try:
            while self.conns[i].poll():
                messages.append(self.conns[i].recv())
        except (EOFError, OSError):
            pass
        return messages

    # -- faults and shutdown ------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        return self._error is not None

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def check_alive(self) -> None:
        """Raise the pool's WorkerError if a replica died, reading no message (an idle
        front's check: nothing else would look until the next request)."""
        self.check()
        for ready in wait([p.sentinel for p in self.processes], 0):
            i = next(i for i, p in enumerate(self.processes) if p.sentinel == ready)
            self.processes[i].join(1.0)
            self._fail(i, exit_cause(self.processes[i].exitcode), self._drain(i))

    def _fail(self, i: int, cause: str, last: Sequence[tuple] = ()) -> None:
        """Replica ``i`` died or failed: stop every replica, raise the one line naming it."""
        said = [m[1] for m in last if m[0] == "error"]
        others = "; the other replicas were stopped" if self.size > 1 else ""
        self._error = WorkerError(f"{self.label(i)} {said[0] if said else cause}{others}")
        logger.debug("%s", self._error)
        self.shutdown(kill=True)
        raise self._error

    def shutdown(self, kill: bool = False) -> None:
        """Ask every replica to exit (killed after :data:`STOP_WAIT_S`; at once with ``kill``)
        and wait for them: no process outlives the pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        waited = False
        try:
            if not kill:
                for i in range(len(self.conns)):
                    self.send(i, ("exit",))
                start = time.monotonic()
                for patience in (1.0, STOP_WAIT_S):  # a word to the user after the first second
                    for process in self.processes:
                        process.join(max(0.0, start + patience - time.monotonic()))
                    slow = [i for i, p in enumerate(self.processes) if p.is_alive()]
                    if not slow or patience == STOP_WAIT_S:
                        break
                    logger.warning("waiting up to %.0f s for %s to exit (Ctrl-C: kill it now)",
                                   STOP_WAIT_S, ", ".join(self.label(i) for i in slow))
                waited = True
        finally:  # also when Ctrl-C ends the wait: a stopped replica would outlive the driver
            for outbox in self.outboxes:
                outbox.stop()
            for i, process in enumerate(self.processes):
                if process.is_alive():
                    if waited:
                        logger.warning("%s did not exit within %.0f s of being asked; killed "
                                       "it", self.label(i), STOP_WAIT_S)
                    process.kill()
                process.join()
            self._close_pipes()

    def _close_pipes(self) -> None:
        """Close each pipe once its writer has ended: its replica is gone, so a write blocked
        on a full pipe has failed (a writer still at it keeps its pipe: no descriptor closed
        under a write)."""
        deadline = time.monotonic() + WRITER_WAIT_S
        for i, (conn, outbox) in enumerate(zip(self.conns, self.outboxes, strict=True)):
            outbox.thread.join(max(0.0, deadline - time.monotonic()))
            if outbox.thread.is_alive():
                logger.debug("%s's writer is still writing; its pipe is left open", self.label(i))
            else:
                conn.close()


class RunningView:
    """``ReplicaCore.scheduler``: the requests holding a slot in some replica (``running``,
    updated in place) and the front's ``limits``; what ``kiln serve``'s gauges read."""

    def __init__(self, limits: BuildLimits):
        self.limits = limits
        self.running: dict[str, None] = {}


class ReplicaCore:
    """EngineCore's request API over data-parallel replicas (see the module docstring)."""

    def __init__(self, pool: ReplicaPool, manifest: EngineManifest, has_tokenizer: bool):
        info = pool.infos[0]
        self.pool, self.manifest, self.has_tokenizer = pool, manifest, has_tokenizer
        self.replica_limits = info.limits
        self.limits = dataclasses.replace(
            info.limits, max_batch_size=info.limits.max_batch_size * pool.size,
            max_num_tokens=info.limits.max_num_tokens * pool.size)
        self.vocab_size = info.vocab_size
        self.gathers_context_logits = info.gathers_context_logits
        self.scheduler = RunningView(self.limits)
        self.requests: dict[str, Request] = {}
        self.served = [0] * pool.size  # requests routed to each replica
        # requests not routed yet, first come first served; an abort takes any one out in O(1)
        # (a deque's removal scanned it: kiln.runtime.scheduler.WaitingQueue's reason)
        self._queue: OrderedDict[str, None] = OrderedDict()
        self._replica_of: dict[str, int] = {}
        self._routed: dict[str, float] = {}  # routed, not yet admitted: when it was sent
        self._live = [0] * pool.size
        self._tokens = [0] * pool.size  # tokens still to process, per replica
        self._aborting: set[tuple[int, str]] = set()  # (replica, id): abort sent, not answered
        # time.monotonic() of each replica's last message, or of its first request after it
        # was idle (:meth:`progress`)
        self._heard = [time.monotonic()] * pool.size
        self._next_id = 0

    @classmethod
    def open(cls, engine_dir: str | Path, options: ExecutorOptions,
             policy: Policy | None = None, with_tokenizer: bool = True,
             checked: tuple | None = None) -> ReplicaCore:
        """Check the engine and machine for ``options.dp`` replicas (one with
        ``engine_process``; ``checked``: what :func:`~kiln.runtime.loader.check_engine` gave the
        caller already), start them, wait until each has loaded the engine."""
        manifest, module, machine = checked or check_engine(engine_dir, options)
        device = run_device(module, manifest, machine, options)
        devices: list[str | None] = [None] * options.dp
        if device == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names = visible.split(",") if visible else [str(i) for i in range(len(machine.gpus))]
            devices = [name.strip() for name in names[:options.dp]]
        if options.dp == 1:
            logger.info("starting the engine %s in a process of its own (%s)", engine_dir,
                        f"GPU {devices[0]}" if device == "cuda" else "CPU")
        else:
            logger.info("starting %d replicas of %s (%s)", options.dp, engine_dir,
                        f"GPUs {', '.join(devices)}" if device == "cuda" else "CPU processes")
        pool = ReplicaPool(Path(engine_dir), options, policy, with_tokenizer, devices)
        return cls(pool, manifest, with_tokenizer)

    def close(self, now: bool = False) -> None:
        """Stop the replicas: asked to exit (killed after :data:`STOP_WAIT_S`), or killed
        at once with ``now``."""
        self.pool.shutdown(kill=now)

    def check_alive(self) -> None:
        """Raise the WorkerError of a replica that died while the front was idle, and read
        the answers to aborts still owed (till then their replicas are busy: :meth:`progress`;
        a stopped one would have stayed so for good, no step reading its late answer)."""
        self.pool.check_alive()
        if self._aborting:
            self._receive(0)  # (what else comes is of the aborted requests: dropped)

    def progress(self) -> list[tuple[str, float | None]]:
        """Each replica's name and the ``time.monotonic()`` of its last progress (its last
        message: a replica sends one per step that made tokens or admitted a request, and
        one a second at least while it steps), or of when it was given work while idle; None
        while it has no request outstanding (routed to it, or aborted and not answered yet).
        Read from any thread: a stopped or hung replica is told by its silence."""
        return [(self.pool.label(i), self._heard[i] if self._busy(i) else None)
                for i in range(self.pool.size)]

    def _busy(self, i: int) -> bool:
        # (a copy first: another thread's progress() may read while the engine thread adds)
        return self._live[i] > 0 or any(r == i for r, _ in list(self._aborting))

    def wake(self) -> None:
        """End the wait of a :meth:`step` now (thread-safe): a request added meanwhile is routed
        at once rather than after the replicas' next message."""
        self.pool.wake()

    def warm_up(self) -> bool:
        """Every replica warms its own engine up (kiln.runtime.warm_up), all at once; returns
        when each has, whether they needed it (raises the WorkerError of one that died)."""
        if self.has_work():
            raise RuntimeError("warm the replicas up before they take requests")
        waiting = {i for i in range(self.pool.size) if self.pool.send(i, ("warm_up",))}
        self.pool.check()
        warmed = False
        while waiting:
            for i, message in self.pool.receive(None):
                self._heard[i] = time.monotonic()
                if message[0] == "warmed":
                    waiting.discard(i)
                    warmed = warmed or message[1]
                elif message[0] == "aborted":
                    self._aborting.discard((i, message[1]))
        return warmed

    # -- requests -----------------------------------------------------------------------------
    new_request_id = EngineCore.new_request_id  # (its _next_id and requests are these)

    def check_prompt(self, label: str, prompt_ids: Sequence[int], path: str = "prompt") -> None:
        check_prompt(label, prompt_ids, self.replica_limits, self.vocab_size, path)

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None, prompt: str | None = None) -> Request:
        """Validate and queue a request (EngineCore's checks and errors); it is routed at once
        when a replica has a free slot."""
        request_id = request_id or self.new_request_id()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use; pick another")
        max_new = check_request(request_id, prompt_ids, params, self.replica_limits,
                                self.vocab_size, self.has_tokenizer, self.gathers_context_logits)
        request = Request(request_id, list(prompt_ids), params, max_new, None, frozenset(),
                          None, None, prompt,
                          logprobs=None if params.logprobs is None else [],
                          prompt_logprobs=None if params.prompt_logprobs is None else [None])
        self.requests[request_id] = request
        self._queue[request_id] = None
        self._route()
        return request

    def has_work(self) -> bool:
        return bool(self._queue or self._replica_of)

    def step(self) -> list[RequestDelta]:
        """The deltas the replicas sent within :data:`STEP_WAIT_S` (at least one message's
        worth when one comes sooner); raises the WorkerError of a replica that died."""
        self.pool.check()
        self._route()
        if not self._replica_of and not self._queue:
            return []
        # requests left queued while every replica is free: a send failed (one died), and the
        # receive below names it
        deltas = self._receive(STEP_WAIT_S)
        self._route()
        return deltas

    def _receive(self, timeout: float) -> list[RequestDelta]:
        """The deltas of the replicas' messages within ``timeout``; aborts' answers noted."""
        deltas: list[RequestDelta] = []
        for i, message in self.pool.receive(timeout):
            self._heard[i] = time.monotonic()
            if message[0] == "aborted":
                self._aborting.discard((i, message[1]))
            else:
                deltas += self._apply(i, message[1], message[2])
        return deltas

    def abort(self, request_id: str) -> RequestDelta | None:
        """End a request now; None if it is unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return None
        if request_id in self._replica_of:
            i = self._replica_of[request_id]
            self.pool.send(i, ("abort", request_id))
            self._aborting.add((i, request_id))  # its updates still on the way are dropped
            self._release(request_id)
        else:
            del self._queue[request_id]
        request.finish_reason, request.finish_time = "abort", time.perf_counter()
        return RequestDelta(request_id, (), "", (), "abort")

    def pop(self, request_id: str) -> Request:
        return self.requests.pop(request_id)

    # -- routing (module docstring) -----------------------------------------------------------
    def _route(self) -> None:
        while self._queue and not self.pool.failed:
            most = self.replica_limits.max_batch_size  # slots; and unwritten messages (Sending)
            now = time.monotonic()  # quiet replicas only if all are (Stalls, module docstring)
            quiet = [self._busy(r) and now - self._heard[r] > QUIET_S
                     for r in range(self.pool.size)]
            free = [i for i in range(self.pool.size)
                    if self._live[i] < most and self.pool.backlog(i) <= most
                    and (all(quiet) or not quiet[i])]
            if not free:
                return
            i = min(free, key=lambda r: (self._live[r], self._tokens[r], r))
            request = self.requests[next(iter(self._queue))]
            if not self.pool.send(i, ("add", request.request_id, request.prompt_ids,
                                      request.params, request.prompt)):
                return  # it died: the next receive names it
            self._queue.popitem(last=False)
            if not self._busy(i):  # its silence while idle is no stall
                self._heard[i] = time.monotonic()
            self._replica_of[request.request_id] = i
            self._routed[request.request_id] = time.perf_counter()
            self._live[i] += 1
            self._tokens[i] += _remaining(request)
            self.served[i] += 1

    def _release(self, request_id: str) -> None:
        i = self._replica_of.pop(request_id)
        self._routed.pop(request_id, None)
        self._live[i] -= 1
        self._tokens[i] -= _remaining(self.requests[request_id])
        self.scheduler.running.pop(request_id, None)

    def _apply(self, i: int, updates: list[Update], admitted: list[tuple[str, float]],
               ) -> list[RequestDelta]:
        now = time.perf_counter()
        for request_id, waited in admitted:
            if self._replica_of.get(request_id) == i and (i, request_id) not in self._aborting:
                self.scheduler.running[request_id] = None
                routed = self._routed.pop(request_id)
                self.requests[request_id].admitted_time = routed + waited
        deltas = []
        for update in updates:
            delta = update.delta
            request = self.requests.get(delta.request_id)
            if request is None or request.finished or (i, delta.request_id) in self._aborting \
                    or self._replica_of.get(delta.request_id) != i:
                continue  # aborted meanwhile (its id may be a new request's already)
            self._tokens[i] -= len(delta.token_ids)
            request.output_ids.extend(delta.token_ids)
            request.token_times.extend([now] * len(delta.token_ids))
            request.text += delta.text
            if request.logprobs is not None:
                request.logprobs.extend(delta.logprobs)
            if delta.finished:
                self._finish(request, delta.finish_reason, update.outcome, now)
            deltas.append(delta)
        return deltas

    def _finish(self, request: Request, reason: str, outcome, now: float) -> None:
        self._release(request.request_id)
        request.finish_reason, request.finish_time = reason, now
        if outcome is None:
            return
        request.text, request.output_ids = outcome.text, list(outcome.output_ids)
        request.stop_reason, request.error = outcome.stop_reason, outcome.error
        if outcome.logprobs is not None:
            request.logprobs = list(outcome.logprobs)
        if outcome.prompt_logprobs is not None:
            request.prompt_logprobs = list(outcome.prompt_logprobs)


def _close_outboxes(outboxes: list[_Outbox]) -> None:
    for outbox in outboxes:
        outbox.stop(close=True)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _remaining(request: Request) -> int:
    """Tokens the request still makes its replica process: prompt + new tokens not made yet."""
    return len(request.prompt_ids) + request.max_new_tokens - len(request.output_ids)
