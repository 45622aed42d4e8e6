"""Ranks that torchrun started, on this machine or several: the driver's pool over them
(:class:`TorchrunPool`) and a worker rank's life (:func:`serve_driver`).

Every rank joins torchrun's store (``torch.distributed.rendezvous("env://")``: the store of
torchrun's agent on the first node, at ``MASTER_ADDR:MASTER_PORT``), under the prefix
:data:`PREFIX`, and the process groups connect over it as a spawned pool's do over its own.
Commands, replies, error reports and heartbeats go through the store (:mod:`.channel`): pipes
do not cross machines. Gloo listens on the address of the interfaces named by
``GLOO_SOCKET_IFNAME`` when set, else on this node's address on the route to ``MASTER_ADDR``
(the address the other nodes reach it by, never 127.0.0.1 unless ``MASTER_ADDR`` is this
machine's loopback); NCCL finds its own (``NCCL_SOCKET_IFNAME``). On CUDA, rank r uses GPU
``LOCAL_RANK``.

The driver (rank 0, :class:`TorchrunPool`): publishes the hello (device, timeout), waits for
every worker's ``up``, connects the groups. Its monitor thread beats the driver's heartbeat,
queues the workers' replies, and reports a worker whose heartbeat counter has not moved for
:data:`~.channel.LOST_AFTER_S` (killed, out of memory, stopped, its node or the network gone:
no process sentinel reaches across machines, and no exit code either) or that has not joined
within the pool's timeout. The settle window covers a heartbeat's loss (:attr:`settle_s`; it
ends early once every worker is accounted for), so the verdict names the rank that died, not
its peers whose collectives failed a moment later. A failed pool cannot kill processes on other
machines: it sets the store's ``abort`` key with its verdict, and every worker's watch thread
ends its process within a heartbeat. ``shutdown`` sends ``exit`` and waits for every worker's
``bye`` (then deletes the channel's keys), or aborts when killing or when a worker does not
answer within :data:`STOP_WAIT_S`.

A worker (any other rank, :func:`serve_driver`): joins, reads the hello, starts its watch
thread, replies ``up``, connects the groups and serves the driver's commands
(:class:`~.worker.Worker`) until ``exit``; then it stops its watch, replies ``bye`` and returns
(its caller ends the process with status 0). The watch thread beats its heartbeat (with the
steps it finished) and ends the process, with one logged line:

- when the driver sets ``abort``: status 1, but 0 on the driver's node, where torchrun's agent
  answers a rank's failure by stopping every rank of the node, the driver too, which would
  then end before it said why;
- when the driver's heartbeat has not moved for ``LOST_AFTER_S``, or the store is gone
  (torchrun's first node ended): status 1;
- on SIGINT or SIGTERM (torchrun's agent stops its node's ranks with them, when one failed or
  when it was stopped itself): it tells the driver first (a ``stopped`` report, which the
  verdict names only when no rank died or failed on its own), then status 128 + the signal.
  The signals reach the watch through a wakeup pipe (:func:`catch_stops`): the main thread may
  wait in the store or a collective, where no Python handler runs.

A failure of the worker itself (an exception, or a collective that failed) is reported to the
driver and the worker waits for the verdict: ending at once would make its agent stop its
node's other ranks, and they would be reported as stopped too.

One engine per launch: the workers leave when the driver closes its engine, so a driver that
opens a second multi-rank engine in the same process is refused.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from kiln.config import Mapping
from kiln.engine import EngineError
from kiln.runtime.distributed.channel import HEARTBEAT_S, LOST_AFTER_S, Pulse, StoreChannel
from kiln.runtime.distributed.comm import CollectiveError, GlooBind, Groups
from kiln.runtime.distributed.pool import DIED, FAULT, STOP_WAIT_S, STOPPED, RankPool, Report
from kiln.runtime.distributed.worker import Worker, report
from kiln.runtime.errors import WorkerError
from kiln.runtime.launch import TorchrunEnv
from kiln.runtime.torch_backend.parallel import rank_label

logger = logging.getLogger(__name__)

PREFIX = "kiln"  # the keys of kiln's channel and groups in torchrun's store
POLL_S = 0.05  # how often the driver's monitor reads the workers' replies
IDLE = timedelta(days=365)  # a worker waits this long for a command (its watch ends it first)
FAILED_EXIT = 1  # a worker's exit status when it failed, or the engine did
_opened = threading.Event()  # a TorchrunPool was made in this process (one per launch)


def join(env: TorchrunEnv, timeout_s: float) -> dist.PrefixStore:
    """This rank's client of torchrun's store, under :data:`PREFIX`."""
    missing = [m for m in ("queue_push", "queue_pop", "queue_len", "clone")
               if not hasattr(dist.Store, m)]
    if missing:
        raise EngineError(f"ranks under torchrun talk through the store's queues, and torch "
                          f"{torch.__version__}'s Store has no {', '.join(missing)}; upgrade "
                          f"torch, or run the engine's ranks on one machine without torchrun")
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size,
                                           timeout=timedelta(seconds=timeout_s)))
    except dist.DistError as e:
        if env.rank == 0:  # it hosts the store (no agent store): the others did not come
            raise EngineError(f"rank 0 waited {timeout_s:g} s at {env.master_addr}:"
                              f"{env.master_port} for the other {env.world_size - 1} ranks "
                              f"(WORLD_SIZE {env.world_size}) and not all came "
                              f"({str(e).splitlines()[0]}); start kiln on every node with "
                              f"torchrun, the same --nnodes and --master_addr") from None
        raise EngineError(f"rank {env.rank} could not reach torchrun's store at "
                          f"{env.master_addr}:{env.master_port} within {timeout_s:g} s: "
                          f"{str(e).splitlines()[0]}") from None
    return dist.PrefixStore(PREFIX, store)


def gloo_bind(env: TorchrunEnv, device: str) -> GlooBind:
    """Where this rank's gloo sockets listen (see the module docstring); on CUDA (NCCL) no
    gloo group is made: the default."""
    if device != "cpu":
        return GlooBind()
    names = tuple(n for n in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n)
    if names:
        logger.info("gloo listens on interface(s) %s (GLOO_SOCKET_IFNAME)", ", ".join(names))
        return GlooBind(interfaces=names)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(env.master_addr, env.master_port,
                                                             type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:  # UDP: connect() sends nothing
            probe.connect(address)
            here = probe.getsockname()[0]
    except OSError as e:
        raise EngineError(f"no route from this node to MASTER_ADDR {env.master_addr} "
                          f"({e.strerror or e}); give torchrun --master_addr an address of the "
                          f"first node that this one reaches, or set GLOO_SOCKET_IFNAME") from None
    logger.info("gloo listens on %s (this node's address toward MASTER_ADDR %s)", here,
                env.master_addr)
    return GlooBind(address=here)


def threads(env: TorchrunEnv, num_threads: int | None) -> int:
    """CPU threads of each rank: ``num_threads``, else this node's cores shared by its ranks
    (torchrun itself sets ``OMP_NUM_THREADS=1`` for several ranks per node)."""
    return num_threads or max(1, len(os.sched_getaffinity(0)) // env.local_world_size)


class TorchrunPool(RankPool):
    """The driver's pool over torchrun's other ranks (see the module docstring)."""

    # a dead rank is known once its heartbeat is lost: up to LOST_AFTER_S after its death plus
    # a heartbeat on each side (its last beat, the monitor's reading); its peers' reports come
    # at once, so the window outlasts that, with a margin for a busy machine
    settle_s = LOST_AFTER_S + 4 * HEARTBEAT_S
    kills_workers = False  # it asks them to end (abort); a frozen one cannot

    def __init__(self, env: TorchrunEnv, device: str, timeout_s: float, mapping: Mapping,
                 num_threads: int | None = None):
        if _opened.is_set():
            raise EngineError("this process already opened a multi-rank engine under torchrun, "
                              "and torchrun's other ranks left when it closed (they serve one "
                              "engine per launch); open one engine per torchrun launch")
        _opened.set()
        super().__init__(env.world_size, device, timeout_s, mapping)
        self.env = env
        self._steps = [0] * env.world_size  # finished steps per rank, from the heartbeats
        self._stop = threading.Event()
        torch.set_num_threads(threads(env, num_threads))  # as every rank of the node
        if device == "cuda":
            torch.cuda.set_device(env.local_rank)
        self._connect(gpu=env.local_rank, bind=gloo_bind(env, device))
        logger.info("torchrun's %d ranks up, %s", self.world_size,
                    self.groups.backend)

    def _start(self) -> None:
        self.store = join(self.env, self.timeout_s)
        self.channel = StoreChannel(self.store, 0, self.world_size)
        self._watching = self.channel.clone(timedelta(seconds=LOST_AFTER_S))
        self.channel.say_hello({"device": self.device, "timeout_s": self.timeout_s})

    def _send(self, payload: bytes) -> None:
        try:
            self.channel.post(payload)
        except dist.DistError as e:  # the store is gone: torchrun's first node failed
            raise self.fault(e) from None

    def _progress(self, rank: int) -> int:
        return self._steps[rank]

    def _stop_workers(self) -> None:
        self._abort(str(self.error()))

    def _abort(self, verdict: str) -> None:
        try:
            self._watching.abort(verdict)
        except dist.DistError as e:  # the store is gone: so are the workers' channels
            logger.debug("abort: %s", e)

    # -- the monitor thread -----------------------------------------------------------------
    def _watch(self) -> None:
        pulse = Pulse(range(1, self.world_size))
        deadline, next_beat = None, 0.0
        while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                for rank, message in self._watching.replies():
                    self._take(rank, message)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_S
                    self._watching.beat()
                    self._judge(pulse)
            except dist.DistError as e:
                self._report(Report(0, FAULT, f"lost torchrun's store at "
                                              f"{self.env.master_addr}:{self.env.master_port}: "
                                              f"{str(e).splitlines()[0]}"))
            if deadline is None and self._reports:
                deadline = time.monotonic() + self.settle_s
            if self._reports and all(r in self._reports for r in range(1, self.world_size)):
                break  # every worker is accounted for: nothing more to wait for
            self._stop.wait(POLL_S)
        if not self._stop.is_set():
            self._fail()

    def _judge(self, pulse: Pulse) -> None:
        """Read every worker's counters; report the ranks lost or not joined in time."""
        for rank in range(1, self.world_size):
            pulse.see(rank, self._watching.beats(rank))
            self._steps[rank] = self._watching.steps(rank)
            if self._closing:
                continue  # leaving workers stop beating
            silent = pulse.silent_for(rank)
            if pulse.started(rank) and silent >= LOST_AFTER_S:
                self._report(Report(rank, DIED, f"stopped answering: no heartbeat for "
                                                f"{LOST_AFTER_S:g} s (killed, out of memory, "
                                                f"stopped, or its node or network failed)"))
            elif not pulse.started(rank) and silent >= self.timeout_s:
                self._report(Report(rank, DIED, f"did not join within {self.timeout_s:g} s "
                                                f"(not started, or it failed before it opened "
                                                f"the engine: see its node's output)"))

    # -- shutdown ---------------------------------------------------------------------------
    def shutdown(self, kill: bool = False) -> None:
        """Ask every worker to exit and wait for its ``bye`` (then delete the channel's keys);
        with ``kill``, or for workers that do not answer within :data:`STOP_WAIT_S`, set
        ``abort`` (see the module docstring). Idempotent."""
        if self._closing:
            return
        self._closing = True
        channel = getattr(self, "channel", None)
        clean = False
        if channel is not None and not self._failed.is_set():
            clean = not kill and self._say_goodbye() == set(range(1, self.world_size))
            if not clean:
                self._abort("the driver (rank 0) stopped the engine at once (interrupted, or it "
                            "failed)" if kill else "the driver (rank 0) closed the engine")
        self._stop.set()
        monitor = getattr(self, "_monitor", None)
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(STOP_WAIT_S)
        if clean:
            channel.clear()
        elif self.groups is not None:  # a worker may be frozen, with an operation posted to it
            self.groups.abort(peers_may_hang=True)
        self.groups = None

    def _say_goodbye(self) -> set[int]:
        """Send ``exit``; the workers that replied ``bye`` within :data:`STOP_WAIT_S`."""
        left: set[int] = set()
        try:
            self.channel.post(pickle.dumps(("exit",)))
        except dist.DistError as e:  # the store is gone: so are the workers
            logger.debug("exit: %s", e)
            return left
        deadline = time.monotonic() + STOP_WAIT_S
        while len(left) < self.world_size - 1 and time.monotonic() < deadline \
                and not self._failed.is_set():
            try:
                rank, message = self._replies.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if message[0] == "bye":
                left.add(rank)
        return left


