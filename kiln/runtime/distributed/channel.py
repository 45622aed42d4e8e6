"""The control channel between the driver (rank 0) and ranks that torchrun started, over the
torch.distributed store every rank joined: pipes do not cross machines.

Keys, under the store's prefix (one world per prefix)::

    cmd/<r>    queue: the driver's commands to worker r, in order (each pickled once by the
               driver and pushed to every worker's queue)
    up         queue: the workers' replies and error reports, ``(rank, message)``, each
               rank's in the order it sent them
    beat/<r>   counter: rank r's heartbeats (one added every :data:`HEARTBEAT_S`)
    steps/<r>  counter: the steps rank r finished
    hello      what the driver tells every worker before anything else
    abort      the driver's verdict once it stopped the engine: workers exit on it

Queues are consumed as they are read and counters change in place, so the store does not grow
per step or per heartbeat; :meth:`StoreChannel.clear` deletes what is left when the engine
closes.

Liveness is told by counters, never by clocks: a reader notes when each counter it watches last
moved, on its own monotonic clock (:class:`Pulse`), so the clocks of two machines are never
compared. A rank whose counter has not moved for :data:`LOST_AFTER_S` is lost.

A store client serves one operation at a time, and :meth:`StoreChannel.command` blocks until
the driver sends one: every thread that uses the channel has one of its own
(:meth:`StoreChannel.clone`, a new connection to the same store).

Messages are pickled: the store is as trusted as torchrun's own (its agents pickle into it too),
reachable by the machines of the launch only.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

HEARTBEAT_S = 0.25  # every rank adds one to its counter this often
LOST_AFTER_S = 3.0  # a counter that has not moved for this long: its rank is lost


class StoreChannel:
    """Rank ``rank``'s end of the channel on ``store`` (a store every rank of the world reaches
    under the same prefix). See the module docstring for the keys."""

    def __init__(self, store: dist.Store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size

    def clone(self, timeout: timedelta) -> StoreChannel:
        """The same end over a new connection whose operations wait at most ``timeout``."""
        store = self.store.clone()
        store.set_timeout(timeout)
        return StoreChannel(store, self.rank, self.world_size)

    # -- the driver ---------------------------------------------------------------------------
    def post(self, payload: bytes) -> None:
        """Queue a pickled command for every worker."""
        for rank in range(1, self.world_size):
            self.store.queue_push(f"cmd/{rank}", payload)

    def replies(self) -> list[tuple[int, tuple]]:
        """The workers' messages queued since the last call, in order: (rank, message)."""
        return [pickle.loads(self.store.queue_pop("up"))
                for _ in range(self.store.queue_len("up"))]

    def say_hello(self, hello: dict[str, Any]) -> None:
        self.store.set("hello", pickle.dumps(hello))

    def abort(self, verdict: str) -> None:
        """Tell every worker to exit, with the driver's one-line verdict."""
        self.store.set("abort", verdict.encode())

    def clear(self) -> None:
        """Delete every key of this world but ``abort`` (the engine closed: nothing is read
        any more)."""
        names = ["hello", "up", *(f"{kind}/{rank}" for rank in range(self.world_size)
                                  for kind in ("cmd", "beat", "steps"))]
        for name in names:
            self.store.delete_key(name)

    # -- a worker -----------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        """The driver's hello (waits for it, up to the store's timeout)."""
        return pickle.loads(self.store.get("hello"))

    def command(self) -> tuple:
        """The driver's next command to this worker (waits for it, up to the store's timeout)."""
        return pickle.loads(self.store.queue_pop(f"cmd/{self.rank}"))

    def reply(self, message: tuple) -> None:
        self.store.queue_push("up", pickle.dumps((self.rank, message)))

    def aborted(self) -> str | None:
        """The driver's verdict if it stopped the engine, else None."""
        return self.store.get("abort").decode() if self.store.check(["abort"]) else None

    # -- liveness -----------------------------------------------------------------------------
    def beat(self, steps: int = 0) -> None:
        """One heartbeat of this rank, and ``steps`` more steps finished since the last."""
        self.store.add(f"beat/{self.rank}", 1)
        if steps:
            self.store.add(f"steps/{self.rank}", steps)

    def beats(self, rank: int) -> int:
        """Rank ``rank``'s heartbeat counter (0 before its first)."""
        return self.store.add(f"beat/{rank}", 0)

    def steps(self, rank: int) -> int:
        return self.store.add(f"steps/{rank}", 0)


class Pulse:
    """When each watched counter last moved, on this process's clock (see the module
    docstring). A counter still 0 has not started: its rank has not joined yet."""

    def __init__(self, ranks: Iterable[int], clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        now = clock()
        self._seen = {rank: (0, now) for rank in ranks}

    def see(self, rank: int, value: int) -> None:
        if value != self._seen[rank][0]:
            self._seen[rank] = (value, self.clock())

    def started(self, rank: int) -> bool:
        return self._seen[rank][0] != 0

    def silent_for(self, rank: int) -> float:
        """Seconds since rank ``rank``'s counter last moved (or since watching began)."""
        return self.clock() - self._seen[rank][1]
