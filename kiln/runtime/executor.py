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

Context logits: an executor whose engine was built with ``--gather_context_logits``
(``gathers_context_logits``) also returns, through :meth:`Executor.step_logits`, float32 logits
``[len(tokens), vocab_size]`` for every token of each chunk marked ``context_logits`` (row j:
the distribution of the token after ``tokens[j]``), on the same device as the last-token
logits. Other executors refuse such a chunk (``RuntimeError``: the core checks first).
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
    context_logits: bool = False  # also return the logits of every token (step_logits)


@dataclass(frozen=True)
class StepLogits:
    """What :meth:`Executor.step_logits` returns: each chunk's last-token logits [n, V] and,
    for chunks marked ``context_logits``, chunk index -> logits of all its tokens [len, V]."""

    last: torch.Tensor
    context: dict[int, torch.Tensor]


class Executor(ABC):
    """One backend's model step (see the module docstring for the contract)."""

    limits: BuildLimits
    vocab_size: int
    gathers_context_logits: bool = False  # the engine returns context logits (step_logits)

    @abstractmethod
    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """Run one step; float32 logits [len(chunks), vocab_size] of each chunk's last token."""

    def step_logits(self, chunks: Sequence[SequenceChunk]) -> StepLogits:
        """:meth:`step`, plus the context logits of chunks that ask for them."""
        if any(c.context_logits for c in chunks):
            raise RuntimeError(f"{type(self).__name__} cannot return context logits (its engine "
                               f"was built without --gather_context_logits)")
        return StepLogits(self.step(chunks), {})

    def reserve(self, slot: int, num_tokens: int) -> bool:
        """Ensure ``slot`` can hold ``num_tokens`` tokens in total; False if not now."""
        return num_tokens <= self.limits.max_seq_len

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` has ended; its cache may be reused."""

    def close(self) -> None:
        """Free backend resources (sessions, GPU memory)."""
