"""Process groups of one worker pool, and the collectives a rank's forward calls over them.

Groups are made directly from torch.distributed's backend classes (``ProcessGroupGloo`` on the
CPU, ``ProcessGroupNCCL`` on CUDA) over the pool's store, not through ``init_process_group``:
that would bind the whole process to one world, and a driver may hold several pools (the tests
hold one of 2 ranks and one of 4). Every operation waits at most the pool's timeout; a failure
raises :class:`CollectiveError`.

Where gloo listens is the pool's choice (:class:`GlooBind`): 127.0.0.1 for ranks kiln spawned
(:data:`LOOPBACK`), an address other machines reach for ranks torchrun started
(:mod:`.torchrun`). On CUDA each rank uses the GPU the pool gives it (``gpu``: its rank when
spawned, torchrun's ``LOCAL_RANK`` otherwise).

Groups per pool: ``world`` (every rank: pipeline send/recv, the logits to the driver, the KV
cache block count) and, per mapping, the tensor-parallel group of this rank's stage (the world
itself when pp_size is 1, a world of one rank included; none when tp_size is 1 in a pipeline).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kiln.config import Mapping
from kiln.runtime.torch_backend.parallel import Collectives

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Tags of the point-to-point messages (gloo matches them; NCCL matches by order).
HIDDEN_TAG, LOGITS_TAG, CONTEXT_TAG = 1, 2, 3


POLL_S = 0.0002  # a gloo wait's poll: Ctrl-C and the pool's stop are seen between polls


class CollectiveError(RuntimeError):
    """A collective or point-to-point operation failed or timed out (a peer died or hangs)."""


@contextmanager
def collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, CollectiveError):
            raise
        raise CollectiveError(f"{what} failed: {str(e).splitlines()[0]}") from e


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


@dataclass(frozen=True)
class GlooBind:
    """Where a rank's gloo sockets listen: the network interfaces named (``interfaces``, as
    ``GLOO_SOCKET_IFNAME`` gives them), else the host name or address ``address``."""

    address: str = HOST
    interfaces: tuple[str, ...] = ()

    def devices(self) -> list:
        create = dist.ProcessGroupGloo.create_device
        if self.interfaces:
            return [create(interface=name) for name in self.interfaces]
        return [create(hostname=self.address)]


# Spawned ranks: loopback explicitly: the default device resolves the hostname, which fails on
# machines whose hostname has no address.
LOOPBACK = GlooBind()


def new_group(store: dist.Store, prefix: str, rank: int, size: int, backend: str,
              timeout: timedelta, bind: GlooBind = LOOPBACK):
    """A process group of ``size`` ranks (this one is ``rank`` in it) on its own store prefix;
    gloo's sockets listen where ``bind`` says."""
    store = dist.PrefixStore(prefix, store)
    with collective(f"connecting process group {prefix!r}"):
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._devices = bind.devices()
            options._timeout = timeout
            return dist.ProcessGroupGloo(store, rank, size, options)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)


class Groups:
    """The process groups of one rank of a pool (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, device: str,
                 timeout: timedelta, gpu: int | None = None, bind: GlooBind = LOOPBACK):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.backend, self.timeout, self.bind = backend_for(device), timeout, bind
        self.stopped = threading.Event()  # set by abort(): every wait of these groups fails
        self.device = torch.device(device, rank if gpu is None else gpu) if device == "cuda" \
            else torch.device("cpu")
        self.world = new_group(store, "world", rank, world_size, self.backend, timeout, bind)
        self._tp: dict[tuple[int, int], object] = {}

    def tp_group(self, mapping: Mapping):
        """This rank's tensor-parallel group under ``mapping`` (made once per mapping)."""
        if mapping.pp_size == 1:
            return self.world  # a world of one too (its tp 1 forward calls no tp collective)
        if mapping.tp_size == 1:
            return None
        tp_rank, stage = mapping.coords(self.rank)
        key = (mapping.tp_size, stage)
        if key not in self._tp:
            self._tp[key] = new_group(self.store, f"tp{mapping.tp_size}.stage{stage}", tp_rank,
                                      mapping.tp_size, self.backend, self.timeout, self.bind)
        return self._tp[key]

    def collectives(self, mapping: Mapping) -> DistCollectives:
        return DistCollectives(self, mapping)

    def wait(self, work: dist.Work, poll: bool = True) -> None:
        """Wait for ``work`` (inside :func:`collective`). NCCL: as ``work.wait()`` (the host
        does not block). gloo: ``work.wait()`` blocks in C++ until the op completes or times
        out, where neither Ctrl-C (Python runs signal handlers between bytecodes) nor the
        pool's verdict on a frozen peer (a stopped process or a cut network closes no socket)
        can end it; so a collective's wait polls, and fails once :meth:`abort` was called.
        Point-to-point works (``poll=False``) cannot poll: gloo marks them complete only in
        ``wait()``, and a ``wait`` with a timeout closes the connection to the peer."""
        if poll and self.backend == "gloo":
            while not work.is_completed():
                if self.stopped.is_set():
                    raise CollectiveError("the engine's ranks were stopped")
                time.sleep(POLL_S)
        work.wait()  # raises the op's own error

    def abort(self, peers_may_hang: bool = False) -> None:
        """Make pending operations fail now: NCCL aborts its communicators; gloo collectives'
        waits poll :attr:`stopped` (:meth:`wait`). ``peers_may_hang``: a peer may be frozen
        where no one can kill it (a stopped process or a lost node, for ranks that torchrun
        started). A gloo operation already posted to such a peer runs on in gloo's thread until
        the timeout, and the group's destructor waits for that thread (gloo's ``abort`` and
        ``shutdown`` do not end it); so these gloo groups are never destroyed
        (:func:`keep_alive`), and the driver ends at once, not a collective timeout later.
        Peers that the pool kills close their sockets, which ends such an operation."""
        self.stopped.set()
        groups = {id(g): g for g in [self.world, *self._tp.values()]}.values()
        if self.backend != "nccl":
            if peers_may_hang:
                for group in groups:
                    keep_alive(group)
            return
        for group in groups:
            try:
                group.abort()
            except RuntimeError as e:  # already aborted or torn down
                logger.debug("abort: %s", e)


