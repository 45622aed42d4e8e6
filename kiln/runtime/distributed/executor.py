"""The driver's executor of a multi-rank torch engine: rank 0's TorchExecutor plus the workers.

:class:`DistributedExecutor` implements :class:`~kiln.runtime.executor.Executor`, so the core,
the scheduler and sampling run unchanged in the driver. Per call:

- ``reserve``/``release`` run on rank 0's executor at once (the scheduler needs the answer)
  and are logged; the log goes to the workers with the next step, which replay it first.
- ``step_logits`` checks the step against the contract on rank 0 (so an invalid step raises
  before any worker sees it), reserves the blocks its chunks grow into (logged too), sends the
  plan (the log and the chunks) to every worker, and runs rank 0's share: the collectives of
  the forward join all ranks. With one pipeline stage rank 0 holds the gathered logits; with
  more, the last stage's tensor-parallel rank 0 sends them (and any context logits) to it.
- a failed collective or pipe raises :class:`~kiln.runtime.errors.WorkerError` naming the rank
  that died or hung (:meth:`~kiln.runtime.distributed.pool.WorkerPool.fault`); every later call
  raises it again.

Not async: ``supports_async`` is False (the plan would have to carry tokens still on the
device), so the core runs its synchronous loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from kiln.engine import EngineManifest
from kiln.runtime.distributed.comm import CONTEXT_TAG, LOGITS_TAG, CollectiveError, recv, send
from kiln.runtime.distributed.pool import WorkerPool, stop_with
from kiln.runtime.executor import DeviceTokens, Executor, SequenceChunk, StepLogits
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions
from kiln.runtime.torch_backend.paged_cache import KVCacheError
from kiln.runtime.torch_backend.parallel import RankShard

logger = logging.getLogger(__name__)


class DistributedExecutor(Executor):
    """See the module docstring. Make one with :meth:`open`."""

    supports_async = False
    prefers_async = False

    def __init__(self, pool: WorkerPool, local: TorchExecutor, manifest: EngineManifest,
                 owns_pool: bool):
        self.pool, self.local, self.owns_pool = pool, local, owns_pool
        self.shard: RankShard = local.shard
        self.limits, self.vocab_size = local.limits, local.vocab_size
        self.gathers_context_logits = local.gathers_context_logits
        self.mapping = manifest.mapping
        self._ops: list[tuple] = []
        self._busy = False  # a step was sent and did not complete (interrupted or failed)
        self._closed = False
        # dropped without close(): its workers are killed when it is collected
        self._finalizer = stop_with(self, pool) if owns_pool else None

    @classmethod
    def open(cls, engine_dir: Path, manifest: EngineManifest, device: torch.device,
             options: TorchExecutorOptions, num_threads: int | None = None,
             pool: WorkerPool | None = None) -> DistributedExecutor:
        """Start (or reuse: ``pool``, the tests') the workers and load every rank."""
        from kiln.runtime.torch_executor import build_executor, read_rank

        world = manifest.mapping.world_size
        owns = pool is None
        if pool is None:
            pool = WorkerPool(world, device.type, options.collective_timeout_s, num_threads,
                              manifest.mapping)
        elif pool.world_size != world or pool.failed:
            raise ValueError(f"a pool of {pool.world_size} ranks (failed: {pool.failed}) cannot "
                             f"run an engine of {world}")
        pool.mapping = manifest.mapping
        try:
            pool.send_all(("open", str(engine_dir), manifest, device.type, options))
            shard = RankShard(manifest.mapping, 0, pool.groups.collectives(manifest.mapping))
            weights = read_rank(Path(engine_dir), manifest, 0, device)
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

    # -- the executor contract --------------------------------------------------------------
    def reserve(self, slot: int, num_tokens: int) -> bool:
        ok = self.local.reserve(slot, num_tokens)
        self._ops.append(("reserve", slot, num_tokens, ok))
        return ok

    def release(self, slot: int) -> None:
        self.local.release(slot)
        self._ops.append(("release", slot))

    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        return self.step_logits(chunks).last

    def step_logits(self, chunks: Sequence[SequenceChunk],
                    pending: DeviceTokens | None = None) -> StepLogits:
        if pending is not None or (any(c.context_logits for c in chunks)
                                   and not self.gathers_context_logits):
            return super().step_logits(chunks, pending)  # refuses
        self.pool.check()
        if self._busy:
            raise RuntimeError("a previous step of this engine did not complete (interrupted); "
                               "close it and open the engine again")
        if not chunks:
            return StepLogits(torch.empty(0, self.vocab_size, device=self.local.device), {})
        self.local.check_step(chunks)
        self._grow(chunks)
        plan = [(c.slot, tuple(c.tokens), c.start, c.context_logits) for c in chunks]
        ops, self._ops = self._ops, []
        self._busy = True
        try:
            self.pool.send_all(("step", ops, plan))
            out = self.local.step_logits(chunks)
            if not self.shard.last_stage:
                out = recv_logits(self.pool.groups.world, self.mapping, chunks,
                                  self.vocab_size, self.local.device)
        except CollectiveError as e:
            raise self.pool.fault(e) from None
        self._busy = False
        return out

    def _grow(self, chunks: Sequence[SequenceChunk]) -> None:
        """Reserve (logged) the blocks each chunk grows into, as the executor's step would."""
        for c in chunks:
            end = c.start + len(c.tokens)
            if end > self.local.capacity(c.slot) and not self.reserve(c.slot, end):
                raise KVCacheError(f"slot {c.slot}: the KV cache has no free block for {end} "
                                   f"tokens; reserve() before scheduling the sequence")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        try:
            if self.owns_pool or self._busy or self.pool.failed:
                self.pool.shutdown(kill=self._busy or self.pool.failed)
            else:  # a shared pool (tests): the workers drop this engine and stay
                self.pool.send_all(("close",))
                self.pool.expect("closed")
        finally:
            self.local.close()


def replay(executor: TorchExecutor, ops: list[tuple], rank: int) -> None:
    """A worker applies the driver's reserve/release calls in order; a reserve that answers
    otherwise than the driver's means the allocators diverged (a bug): the rank fails."""
    for op in ops:
        if op[0] == "release":
            executor.release(op[1])
            continue
        _, slot, tokens, expected = op
        if executor.reserve(slot, tokens) != expected:
            raise RuntimeError(f"rank {rank}: reserve(slot {slot}, {tokens} tokens) answered "
                               f"{not expected}, the driver's {expected}: the KV caches diverged")


def send_logits(world, out: StepLogits, chunks: Sequence[SequenceChunk]) -> None:
    """The last stage's tensor-parallel rank 0 sends a step's logits to the driver (rank 0)."""
    send(world, out.last, 0, LOGITS_TAG, "sending logits")
    if out.context:
        every = torch.cat([out.context[i] for i in sorted(out.context)])
        send(world, every, 0, CONTEXT_TAG, "sending context logits")


def recv_logits(world, mapping, chunks: Sequence[SequenceChunk], vocab: int,
                device: torch.device) -> StepLogits:
    """The driver's side of :func:`send_logits`."""
    src = mapping.rank(0, mapping.pp_size - 1)
    last = recv(world, torch.empty(len(chunks), vocab, device=device), src, LOGITS_TAG,
                "receiving logits")
    asked = [i for i, c in enumerate(chunks) if c.context_logits]
    if not asked:
        return StepLogits(last, {})
    rows = [len(chunks[i].tokens) for i in asked]
    every = recv(world, torch.empty(sum(rows), vocab, device=device), src, CONTEXT_TAG,
                 "receiving context logits")
    return StepLogits(last, dict(zip(asked, every.split(rows), strict=True)))
