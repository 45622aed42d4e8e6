"""A worker process: one rank of a pool, running the torch executor on its shard (or the
tensorrt executor on its rank's engine files).

:class:`Worker` serves the driver's commands over an end of the pool's control channel: a pipe
for a spawned rank (:class:`PipeEnd`, here), torchrun's store for a rank torchrun started
(:mod:`.torchrun`). An end has ``recv()`` (the next command; None once the driver is gone),
``send(message)`` (a reply or an error report) and ``stepped()`` (one more step finished).

Life of a spawned worker (:class:`~kiln.runtime.distributed.pool.WorkerPool`):

1. ignore SIGINT (a terminal's Ctrl-C reaches every process of the group; the driver stops the
   ranks; SIGINT was blocked from the spawn on, so one that came while Python started and
   imported torch is dropped), start a thread that ends the process within
   :data:`~.process.PARENT_POLL_S` when the driver's pid is gone (killed outright: nothing
   else would stop a rank blocked in a collective);
2. reply ``up``, connect the world's process groups;
3. serve the driver's commands until ``exit`` or the pipe closes (the driver is gone):

   ``open``    read this rank's engine files, or make its random weights (no collective yet:
               ranks load at their own pace), connect its tensor-parallel group; reply
               ``loaded``
   ``build``   make the :class:`~kiln.runtime.torch_backend.executor.TorchExecutor` (its KV
               cache size is agreed over the world); reply ``ready``
   ``step``    replay the driver's ``reserve``/``release`` calls since the last step (each
               ``reserve`` must answer as the driver's did: the allocators are one), take the
               driver's broadcast of the previous step's sampled ids where the step feeds them
               (async scheduling), then run the step; the last stage's tensor-parallel rank 0
               sends the logits to the driver
   ``close``   drop the executor (the pool stays for another engine); reply ``closed``
   ``open_tensorrt``  a tensorrt engine's rank instead (:mod:`.tensorrt_ranks`): join its NCCL
               communicator, load its engine files; reply ``ready``

Any exception ends a spawned worker: it sends ``("error", kind, text)`` (kind ``collective``
when a collective failed, a consequence of another rank's failure; ``fault`` otherwise:
:func:`report`) and exits 1. (A torchrun rank reports the same way, then waits for the
driver's verdict: :mod:`.torchrun`.)
"""

from __future__ import annotations

import gc
import logging
import os
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist

from kiln.errors import worded
from kiln.runtime.core import freeze_loaded_objects
from kiln.runtime.distributed.comm import HOST, CollectiveError, Groups, broadcast
from kiln.runtime.distributed.driver import replay
from kiln.runtime.distributed.executor import send_logits
from kiln.runtime.executor import DeviceTokens, SequenceChunk
from kiln.runtime.torch_backend.parallel import RankShard
from kiln.runtime.torch_executor import build_executor, rank_weights

logger = logging.getLogger(__name__)


def main(spec, conn: Connection, progress) -> None:
    """Entry of the spawned process, detached from SIGINT and ending with its driver
    (:func:`~.process.spawned`; ``spec``: a :class:`~.pool.WorkerSpec`; ``progress``: the
    pool's shared step counters, this rank's incremented after each step)."""
    logging.basicConfig(level=spec.log_level,
                        format=f"%(levelname)s %(name)s [rank {spec.rank}]: %(message)s")
    code = 0
    end = PipeEnd(conn, progress, spec.rank)
    try:
        with worded(spec.wording):
            _serve(spec, end)
    except BaseException as e:  # every failure is reported, then the rank ends
        code = 1
        report(end, e)
    conn.close()
    os._exit(code)  # no interpreter teardown: process-group destructors may wait on peers


def report(end, error: BaseException) -> str:
    """Send the driver ``("error", kind, text)`` for ``error`` (see the module docstring), if
    it can still be reached; the text."""
    first = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, CollectiveError):
        kind, text = "collective", first
    else:
        kind, text = "fault", f"failed: {type(error).__name__}" + (f": {first}" if first else "")
    logger.debug("reporting: %s", text, exc_info=True)
    try:
        end.send(("error", kind, text))
    except (OSError, dist.DistError):
        pass  # the driver is gone
    return text


class PipeEnd:
    """A spawned worker's end: its pipe to the driver, and the pool's shared step counters."""

    def __init__(self, conn: Connection, progress, rank: int):
        self.conn, self.progress, self.rank = conn, progress, rank

    def recv(self) -> tuple | None:
        try:
            return self.conn.recv()
        except EOFError:
            return None  # the driver closed its end: it is gone

    def send(self, message: tuple) -> None:
        self.conn.send(message)

    def stepped(self) -> None:
        self.progress[self.rank] += 1