def keep_alive(obj: object) -> None:
    """Hold a reference to ``obj`` that is never released, not even at interpreter exit (which
    clears module globals): its destructor never runs."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


class DistCollectives(Collectives):
    """:class:`~kiln.runtime.torch_backend.parallel.Collectives` over a pool's groups."""

    def __init__(self, groups: Groups, mapping: Mapping):
        self.groups, self.mapping = groups, mapping
        self.tp = groups.tp_group(mapping)
        tp_rank, stage = mapping.coords(groups.rank)
        self.next_rank = mapping.rank(tp_rank, stage + 1) if stage + 1 < mapping.pp_size else None
        self.prev_rank = mapping.rank(tp_rank, stage - 1) if stage > 0 else None
        self._sending: list[tuple[dist.Work, torch.Tensor]] = []  # (handle, tensor) in flight

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        with collective("tensor-parallel all-reduce"):
            self.groups.wait(self.tp.allreduce([x]))
        return x

    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.mapping.tp_size)]
        with collective("vocab all-gather"):
            self.groups.wait(self.tp.allgather([parts], [x]))
        return torch.cat(parts, dim=1)

    def send_hidden(self, x: torch.Tensor) -> None:
        """Posts the send (a gloo send completes only once the peer posts its receive, so
        waiting here would hold this stage until the next one finished its micro-batch); the
        handle and the tensor stay in ``_sending`` until :meth:`wait_sent`. Sends of one tag
        to one peer arrive in order."""
        x = x.contiguous()
        with collective(f"sending hidden states to rank {self.next_rank}"):
            self._sending.append((self.groups.world.send([x], self.next_rank, HIDDEN_TAG), x))

    def wait_sent(self) -> None:
        sending, self._sending = self._sending, []
        with collective(f"sending hidden states to rank {self.next_rank}"):
            for work, _ in sending:
                self.groups.wait(work, poll=False)

    def recv_hidden(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(rows, like.shape[-1], dtype=like.dtype, device=like.device)
        return recv(self.groups, buf, self.prev_rank, HIDDEN_TAG, "receiving hidden states")

    def min_over_world(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.groups.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        with collective("KV-cache size all-reduce"):
            self.groups.wait(self.groups.world.allreduce([t], options))
        return int(t.item())


def broadcast(groups: Groups, x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` of rank 0 (the driver) into ``x`` of every rank of ``groups``' world, in place.
    NCCL: queued on the stream, the host does not wait; gloo: waited for as a collective."""
    if groups.world_size == 1:
        return x
    options = dist.BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    with collective(what):
        groups.wait(groups.world.broadcast([x], options))
    return x


def send(groups: Groups, x: torch.Tensor, dst: int, tag: int, what: str) -> None:
    """Send ``x`` to rank ``dst`` of ``groups``' world, and wait for it."""
    with collective(f"{what} to rank {dst}"):
        groups.wait(groups.world.send([x.contiguous()], dst, tag), poll=False)


def recv(groups: Groups, buf: torch.Tensor, src: int, tag: int, what: str) -> torch.Tensor:
    """Receive into ``buf`` from rank ``src`` of ``groups``' world."""
    with collective(f"{what} from rank {src}"):
        groups.wait(groups.world.recv([buf], src, tag), poll=False)
    return buf
