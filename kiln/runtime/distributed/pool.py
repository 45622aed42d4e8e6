"""Pools of worker processes: ranks 1..N-1 of one world, this process being rank 0.

:class:`RankPool` is what the driver's executors use (:mod:`.driver`): commands, replies,
faults and their verdict, shutdown. Its ranks are either spawned by kiln on this machine
(:class:`WorkerPool`, here) or started by torchrun on this machine or others
(:class:`~.torchrun.TorchrunPool`, over a control channel in torchrun's store).
:func:`start_ranks` chooses (:func:`kiln.runtime.launch.torchrun_env`); on a torchrun rank
other than 0 it serves the driver as a worker instead (:func:`~.torchrun.serve_driver`) and,
once the driver closed the engine, raises ``SystemExit(0)``: the process ends with status 0
without doing the command's (or the script's) own work, which is the driver's.

A world of one rank (N = 1) has no worker: the driver alone, with its process groups of one
rank (gloo, or NCCL on a single GPU). The loader never makes one (it opens a single-rank engine
on a plain :class:`~kiln.runtime.torch_backend.executor.TorchExecutor`);
:meth:`~kiln.runtime.distributed.executor.DistributedExecutor.open` over a single-rank engine
does, which is how a machine with one GPU runs the multi-rank driver's NCCL path
(tests/gpu/test_distributed_gpu.py; its gloo twin in tests/runtime/test_distributed.py).

Contract (both pools):
- A pool starts its workers, waits for each to say ``up``, and connects the world's process
  groups (:mod:`.comm`).
- A monitor thread watches the workers. The first report (a worker died, or sent its error)
  starts a settle window (:attr:`RankPool.settle_s`) in which the other ranks' reports arrive
  (a killed rank's peers see their collectives fail a moment later); then the pool is failed
  for good: every worker is stopped, pending NCCL operations are aborted, and
  :meth:`RankPool.error` names the cause in one line, preferring a rank that died or failed on
  its own over one its launcher stopped (torchrun's agent stops a node's other ranks when one
  fails), and those over ranks whose collectives failed because of it. When no rank died (a
  collective timed out), the ranks that neither finished the last step sent (each worker
  counts its finished steps) nor reported are named as the ones that hung.
- ``on_fail``: callables the failing pool calls after stopping its workers (from any thread),
  for communicators its groups do not own: a tensorrt engine's (:mod:`.tensorrt_ranks`), so
  that a step waiting in one of its collectives fails instead of waiting forever.
- Commands go out with :meth:`RankPool.send_all` (pickled once); :meth:`RankPool.expect` waits
  for one reply of a kind from every worker, raising :class:`~kiln.runtime.errors.WorkerError`
  as soon as the pool has failed. A caller whose own collective failed calls
  :meth:`RankPool.fault`.
- :meth:`RankPool.shutdown` asks the workers to exit (or stops them at once: ``kill=True``,
  after an interrupted step, when a worker may sit in a collective that will never complete).
  The monitor thread holds the pool, so a pool is never collected while it runs: an engine that
  owns one ties the workers to itself with :func:`stop_with` (an engine dropped without
  ``close()`` stops them when it is collected).

:class:`WorkerPool` (spawned): ``multiprocessing`` spawn context, daemon processes, a duplex
pipe each (commands down, replies and error reports up), a TCP store on 127.0.0.1; its monitor
waits on every pipe and process sentinel (settle window :data:`SETTLE_S`), a failed pool kills
its workers, and :meth:`WorkerPool.shutdown` waits for them: no process outlives the pool.
Workers also exit by themselves when this process dies (:mod:`.worker`).

Non-goals: restarting a failed rank.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch.distributed as dist

from kiln.config import Mapping
from kiln.errors import Wording, wording
from kiln.runtime.distributed.comm import HOST, LOOPBACK, CollectiveError, GlooBind, Groups
from kiln.runtime.distributed.process import exit_cause, spawn_args, spawned, start
from kiln.runtime.errors import WorkerError
from kiln.runtime.launch import check_launch, torchrun_env
from kiln.runtime.torch_backend.parallel import rank_label

logger = logging.getLogger(__name__)

SETTLE_S = 0.5  # after a first report, how long the other ranks' reports may take to arrive
STOP_WAIT_S = 5.0  # a graceful shutdown's wait for the workers to exit before killing them
# Report kinds: a rank's own death or error; a rank its launcher stopped (torchrun's agent,
# when another rank of its node failed, or when it was stopped itself); a collective that
# failed (a consequence). The verdict names the first kind reported, in this order.
DIED, FAULT, STOPPED, COLLECTIVE = "died", "fault", "stopped", "collective"


def stop_with(owner: object, pool: RankPool) -> weakref.finalize:
    """Kill ``pool``'s workers when ``owner`` (the engine that owns it) is garbage collected
    unclosed; ``detach()`` the finalizer once the owner shuts the pool down itself. Not at
    interpreter exit: multiprocessing ends daemon workers then."""
    finalizer = weakref.finalize(owner, pool.shutdown, True)
    finalizer.atexit = False
    return finalizer


def start_ranks(mapping: Mapping, backend: str, device: str, timeout_s: float,
                num_threads: int | None) -> RankPool:
    """The pool of ranks 1..N-1 of an engine of ``mapping`` for this process, the driver; on
    a torchrun rank other than 0, serve the driver, then ``SystemExit(0)`` (see the module
    docstring). ``device``: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL)."""
    env = torchrun_env()
    if env is None:
        return WorkerPool(mapping.world_size, device, timeout_s, num_threads, mapping)
    from kiln.runtime.distributed.torchrun import TorchrunPool, serve_driver

    check_launch(mapping, backend, True, 1)  # the loader's check, for callers past it
    if env.rank != 0:
        logger.info("torchrun rank %d of %d: a worker of the driver (rank 0)", env.rank,
                    env.world_size)
        serve_driver(env, timeout_s, num_threads, mapping)
        raise SystemExit(0)
    logger.info("torchrun rank 0 of %d: the driver of torchrun's other ranks", env.world_size)
    return TorchrunPool(env, device, timeout_s, mapping, num_threads)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to join the pool (pickled to it)."""

    rank: int
    world_size: int
    port: int
    device: str  # "cpu" or "cuda"
    parent_pid: int
    timeout_s: float
    num_threads: int
    log_level: int
    wording: Wording = Wording()  # of its messages: its driver's (kiln.errors.wording)