def _serve(spec, end: PipeEnd) -> None:
    torch.set_num_threads(spec.num_threads)
    if spec.device == "cuda":
        torch.cuda.set_device(spec.rank)
    end.send(("up",))
    groups = Groups(_store(spec), spec.rank, spec.world_size, spec.device,
                    timedelta(seconds=spec.timeout_s))
    Worker(end, groups, spec.rank).serve()


def _store(spec) -> dist.Store:
    return dist.TCPStore(HOST, spec.port, spec.world_size, False,
                         timeout=timedelta(seconds=spec.timeout_s))


class Worker:
    """One rank serving the driver's commands (see the module docstring) over ``end``; on
    CUDA on GPU ``gpu`` (default: its rank). Its process serves nothing else: once an engine
    is ready the objects alive are frozen (:func:`~kiln.runtime.core.freeze_loaded_objects`:
    a full collection on one rank would hold up every rank's collectives), and unfrozen when
    it closes (the pool may open another engine)."""

    def __init__(self, end, groups: Groups, rank: int, gpu: int | None = None):
        self.end, self.groups, self.rank = end, groups, rank
        self.gpu = rank if gpu is None else gpu
        self.executor = None
        self.pending = None  # (engine dir, manifest, device, options, shard, tensors)

    def serve(self) -> None:
        """Until ``exit`` (the engine is closed) or the driver is gone."""
        handlers = {"open": self.open, "build": self.build, "step": self.step,
                    "close": self.close, "open_tensorrt": self.open_tensorrt}
        while True:
            message = self.end.recv()
            if message is None:
                return
            if message[0] == "exit":
                self.close(reply=False)
                return
            handlers[message[0]](*message[1:])

    def open(self, engine_dir: str, manifest, device: str, options,
             random_seed: int | None = None) -> None:
        self.close(reply=False)
        where = torch.device(device, self.gpu) if device == "cuda" else torch.device(device)
        shard = RankShard(manifest.mapping, self.rank,
                          self.groups.collectives(manifest.mapping))
        tensors = rank_weights(Path(engine_dir), manifest, self.rank, where, random_seed)
        self.pending = (Path(engine_dir), manifest, where, options, shard, tensors)
        self.end.send(("loaded",))

    def build(self) -> None:
        engine_dir, manifest, device, options, shard, tensors = self.pending
        self.pending = None
        self.executor = build_executor(engine_dir, manifest, tensors, device, options, shard)
        self.delivers = shard.last_stage and shard.tp_rank == 0
        freeze_loaded_objects()
        self.end.send(("ready",))

    def open_tensorrt(self, engine_dir: str, manifest, key: str) -> None:
        """This rank of a tensor-parallel tensorrt engine: join the engine's NCCL communicator
        (collective with every rank, bootstrapped through the pool's store), load the rank's
        engine files; reply ``ready``. Every rank ends a step with the whole logits."""
        from kiln.runtime.distributed.nccl import communicator
        from kiln.runtime.tensorrt_executor import TensorRTExecutor, cuda_device, rank_engines

        self.close(reply=False)
        device = cuda_device(self.gpu)
        comm = communicator(self.groups.store, key, self.rank, self.groups.world_size)
        self.executor = TensorRTExecutor(rank_engines(Path(engine_dir), manifest, self.rank),
                                         manifest, self.rank, comm, device)
        self.delivers = False
        freeze_loaded_objects()
        self.end.send(("ready",))

    def step(self, ops: list[tuple], chunks: list[tuple],
             pending: tuple[int, dict[int, int]] | None = None) -> None:
        replay(self.executor, ops, self.rank)
        batch = [SequenceChunk(*c) for c in chunks]
        if pending is None:  # every step of a tensorrt rank (its executor takes no pending)
            out = self.executor.step_logits(batch)
        else:  # async scheduling: the driver's sampled ids, broadcast
            rows, feeds = pending
            ids = torch.empty(rows, dtype=torch.int64, device=self.executor.device)
            fed = DeviceTokens(broadcast(self.groups, ids, "receiving sampled tokens"), feeds)
            out = self.executor.step_logits(batch, fed)
        if self.delivers:
            send_logits(self.groups, out, batch)
        self.end.stepped()

    def close(self, reply: bool = True) -> None:
        if self.executor is not None:
            self.executor.close()
            gc.unfreeze()  # the closed engine's objects may be collected again
        self.executor, self.pending = None, None
        if reply:
            self.end.send(("closed",))
