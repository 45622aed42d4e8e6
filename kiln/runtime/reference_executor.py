"""An executor over the oracle: :class:`kiln.reference.ReferenceDecoder`, one KV cache per slot.

It runs each chunk on its own (no padding, no batching), so it is slow but exact, and its
output for a sequence cannot depend on the other rows of a step. It serves tests of the
runtime (scheduler, sampling, API) with real or tiny models before or without any built
engine, and the oracle side of backend comparisons.

Contract: :mod:`kiln.runtime.executor`. A chunk whose ``start`` is not its slot's cached length
is a scheduler bug and raises ``RuntimeError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from kiln.engine import BuildLimits
from kiln.reference import KVCache, ReferenceDecoder
from kiln.runtime.executor import Executor, SequenceChunk, StepLogits


class ReferenceExecutor(Executor):
    """Per-slot :class:`ReferenceDecoder` caches behind the executor interface (context logits
    included: the oracle computes every position anyway)."""

    gathers_context_logits = True

    def __init__(self, decoder: ReferenceDecoder, limits: BuildLimits):
        self.decoder = decoder
        self.limits = limits
        self.vocab_size = decoder.config.vocab_size
        self._caches: dict[int, KVCache] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, limits: BuildLimits,
                        dtype: torch.dtype = torch.float32) -> ReferenceExecutor:
        return cls(ReferenceDecoder.from_checkpoint(checkpoint_dir, dtype), limits)

    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        return self.step_logits(chunks).last

    def step_logits(self, chunks: Sequence[SequenceChunk]) -> StepLogits:
        if len(chunks) > self.limits.max_batch_size:
            raise RuntimeError(f"step of {len(chunks)} chunks exceeds max_batch_size "
                               f"{self.limits.max_batch_size}")
        rows, context = [], {}
        for index, chunk in enumerate(chunks):
            cache = self._caches.setdefault(chunk.slot, KVCache())
            if chunk.start != cache.length:
                raise RuntimeError(f"slot {chunk.slot}: chunk starts at {chunk.start} but the "
                                   f"cache holds {cache.length} tokens")
            if chunk.start + len(chunk.tokens) > self.limits.max_seq_len:
                raise RuntimeError(f"slot {chunk.slot}: {chunk.start + len(chunk.tokens)} tokens "
                                   f"exceed max_seq_len {self.limits.max_seq_len}")
            logits = self.decoder.forward(torch.tensor([list(chunk.tokens)]), cache)
            rows.append(logits[0, -1])
            if chunk.context_logits:
                context[index] = logits[0].float()
        if not rows:
            return StepLogits(torch.empty(0, self.vocab_size), {})
        return StepLogits(torch.stack(rows).float(), context)

    def release(self, slot: int) -> None:
        self._caches.pop(slot, None)
