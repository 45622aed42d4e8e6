"""Multi-process engines: tensor- and pipeline-parallel torch engines, their ranks spawned on
one machine or started by torchrun on several.

Design (issue 14, phase 1):

- One process per rank. The process that opens the engine (``LLM``, ``EngineCore`` over
  :func:`kiln.runtime.loader.open_engine`, ``kiln run``/``bench``/``serve``/``eval``) is the
  driver and rank 0; :class:`~kiln.runtime.distributed.pool.WorkerPool` spawns ranks
  1..N-1 itself, N = tp_size x pp_size from the engine's mapping. The driver keeps the
  scheduler, the sampling and the requests; it sees one
  :class:`~kiln.runtime.executor.Executor`, :class:`~.executor.DistributedExecutor`, so the
  core needs no change (what every multi-rank driver does alike, the tensorrt one's too, is
  :class:`~.driver.RankDriver`). Every rank, the driver included, runs the same
  :class:`~kiln.runtime.torch_backend.executor.TorchExecutor` on its shard (the builder's
  ``rank{N}`` files: the checkpoint's shards, kiln/sharding.py).
- Control: per step the driver sends every worker the step's plan (the chunks, and the
  ``reserve``/``release`` calls since the last step, which the workers replay so that every
  rank's block allocator is the same) through a pipe, pickled once. Workers wait for the plan
  on the pipe, never in a collective, so an idle engine never runs into a timeout.
- Data: torch.distributed process groups (:mod:`.comm`), gloo on the CPU and NCCL on CUDA
  (rank r on GPU r), the same code. Tensor parallel: an all-reduce after each row-parallel
  projection (attention ``o``, MLP ``down``; one per layer for Falcon's parallel block) and an
  all-gather of the vocab-parallel logits (:mod:`kiln.runtime.torch_backend.parallel` states
  what the forward calls; :mod:`kiln.runtime.torch_backend.model` calls it). Pipeline
  parallel: each stage sends its residual stream to the next (send/recv), a step in
  micro-batches whose sends do not wait, so that the stages overlap (prefill steps; decode
  steps run whole: :mod:`kiln.runtime.torch_backend.executor`); the last stage's
  tensor-parallel rank 0 sends the logits to the driver.
- Faults (:mod:`.pool`): a monitor thread in the driver watches every worker's process and
  pipe. A worker that dies or fails ends the run within about a second with one
  :class:`~kiln.runtime.errors.WorkerError` line naming the rank and the cause; the other
  ranks are killed, so nothing is left behind. Collectives time out
  (``TorchExecutorOptions.collective_timeout_s``, 120 s), so a rank that hangs alive ends the
  run too, named as the one that did not answer. Workers ignore SIGINT and exit within half a
  second when the driver's pid is gone; Ctrl-C in the driver stops every rank (``kiln``
  exits 130).

Multi-node (:mod:`.torchrun`): a kiln process that torchrun started (``WORLD_SIZE`` > 1:
:mod:`kiln.runtime.launch`, which refuses, on every rank, a rank count other than the
engine's, and ``--dp``) spawns nothing. Every rank joins torchrun's store
(``torch.distributed.rendezvous("env://")``), rank 0 keeps the driver's role behind the same
pool interface (:class:`~.pool.RankPool`: :class:`~.torchrun.TorchrunPool`, chosen by
:func:`~.pool.start_ranks`), and the other ranks serve it as workers (:class:`~.worker.Worker`)
and exit 0 once it closes the engine, without doing the command's own work. Pipes do not cross
machines: commands, replies, error reports and heartbeats go through the store
(:mod:`.channel`: queues and counters, nothing per step); gloo listens on an address the other
nodes reach (``GLOO_SOCKET_IFNAME``, else the route to ``MASTER_ADDR``), CUDA rank r on GPU
``LOCAL_RANK``. Faults are told by heartbeat counters, not process sentinels: a worker whose
heartbeat stops is named within seconds, a failed pool writes its verdict to the store and every
worker exits on it, and workers exit when the driver's heartbeat or the store is gone.
docs/engine.md ("Ranks on several machines (torchrun)") has a two-node example.

Also here (phase 2): data-parallel replicas (``--dp``, :mod:`.replicas`: N single-rank engines
in processes of their own behind one front that routes whole requests), and the ranks of a
tensor-parallel tensorrt engine (:mod:`.tensorrt_ranks`, over the same pool, with an NCCL
communicator of their own: :mod:`.nccl`).

Async scheduling (the previous step's sampled ids broadcast from the driver to every rank on
the device: :mod:`.executor`) runs where asked, ``EngineCore(async_scheduling=True)``; it is
not the default until measured on several GPUs. Not yet: CUDA graphs for engines of several
ranks; pipeline stages that overlap across steps.
"""

from __future__ import annotations

import importlib
from typing import Any

# imported lazily (PEP 562), as kiln.runtime's names: a spawned rank or replica starts in
# :func:`.process.spawned`, which ends with its parent before anything imports torch
_LAZY = {"DistributedExecutor": "kiln.runtime.distributed.executor",
         "WorkerPool": "kiln.runtime.distributed.pool"}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.runtime.distributed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