@dataclass(frozen=True)
class Report:
    rank: int
    kind: str  # DIED, FAULT or COLLECTIVE
    text: str


class RankPool(ABC):
    """Ranks 1..world_size-1 as workers of this process, rank 0 (see the module docstring).
    Subclasses start the workers (:meth:`_start`), carry the commands (:meth:`_send`), watch
    the workers (:meth:`_watch`, the monitor thread), stop them (:meth:`_stop_workers`,
    :meth:`shutdown`) and count their finished steps (:meth:`_progress`)."""

    settle_s = SETTLE_S  # after a first report, how long the other ranks' reports may take
    # whether stopping the workers ends their processes (spawned ones), closing their sockets;
    # not torchrun's ranks on other machines: a frozen one stays, and so may its connections
    kills_workers = True

    def __init__(self, world_size: int, device: str, timeout_s: float, mapping: Mapping | None):
        if world_size < 1:
            raise ValueError(f"a worker pool needs a world of 1 or more ranks, got {world_size}")
        self.world_size, self.device = world_size, device
        self.timeout_s = timeout_s
        # rank labels: the engine's (a rank that dies at startup is named by it); a pool made
        # for several engines (the tests') gets each one's as it opens
        self.mapping = mapping or Mapping(tp_size=world_size)
        self.groups: Groups | None = None
        self.store: dist.Store | None = None  # the store the groups were made over
        self._reports: dict[int, Report] = {}
        self._lock = threading.Lock()
        self._failed = threading.Event()
        self._replies: queue.Queue = queue.Queue()
        self._closing = False
        self._killing = False  # deaths from here on are the pool's own kills
        self.steps_sent = 0
        self.on_fail: list[Callable[[], None]] = []  # called when the pool fails, any thread

    def _connect(self, gpu: int | None = None, bind: GlooBind = LOOPBACK) -> None:
        """Start the workers and the monitor, wait for every ``up``, connect the groups over
        :attr:`store`; any failure stops the workers and raises (a WorkerError naming the rank
        when one died)."""
        try:
            self._start()
            self._monitor = threading.Thread(target=self._watch, name="kiln-worker-monitor",
                                             daemon=True)
            self._monitor.start()
            self.expect("up")
            self.groups = Groups(self.store, 0, self.world_size, self.device,
                                 timedelta(seconds=self.timeout_s), gpu=gpu, bind=bind)
        except CollectiveError as e:  # a worker died while the groups connected
            error = self.fault(e)
            self.shutdown(kill=True)
            raise error from None
        except BaseException:
            self.shutdown(kill=True)
            raise

    def label(self, rank: int) -> str:
        return rank_label(self.mapping, rank)

    # -- commands ---------------------------------------------------------------------------
    def send_all(self, message: tuple) -> None:
        """Send ``message`` to every worker (pickled once); a ``step`` is counted."""
        self.check()
        payload = bytes(ForkingPickler.dumps(message))
        if message[0] == "step":
            self.steps_sent += 1
        self._send(payload)

    def expect(self, kind: str) -> dict[int, Any]:
        """One reply of ``kind`` from every worker: rank -> its payload."""
        got: dict[int, Any] = {}
        while len(got) < self.world_size - 1:
            self.check()
            try:
                rank, message = self._replies.get(timeout=0.1)
            except queue.Empty:
                continue
            if message[0] != kind:
                raise RuntimeError(f"{self.label(rank)} replied {message[0]!r}, expected {kind!r}")
            got[rank] = message[1:]
        return got

    # -- failures ---------------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        return self._failed.is_set()

    def check(self) -> None:
        """Raise the pool's WorkerError if it has failed."""
        if self._failed.is_set():
            raise self.error()

    def fault(self, cause: BaseException) -> WorkerError:
        """The error to raise after this process's own collective (or pipe) failed: the
        monitor's verdict when a worker reported within the settle window, else this rank's
        failure (all workers alive: a rank hangs), which fails the pool."""
        self._report(Report(0, COLLECTIVE, str(cause).splitlines()[0]))
        if not self._failed.wait(self.settle_s + 1.0):
            self._fail()
        return self.error()

    def error(self) -> WorkerError:
        """One line naming the rank and the cause (see the module docstring)."""
        with self._lock:
            reports = sorted(self._reports.values(), key=lambda r: r.rank)
        own = [r for r in reports if r.kind in (DIED, FAULT)] or \
            [r for r in reports if r.kind == STOPPED]
        if own:
            r = own[0]
            return WorkerError(f"{self.label(r.rank)} {r.text}; the engine's other ranks were "
                               f"stopped")
        silent = [rank for rank in range(1, self.world_size) if rank not in self._reports
                  and self._progress(rank) < self.steps_sent]
        if silent:
            names = ", ".join(self.label(rank) for rank in silent)
            return WorkerError(f"{names} did not answer within the collective timeout of "
                               f"{self.timeout_s:g} s (alive but stuck or stopped); the engine's "
                               f"ranks were stopped")
        r = reports[0] if reports else Report(0, COLLECTIVE, "unknown")
        return WorkerError(f"{self.label(r.rank)}: {r.text}; the engine's ranks were stopped")

    def _take(self, rank: int, message: tuple) -> None:
        """A worker's message: its error report (``("error", kind, text)``), or a reply for
        :meth:`expect`."""
        if message[0] == "error":
            self._report(Report(rank, message[1], message[2]))
        else:
            self._replies.put((rank, message))

    def _report(self, report: Report) -> None:
        with self._lock:  # a rank's first report stands (an error it sent, then its exit)
            self._reports.setdefault(report.rank, report)
        logger.debug("%s: %s %s", self.label(report.rank), report.kind, report.text)

    def _fail(self) -> None:
        """Stop every worker, abort pending NCCL operations, mark the pool failed."""
        self._killing = True
        self._stop_workers()
        if self.groups is not None:
            self.groups.abort(peers_may_hang=not self.kills_workers)
        for abort in self.on_fail:  # communicators the pool's groups do not own (tensorrt)
            try:
                abort()
            except Exception as e:  # noqa: BLE001 - the pool fails anyway; say why below
                logger.debug("aborting a communicator: %s", e)
        self._failed.set()

    # -- what each pool does its own way ------------------------------------------------------
    @abstractmethod
    def _start(self) -> None:
        """Start the workers; set :attr:`store`."""

    @abstractmethod
    def _send(self, payload: bytes) -> None:
        """Deliver a pickled command to every worker; raise :meth:`fault`'s error if one
        cannot take it."""

    @abstractmethod
    def _watch(self) -> None:
        """The monitor thread: queue replies, report what befalls the workers, and
        :meth:`_fail` the pool :attr:`settle_s` after the first report."""

    @abstractmethod
    def _stop_workers(self) -> None:
        """Make every worker end now (the pool failed)."""

    @abstractmethod
    def _progress(self, rank: int) -> int:
        """Steps rank ``rank`` finished."""

    @abstractmethod
    def shutdown(self, kill: bool = False) -> None:
        """Stop every worker (asked to exit; at once with ``kill``) and the monitor;
        idempotent."""


