"""The driver's executor of a tensor-parallel tensorrt engine: rank 0's TensorRTExecutor plus
one worker process per other rank.

:class:`TensorRTRanks` is a :class:`~kiln.runtime.distributed.driver.RankDriver` over a
:class:`~kiln.runtime.distributed.pool.RankPool` of the engine's ranks (spawned, or torchrun's:
:func:`~kiln.runtime.distributed.pool.start_ranks`; NCCL groups, rank r on GPU r, or on GPU
``LOCAL_RANK`` under torchrun), as
:class:`~kiln.runtime.distributed.executor.DistributedExecutor` is for torch engines (the
driver's rules are written once there):

- open: every worker is told to open its rank (``open_tensorrt``); every rank, the driver
  included, joins the engine's NCCL communicator (:func:`kiln.runtime.distributed.nccl
  .communicator`, bootstrapped through the pool's store: collective) and gives it to its
  contexts. The driver joins in a helper thread and watches the pool meanwhile: a rank that
  dies before it joined would leave ``ncclCommInitRank`` waiting forever.
- per step: the driver sends the plan (the chunks, and the ``release`` calls since the last
  step, which each rank replays: the slot lengths of every rank's row planner must match) and
  runs rank 0's share; the DistCollective layers join the ranks inside the engine, and every
  rank ends the step with the whole logits (the graph all-gathers the vocab shards), so only
  the driver's are used.
- faults: a worker that dies or fails fails the pool, whose monitor kills the others and
  aborts the engine's communicator (``on_fail``), so that rank 0 waiting in a collective
  fails (with whatever TensorRT raises then: any ``Exception`` of rank 0's share counts); the
  step raises the pool's :class:`~kiln.runtime.errors.WorkerError` naming the rank.

Limits: a rank that hangs alive inside the engine is not detected (NCCL collectives inside
TensorRT have no timeout); the driver waits. Not executed anywhere yet: no machine with full
TensorRT and several GPUs was available (see :mod:`kiln.runtime.tensorrt_executor`); the pool,
its protocol and its faults are the torch ranks' (tests/runtime/test_distributed*.py), the
executor's calls are checked against a fake ``tensorrt`` module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kiln.engine import EngineManifest
from kiln.runtime.distributed.driver import RankDriver
from kiln.runtime.distributed.nccl import communicator
from kiln.runtime.distributed.pool import RankPool, start_ranks
from kiln.runtime.executor import SequenceChunk, StepLogits
from kiln.runtime.options import ExecutorOptions
from kiln.runtime.tensorrt_executor import TensorRTExecutor, cuda_device, rank_engines

logger = logging.getLogger(__name__)

COMMUNICATOR_KEY = "tensorrt/nccl"  # in the pool's store (one engine per pool)
TIMEOUT_S = 120.0  # the pool's store and groups (TensorRT's own collectives have none)


class TensorRTRanks(RankDriver):
    """See the module docstring. Make one with :meth:`open`."""

    rank_failures = (Exception,)  # rank 0's share failed: a rank died (communicator aborted)

    def __init__(self, pool: RankPool, local: TensorRTExecutor):
        super().__init__(pool, local, torch.device("cpu"))  # its logits are host tensors

    @classmethod
    def open(cls, engine_dir: Path, manifest: EngineManifest,
             options: ExecutorOptions) -> TensorRTRanks:
        world = manifest.mapping.world_size
        logger.info("tensorrt engine of tp %d: one process and one GPU per rank", world)
        pool = start_ranks(manifest.mapping, manifest.backend, "cuda", TIMEOUT_S,
                           options.num_threads)
        try:
            pool.send_all(("open_tensorrt", str(engine_dir), manifest, COMMUNICATOR_KEY))
            device = cuda_device(0)
            comm = joined(pool, lambda: communicator(pool.store, COMMUNICATOR_KEY, 0, world))
            pool.on_fail.append(comm.abort)
            local = TensorRTExecutor(rank_engines(engine_dir, manifest, 0), manifest, 0, comm,
                                     device)
            pool.expect("ready")
        except BaseException:
            pool.shutdown(kill=True)
            raise
        return cls(pool, local)

    def _run_local(self, chunks: Sequence[SequenceChunk], pending: None) -> StepLogits:
        return self.local.step_logits(chunks)  # never pending: supports_async is False


def joined(pool: RankPool, join: Callable[[], Any]) -> Any:
    """``join()`` (a collective that waits for every rank, with no timeout of its own) in a
    helper thread, while the pool is watched: its WorkerError if a rank dies meanwhile."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(join())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            error.append(e)

    thread = threading.Thread(target=run, name="kiln-nccl-join", daemon=True)
    thread.start()
    while thread.is_alive():
        pool.check()
        thread.join(0.1)
    if error:
        raise error[0]
    return result[0]