class StoreEnd:
    """A torchrun worker's end of the channel (:mod:`.worker`): commands from a client of its
    own (a command may be long in coming), replies on ``channel``, steps counted for the
    watch thread to publish."""

    def __init__(self, channel: StoreChannel, watch: Watch):
        self.commands = channel.clone(IDLE)
        self.channel, self.watch = channel, watch

    def recv(self) -> tuple:
        return self.commands.command()

    def send(self, message: tuple) -> None:
        self.channel.reply(message)

    def stepped(self) -> None:
        self.watch.steps += 1


class Watch(threading.Thread):
    """A worker's heartbeat, its watch on the driver, and its end when stopped (see the
    module docstring). ``signals``: the read end of the wakeup pipe of SIGINT and SIGTERM
    (:func:`catch_stops`); ``abort_status``: the exit status when the driver aborts."""

    def __init__(self, channel: StoreChannel, label: str, where: str, signals: int | None,
                 abort_status: int):
        super().__init__(name="kiln-driver-watch", daemon=True)
        self.channel, self.label, self.where = channel, label, where
        self.signals, self.abort_status = signals, abort_status
        self.steps = 0  # finished steps (the worker's main thread counts them)
        self._halt = threading.Event()

    def start(self) -> None:
        self.channel.beat()  # before the worker says up: a rank that joined has beaten
        super().start()

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as e:  # noqa: BLE001 - a watch that ended would leave a hang
            end(f"{self.label}: its watch on the driver failed: {type(e).__name__}: {e}")

    def _watch(self) -> None:
        pulse, published = Pulse([0]), 0
        while not self._halt.wait(HEARTBEAT_S):
            self._stop_if_signalled()
            try:
                steps = self.steps
                self.channel.beat(steps - published)
                published = steps
                verdict = self.channel.aborted()
                pulse.see(0, self.channel.beats(0))
            except dist.DistError as e:
                end(f"{self.label}: lost torchrun's store at {self.where} (the driver's node "
                    f"ended?): {str(e).splitlines()[0]}")
            if self._halt.is_set():
                return  # the driver closed the engine meanwhile
            if verdict is not None:
                end(f"{self.label} stopped: {verdict}", self.abort_status)
            if pulse.silent_for(0) >= LOST_AFTER_S:
                end(f"{self.label} stopped: the driver (rank 0) stopped answering (no "
                    f"heartbeat for {LOST_AFTER_S:g} s)")

    def _stop_if_signalled(self) -> None:
        """SIGINT or SIGTERM came (torchrun's agent stops its node's ranks, when one of them
        failed or it was stopped itself): tell the driver, end with 128 + the signal."""
        try:
            received = os.read(self.signals, 64) if self.signals is not None else b""
        except BlockingIOError:
            return
        stops = [n for n in received if n in (signal.SIGINT, signal.SIGTERM)]
        if not stops:
            return
        name = signal.Signals(stops[0]).name
        try:
            self.channel.reply(("error", STOPPED, f"was stopped by {name} (torchrun stops a "
                                                  f"node's ranks when one fails, or when it "
                                                  f"is stopped)"))
        except dist.DistError:
            pass  # the driver's node is gone
        end(f"{self.label} stopped by {name}", 128 + stops[0])

    def halt(self) -> None:
        self._halt.set()
        self.join()


