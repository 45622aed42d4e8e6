"""Mock models behind the executor interface, for runtime tests that need no engine.

- :class:`HashExecutor`: logits are a pseudo-random function of the slot's whole token history
  (tokens and their positions), so any scheduling mistake (a token fed twice, skipped, to the
  wrong slot or at the wrong position) changes every later token.
- :class:`ScriptedExecutor`: after a prompt of known length, the most likely next token follows
  a fixed script, then EOS; for text, stop and streaming tests.
Both check the executor contract on every step (start == cached length, limits).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from kiln.engine import BuildLimits
from kiln.runtime.executor import Executor, SequenceChunk


class _ContractExecutor(Executor):
    def __init__(self, limits: BuildLimits, vocab_size: int):
        self.limits = limits
        self.vocab_size = vocab_size
        self.history: dict[int, list[int]] = {}
        self.steps: list[list[SequenceChunk]] = []
        self.released: list[int] = []

    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        assert 0 < len(chunks) <= self.limits.max_batch_size
        assert sum(len(c.tokens) for c in chunks) <= self.limits.max_num_tokens
        assert len({c.slot for c in chunks}) == len(chunks), "a slot twice in one step"
        self.steps.append(list(chunks))
        rows = []
        for c in chunks:
            hist = self.history.setdefault(c.slot, [])
            assert c.start == len(hist), f"slot {c.slot}: start {c.start} != cached {len(hist)}"
            assert 0 <= c.slot < self.limits.max_batch_size
            hist.extend(c.tokens)
            assert len(hist) <= self.limits.max_seq_len
            rows.append(self.logits(hist))
        return torch.stack(rows)

    def release(self, slot: int) -> None:
        self.history.pop(slot, None)
        self.released.append(slot)

    def logits(self, history: list[int]) -> torch.Tensor:
        raise NotImplementedError


class HashExecutor(_ContractExecutor):
    def logits(self, history: list[int]) -> torch.Tensor:
        digest = hashlib.sha256(repr(history).encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randn(self.vocab_size, generator=g) * 3


class ScriptedExecutor(_ContractExecutor):
    """Next token after ``prompt_len + k`` tokens is ``script[k]`` (then ``eos``)."""

    def __init__(self, limits: BuildLimits, vocab_size: int, prompt_len: int,
                 script: Sequence[int], eos: int):
        super().__init__(limits, vocab_size)
        self.prompt_len, self.script, self.eos = prompt_len, list(script), eos

    def logits(self, history: list[int]) -> torch.Tensor:
        k = len(history) - self.prompt_len
        token = self.script[k] if 0 <= k < len(self.script) else self.eos
        out = torch.zeros(self.vocab_size)
        out[token] = 10.0
        return out


class CapacityExecutor(HashExecutor):
    """A paged-cache stand-in: at most ``capacity`` reserved tokens over all slots."""

    def __init__(self, limits: BuildLimits, vocab_size: int, capacity: int):
        super().__init__(limits, vocab_size)
        self.capacity = capacity
        self.reserved: dict[int, int] = {}

    def reserve(self, slot: int, num_tokens: int) -> bool:
        others = sum(n for s, n in self.reserved.items() if s != slot)
        if others + num_tokens > self.capacity:
            return False
        self.reserved[slot] = num_tokens
        return True

    def release(self, slot: int) -> None:
        super().release(slot)
        self.reserved.pop(slot, None)
