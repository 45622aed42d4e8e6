"""The driver's executor of a multi-rank torch engine: rank 0's TorchExecutor plus the workers.

:class:`DistributedExecutor` is a :class:`~kiln.runtime.distributed.driver.RankDriver` (the
rules every multi-rank driver shares: the ``reserve``/``release`` log the workers replay, the
step's plan sent to every worker, refusals, faults, close), so the core, the scheduler and
sampling run unchanged in the driver. What the torch engine adds:

- ``reserve`` is logged too (every rank's block allocator is one: the workers' answers must be
  the driver's).
- before a step is sent, it is checked against the contract on rank 0 (so an invalid step
  raises before any worker sees it) and the blocks its chunks grow into are reserved (logged).
- rank 0's share: the collectives of the forward join all ranks. With one pipeline stage rank 0
  holds the gathered logits; with more, the last stage's tensor-parallel rank 0 sends them
  (and any context logits) to it.
- a failed collective or pipe (:class:`~kiln.runtime.distributed.comm.CollectiveError`) raises
  :class:`~kiln.runtime.errors.WorkerError` naming the rank that died or hung
  (:meth:`~kiln.runtime.distributed.pool.RankPool.fault`); every later call raises it again.

- async scheduling (``supports_async``): a step's ``pending`` ids (the previous step's sampled
  tokens, on rank 0's device) are broadcast to every rank before the step runs
  (:func:`~kiln.runtime.distributed.comm.broadcast`: on CUDA queued on the stream, no host
  read), and every rank feeds them into its token input as a one-rank executor does; the
  plan carries which rows are fed. Not the default (``prefers_async`` False: the core's sync
  loop unless ``EngineCore(async_scheduling=True)``) until it is measured on several GPUs.

An engine of one rank runs too (:meth:`DistributedExecutor.open`): a pool with no worker, the
driver's process groups of one rank. The loader opens such an engine on a plain TorchExecutor;
this path is what a machine with a single GPU can run of the NCCL code (the tests').
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from kiln.engine import EngineManifest
from kiln.runtime.distributed.comm import (
    CONTEXT_TAG,
    LOGITS_TAG,
    CollectiveError,
    broadcast,
    recv,
    send,
)
from kiln.runtime.distributed.driver import RankDriver
from kiln.runtime.distributed.pool import RankPool, start_ranks
from kiln.runtime.executor import DeviceTokens, SequenceChunk, StepLogits
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions
from kiln.runtime.torch_backend.paged_cache import KVCacheError
from kiln.runtime.torch_backend.parallel import RankShard

logger = logging.getLogger(__name__)


class DistributedExecutor(RankDriver):
    """See the module docstring. Make one with :meth:`open`."""

    rank_failures = (CollectiveError,)
    supports_async = True

    def __init__(self, pool: RankPool, local: TorchExecutor, manifest: EngineManifest,
                 owns_pool: bool):
        super().__init__(pool, local, local.device, owns_pool)
        self.shard: RankShard = local.shard
        self.mapping = manifest.mapping

    @classmethod
    def open(cls, engine_dir: Path, manifest: EngineManifest, device: torch.device,
             options: TorchExecutorOptions, num_threads: int | None = None,
             pool: RankPool | None = None,
             random_seed: int | None = None) -> DistributedExecutor:
        """Start (:func:`~kiln.runtime.distributed.pool.start_ranks`: spawned, or
        torchrun's) or reuse (``pool``, the tests') the workers and load every rank (with
        ``random_seed``: each makes random weights instead, ``torch_executor.rank_weights``).
        A single-rank engine gets a pool without workers (see the module docstring). On a
        torchrun rank other than 0 this serves the driver, then raises ``SystemExit(0)``."""
        from kiln.runtime.torch_executor import build_executor, rank_weights

        world = manifest.mapping.world_size
        owns = pool is None
        if pool is None:
            pool = start_ranks(manifest.mapping, manifest.backend, device.type,
                               options.collective_timeout_s, num_threads)
        elif pool.world_size != world or pool.failed:
            raise ValueError(f"a pool of {pool.world_size} ranks (failed: {pool.failed}) cannot "
                             f"run an engine of {world}")
        pool.mapping = manifest.mapping
        try:
            pool.send_all(("open", str(engine_dir), manifest, device.type, options,
                           random_seed))
            shard = RankShard(manifest.mapping, 0, pool.groups.collectives(manifest.mapping))
            weights = rank_weights(Path(engine_dir), manifest, 0, device, random_seed)
            pool.expect("loaded")
            pool.send_all(("build",))
            local = build_executor(Path(engine_dir), manifest, weights, device, options, shard)
            pool.expect("ready")
        except CollectiveError as e:
            error = pool.fault(e)
            pool.shutdown(kill=True)
            raise error from None
        except BaseException:
            pool.shutdown(kill=True)  # a shared pool too: its workers' state is unknown
            raise
        return cls(pool, local, manifest, owns)

    # -- what a torch engine adds to the driver's rules ---------------------------------------
    def reserve(self, slot: int, num_tokens: int) -> bool:
        ok = self.local.reserve(slot, num_tokens)
        self._ops.append(("reserve", slot, num_tokens, ok))
        return ok

    def _prepare(self, chunks: Sequence[SequenceChunk]) -> None:
        """Check the step on rank 0, then reserve (logged) the blocks each chunk grows into, as
        the executor's step would."""
        self.local.check_step(chunks)
        for c in chunks:
            end = c.start + len(c.tokens)
            if end > self.local.capacity(c.slot) and not self.reserve(c.slot, end):
                raise KVCacheError(f"slot {c.slot}: the KV cache has no free block for {end} "
                                   f"tokens; reserve() before scheduling the sequence")

    def _run_local(self, chunks: Sequence[SequenceChunk],
                   pending: DeviceTokens | None) -> StepLogits:
        if pending is not None:
            broadcast(self.pool.groups, pending.ids.contiguous(), "sending sampled tokens")
        out = self.local.step_logits(chunks, pending)
        if not self.shard.last_stage:
            out = recv_logits(self.pool.groups, self.mapping, chunks, self.vocab_size,
                              self.local.device)
        return out


def send_logits(groups, out: StepLogits, chunks: Sequence[SequenceChunk]) -> None:
    """The last stage's tensor-parallel rank 0 sends a step's logits to the driver (rank 0)."""
    send(groups, out.last.float(), 0, LOGITS_TAG, "sending logits")  # a graph's: model dtype
    if out.context:
        every = torch.cat([out.context[i] for i in sorted(out.context)])
        send(groups, every, 0, CONTEXT_TAG, "sending context logits")


def recv_logits(groups, mapping, chunks: Sequence[SequenceChunk], vocab: int,
                device: torch.device) -> StepLogits:
    """The driver's side of :func:`send_logits`."""
    src = mapping.rank(0, mapping.pp_size - 1)
    last = recv(groups, torch.empty(len(chunks), vocab, device=device), src, LOGITS_TAG,
                "receiving logits")
    asked = [i for i, c in enumerate(chunks) if c.context_logits]
    if not asked:
        return StepLogits(last, {})
    rows = [len(chunks[i].tokens) for i in asked]
    every = recv(groups, torch.empty(sum(rows), vocab, device=device), src, CONTEXT_TAG,
                 "receiving context logits")
    return StepLogits(last, dict(zip(asked, every.split(rows), strict=True)))