def end(line: str, status: int = FAILED_EXIT) -> None:
    """Log ``line`` (an error, but for status 0) and end this worker's process now with
    ``status`` (no teardown: a process group's destructor may wait on peers that are gone)."""
    logger.log(logging.INFO if status == 0 else logging.ERROR, "%s", line)
    logging.shutdown()
    os._exit(status)


@contextmanager
def catch_stops() -> Iterator[int | None]:
    """In the main thread: SIGINT and SIGTERM write their number to a pipe, whose read end
    (non-blocking) this yields, for the watch thread to act on (the main thread may wait in the
    store or a collective, where no Python signal handler would run); on leaving, they end the
    process again at once. Elsewhere (signals reach the main thread only): None."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: None)  # the watch thread acts on the byte
        signal.siginterrupt(number, False)  # no EINTR in the main thread's waits
    previous = signal.set_wakeup_fd(write)
    try:
        yield read
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)


def serve_driver(env: TorchrunEnv, timeout_s: float, num_threads: int | None,
                 mapping: Mapping) -> None:
    """This torchrun rank (not 0) as a worker of the driver's engine, until the driver closes
    it (see the module docstring); a failure is reported to the driver, whose verdict (or
    loss) ends the process."""
    label = rank_label(mapping, env.rank)
    channel = StoreChannel(join(env, timeout_s), env.rank, env.world_size)
    try:
        hello = channel.hello()
    except dist.DistError as e:
        raise WorkerError(f"{label}: the driver (rank 0) did not open the engine within "
                          f"{timeout_s:g} s: {str(e).splitlines()[0]}") from None
    # on the driver's node a failed rank makes torchrun stop every rank there, the driver too:
    # a rank the driver stops exits 0 there, so that the driver can say why first
    on_drivers_node = env.rank < env.local_world_size
    with catch_stops() as signals:
        watch = Watch(channel.clone(timedelta(seconds=LOST_AFTER_S)), label,
                      f"{env.master_addr}:{env.master_port}", signals,
                      0 if on_drivers_node else FAILED_EXIT)
        store_end = StoreEnd(channel, watch)
        try:
            watch.start()
            _serve(env, hello, num_threads, channel, store_end)
        except BaseException as e:  # reported; the driver's verdict ends the process (watch)
            text = report(store_end, e)
            if not isinstance(e, CollectiveError):  # its own failure, not a consequence
                logger.error("%s %s", label, text)
            if not watch.is_alive():
                end(f"{label} {text}")
            watch.join()
        watch.halt()
    channel.reply(("bye",))


def _serve(env: TorchrunEnv, hello: dict, num_threads: int | None, channel: StoreChannel,
           store_end: StoreEnd) -> None:
    torch.set_num_threads(threads(env, num_threads))
    device = hello["device"]
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    channel.reply(("up",))
    groups = Groups(channel.store, env.rank, env.world_size, device,
                    timedelta(seconds=hello["timeout_s"]), gpu=env.local_rank,
                    bind=gloo_bind(env, device))
    Worker(store_end, groups, env.rank, env.local_rank).serve()
