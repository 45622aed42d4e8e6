"""What the driver's executor of every multi-rank engine does the same way: rank 0's executor
plus a :class:`~kiln.runtime.distributed.pool.RankPool` of the other ranks (spawned, or
torchrun's).

:class:`RankDriver` holds the rules; :class:`~.executor.DistributedExecutor` (torch engines)
and :class:`~.tensorrt_ranks.TensorRTRanks` (tensorrt engines) add how rank 0's share of a
step runs and what its failure looks like.

- ``release`` (and, where the subclass logs it, ``reserve``) runs on rank 0's executor at once
  (the scheduler needs the answer) and is logged; the log goes to the workers with the next
  step, which :func:`replay` it first, so that every rank's slots stay rank 0's.
- ``step_logits``: a call the executor cannot take (``pending`` device tokens, context logits
  from an engine built without them) is refused as :class:`~kiln.runtime.executor.Executor`
  refuses it; a failed pool raises its :class:`~kiln.runtime.errors.WorkerError`; a step that
  was sent and did not complete (interrupted, failed) leaves the ranks in an unknown state, so
  every later step is refused; an empty step sends nothing. Otherwise the subclass checks the
  step (:meth:`RankDriver._prepare`: before any worker sees it), the plan (the log and the
  chunks) goes to every worker, and rank 0 runs its share (:meth:`RankDriver._run_local`); a
  failure of that share of a kind the subclass names (:attr:`RankDriver.rank_failures`) is a
  rank's failure: the step raises the pool's verdict (:meth:`~.pool.RankPool.fault`).
- ``close`` stops the workers (killed when a step did not complete or the pool failed; a pool
  the driver does not own, the tests', is told to drop the engine instead), then rank 0's
  executor. A driver that owns its pool and is dropped without ``close()`` kills the workers
  when it is collected (:func:`~.pool.stop_with`).

Async scheduling is a subclass's choice (``supports_async``; False here, so the core runs its
synchronous loop): a step with ``pending`` device tokens sends the workers the plan plus which
rows are fed and how many ids there are (:func:`pending_spec`; a step without sends the plan
alone), and :meth:`_run_local` gets ``pending``; the ids themselves stay on the devices (the
torch engine broadcasts them).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from kiln.runtime.distributed.pool import RankPool, stop_with
from kiln.runtime.executor import DeviceTokens, Executor, SequenceChunk, StepLogits


class RankDriver(Executor):
    """See the module docstring. Subclasses give :meth:`_run_local`, :attr:`rank_failures`
    and :attr:`logits_device`, and may check a step first (:meth:`_prepare`)."""

    supports_async = False
    prefers_async = False
    # exceptions of rank 0's share that mean another rank failed (the pool names which)
    rank_failures: tuple[type[BaseException], ...] = ()

    def __init__(self, pool: RankPool, local: Executor, logits_device: torch.device,
                 owns_pool: bool = True):
        self.pool, self.local, self.owns_pool = pool, local, owns_pool
        self.logits_device = logits_device  # where rank 0's executor returns logits
        self.limits, self.vocab_size = local.limits, local.vocab_size
        self.gathers_context_logits = local.gathers_context_logits
        self._ops: list[tuple] = []
        self._busy = False  # a step was sent and did not complete (interrupted or failed)
        self._closed = False
        # dropped without close(): its workers are killed when it is collected
        self._finalizer = stop_with(self, pool) if owns_pool else None

    def release(self, slot: int) -> None:
        self.local.release(slot)
        self._ops.append(("release", slot))

    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        # Executor.step's float32 in a new tensor: rank 0's torch executor hands back a decode
        # graph's logits in the model dtype, in the buffer its next replay overwrites
        return self.step_logits(chunks).last.to(torch.float32, copy=True)

    def step_logits(self, chunks: Sequence[SequenceChunk],
                    pending: DeviceTokens | None = None) -> StepLogits:
        if (pending is not None and not self.supports_async) or (
                any(c.context_logits for c in chunks) and not self.gathers_context_logits):
            return super().step_logits(chunks, pending)  # refuses
        self.pool.check()
        if self._busy:
            raise RuntimeError("a previous step of this engine did not complete (interrupted); "
                               "close it and open the engine again")
        if not chunks:
            return StepLogits(torch.empty(0, self.vocab_size, device=self.logits_device), {})
        self._prepare(chunks)
        plan = [(c.slot, tuple(c.tokens), c.start, c.context_logits) for c in chunks]
        ops, self._ops = self._ops, []
        self._busy = True
        fed = () if pending is None else (pending_spec(pending),)  # async steps only
        self.pool.send_all(("step", ops, plan, *fed))
        try:
            out = self._run_local(chunks, pending)
        except self.rank_failures as e:
            raise self.pool.fault(e) from None
        self._busy = False
        return out

    def _prepare(self, chunks: Sequence[SequenceChunk]) -> None:
        """Check the step on rank 0 (raise before any worker sees it); may log ops."""

    @abstractmethod
    def _run_local(self, chunks: Sequence[SequenceChunk],
                   pending: DeviceTokens | None) -> StepLogits:
        """Rank 0's share of a step the workers were sent: the step's logits (``pending``
        only where ``supports_async``)."""

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


def pending_spec(pending: DeviceTokens) -> tuple[int, dict[int, int]]:
    """What a worker needs of ``pending`` besides the ids: their count and the feeds."""
    return len(pending.ids), dict(pending.feeds)


def replay(executor: Executor, ops: list[tuple], rank: int) -> None:
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