class WorkerPool(RankPool):
    """Ranks 1..world_size-1 as worker processes spawned here, none for a world of 1 (see the
    module docstring)."""

    def __init__(self, world_size: int, device: str = "cpu", timeout_s: float = 120.0,
                 num_threads: int | None = None, mapping: Mapping | None = None):
        super().__init__(world_size, device, timeout_s, mapping)
        self.processes: dict[int, multiprocessing.Process] = {}
        self.conns: dict[int, Connection] = {}
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self.store = dist.TCPStore(HOST, 0, world_size, True,
                                   timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        self._threads = num_threads or max(1, len(os.sched_getaffinity(0)) // world_size)
        self._context = multiprocessing.get_context("spawn")
        self.progress = self._context.Array("q", world_size, lock=False)  # steps finished
        self._connect()
        if world_size == 1:
            logger.info("a world of one rank: no worker process, %s", self.groups.backend)
        else:
            logger.info("worker processes up: ranks 1 to %d, %s", world_size - 1,
                        self.groups.backend)

    def _start(self) -> None:
        level = logging.getLogger().getEffectiveLevel()
        for rank in range(1, self.world_size):
            spec = WorkerSpec(rank, self.world_size, self.store.port, self.device, os.getpid(),
                              self.timeout_s, self._threads, level, wording())
            ours, theirs = self._context.Pipe()
            process = self._context.Process(target=spawned, args=spawn_args(
                "kiln.runtime.distributed.worker:main", spec, theirs, self.progress),
                daemon=True, name=f"kiln-rank{rank}")
            start(process)  # SIGINT blocked until the child ignores it (.process)
            theirs.close()
            self.processes[rank], self.conns[rank] = process, ours

    def _send(self, payload: bytes) -> None:
        try:
            for conn in self.conns.values():
                conn.send_bytes(payload)
        except OSError as e:  # a worker's end is closed: it died
            raise self.fault(e) from None

    def _progress(self, rank: int) -> int:
        return self.progress[rank]

    def _stop_workers(self) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.kill()
        for process in self.processes.values():
            process.join(STOP_WAIT_S)

    # -- the monitor thread -----------------------------------------------------------------
    def _watch(self) -> None:
        conns = {conn: rank for rank, conn in self.conns.items()}
        sentinels = {p.sentinel: rank for rank, p in self.processes.items()}
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            for ready in wait([self._wake_r, *conns, *sentinels], timeout):
                if ready is self._wake_r:
                    return
                if ready in conns:
                    self._read(conns, ready)
                else:
                    rank = sentinels.pop(ready)
                    conn = self.conns[rank]
                    while conn in conns and conn.poll():  # its last words come first
                        self._read(conns, conn)
                    if not (self._closing or self._killing):
                        process = self.processes[rank]
                        process.join(1.0)  # its pipes close a moment before it can be reaped
                        self._report(Report(rank, DIED, exit_cause(process.exitcode)))
            if self._closing:
                return
            if deadline is None and self._reports:
                deadline = time.monotonic() + self.settle_s
        self._fail()

    def _read(self, conns: dict[Connection, int], conn: Connection) -> None:
        rank = conns[conn]
        try:
            message = conn.recv()
        except (EOFError, OSError):
            del conns[conn]  # closed: the sentinel says how it ended
            return
        self._take(rank, message)

    # -- shutdown ---------------------------------------------------------------------------
    def shutdown(self, kill: bool = False) -> None:
        """Stop every worker (asked to exit, killed after :data:`STOP_WAIT_S`; at once with
        ``kill``) and the monitor; idempotent."""
        if self._closing:
            return
        self._closing = True
        if not kill and not self._failed.is_set():
            for conn in self.conns.values():
                try:
                    conn.send(("exit",))
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_WAIT_S
            for process in self.processes.values():
                process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes.values():
            if process.is_alive():
                process.kill()
            process.join()
        self._wake_w.send(None)
        monitor = getattr(self, "_monitor", None)
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(STOP_WAIT_S)
        for conn in self.conns.values():
            conn.close()
        self.groups = None
