"""The executor interface: one model step over a batch of sequences, behind every backend.

Invariant: an executor is a pure step function over its own KV cache. The scheduler decides
which sequences run and which tokens they feed; the executor never reorders, drops or samples.

A step takes a list of :class:`SequenceChunk` (at most ``limits.max_batch_size`` of them,
``sum(len(c.tokens)) <= limits.max_num_tokens``), each naming the KV-cache slot of its
sequence and the position of its first token (= tokens already cached for that slot). It
returns float32 logits ``[len(chunks), vocab_size]`` for the last token of each chunk, in
chunk order, after appending every chunk's tokens to its slot's cache.

A chunk is a prefill (or a piece of one: chunked prefill) when it has several tokens, a
decode step when it has one; a step may mix both. Slots are integers in
``[0, limits.max_batch_size)``; the scheduler owns their assignment. ``reserve`` asks for
cache capacity (paged caches can run out; contiguous ones hold ``max_seq_len`` per slot) and
``release`` frees a finished sequence's slot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kiln.engine import BuildLimits


@dataclass(frozen=True)
class SequenceChunk:
    slot: int
    tokens: Sequence[int]
    start: int  # position of tokens[0]; the slot's cache holds positions [0, start)


class Executor(ABC):
    """One backend's model step (see the module docstring for the contract)."""

    limits: BuildLimits
    vocab_size: int

    @abstractmethod
    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """Run one step; float32 logits [len(chunks), vocab_size] of each chunk's last token."""

    def reserve(self, slot: int, num_tokens: int) -> bool:
        """Ensure ``slot`` can hold ``num_tokens`` tokens in total; False if not now."""
        return num_tokens <= self.limits.max_seq_len

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` has ended; its cache may be reused."""

    def close(self) -> None:
        """Free backend resources (sessions, GPU memory)."""
