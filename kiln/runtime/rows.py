"""From executor chunks to graph runs over contiguous per-slot KV caches (onnx and tensorrt).

Both backends execute the per-rank graph of docs/engine.md: right-padded rows [B, S] and
per-layer caches [B, Hkv, max_seq_len, D]. With one cache buffer per layer of
``max_batch_size`` rows (slot s = row s), a run over consecutive slots ``[lo, hi)`` binds the
block ``buffer[lo:hi]`` (one pointer, no copy) as both the ``past_*`` input and the
``present_*`` output, so the cache is updated in place.

Invariant: a run never writes a cache position that holds a token some sequence still needs.
- Decodes form one run (S = 1); prefill chunks one run when padding wastes at most as many
  tokens as they hold, else one run each (padding a decode to a prefill's length would
  multiply its cost by S).
- A slot inside a run's window without a chunk of its own is an idle row: its pad tokens are
  written at ``[length, length + S)``, past its valid tokens, where they are overwritten
  before anything attends to them. A window is split where an idle row would not fit in
  max_seq_len at the length it has after the whole step, and lengths are updated after every
  run (a later run's idle row must write past what an earlier run of the same step added: a
  decode row at 48 idle in a later 48-token prefill run of a 96-token cache writes at 49).
- Pad tokens of a row continue its positions (clamped into the rotary table).
- Graphs whose attention is ONNX Runtime's GroupQueryAttention (the gqa plugin,
  ``fresh_prompt_batches``) take a run of several rows with S > 1 only when every row starts
  at position 0: prompts from position 0 batch together (their idle rows must hold no tokens,
  the op writes a prompt at [0, S)), and each chunk that continues a prefill runs alone.

Non-goals: paged caches (the torch backend has its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kiln.runtime.executor import SequenceChunk


@dataclass(frozen=True)
class Run:
    """One graph run: consecutive slots [lo, hi), sequence length ``seq``, chunks by slot."""

    lo: int
    hi: int
    seq: int
    chunks: dict[int, int]  # slot -> index of its chunk in the step

    @property
    def rows(self) -> int:
        return self.hi - self.lo


class SlotRows:
    """Per-slot cached lengths and the planning of steps into runs (module docstring)."""

    def __init__(self, max_batch_size: int, max_seq_len: int, fresh_prompt_batches: bool = False):
        self.max_seq_len = max_seq_len
        self.lengths = [0] * max_batch_size
        self.fresh_prompt_batches = fresh_prompt_batches

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def commit(self, run: Run, chunks: Sequence[SequenceChunk]) -> None:
        """The run executed: its chunks are cached."""
        for slot, index in run.chunks.items():
            self.lengths[slot] = chunks[index].start + len(chunks[index].tokens)

    def plan(self, chunks: Sequence[SequenceChunk]) -> list[Run]:
        for chunk in chunks:
            if not chunk.tokens or chunk.start + len(chunk.tokens) > self.max_seq_len:
                raise RuntimeError(f"slot {chunk.slot}: chunk of {len(chunk.tokens)} tokens at "
                                   f"{chunk.start} does not fit max_seq_len {self.max_seq_len}")
        decodes = [i for i, c in enumerate(chunks) if len(c.tokens) == 1]
        prefills = sorted((i for i, c in enumerate(chunks) if len(c.tokens) > 1),
                          key=lambda i: chunks[i].slot)
        alone = []
        if self.fresh_prompt_batches:
            alone = [i for i in prefills if chunks[i].start > 0]
            prefills = [i for i in prefills if chunks[i].start == 0]
        groups = [decodes] if decodes else []
        if prefills:
            longest = max(len(chunks[i].tokens) for i in prefills)
            held = sum(len(chunks[i].tokens) for i in prefills)
            fits = all(chunks[i].start + longest <= self.max_seq_len for i in prefills)
            if fits and longest * len(prefills) - held <= held:
                groups.append(prefills)
            else:
                groups.extend([i] for i in prefills)
        groups.extend([i] for i in alone)
        after = list(self.lengths)  # each slot's length once the step has run
        for chunk in chunks:
            after[chunk.slot] = max(after[chunk.slot], chunk.start + len(chunk.tokens))
        runs = []
        for group in groups:
            seq = max(len(chunks[i].tokens) for i in group)
            runs.extend(self._windows({chunks[i].slot: i for i in group}, seq, after))
        return runs

    def _windows(self, by_slot: dict[int, int], seq: int, after: list[int]) -> list[Run]:
        """Consecutive-slot windows over ``by_slot``; idle rows must fit ``seq`` tokens."""
        runs, slots = [], sorted(by_slot)
        current = [slots[0]]
        for slot in slots[1:]:
            if all(self._can_idle(after[s], seq) for s in range(current[-1] + 1, slot)):
                current.append(slot)
            else:
                runs.append(current)
                current = [slot]
        runs.append(current)
        return [Run(r[0], r[-1] + 1, seq, {s: by_slot[s] for s in r}) for r in runs]

    def _can_idle(self, length: int, seq: int) -> bool:
        """Whether a slot of ``length`` tokens (its most in this step) can sit in a run of
        ``seq`` tokens without a chunk of its own."""
        if self.fresh_prompt_batches and seq > 1 and length:
            return False
        return length + seq <= self.max_seq_len

    def feeds(self, run: Run, chunks: Sequence[SequenceChunk]) -> dict[str, np.ndarray]:
        """int64 inputs of the run: input_ids, position_ids, past_len, last_index."""
        ids = np.zeros((run.rows, run.seq), np.int64)
        past = np.array(self.lengths[run.lo:run.hi], np.int64)
        last = np.zeros(run.rows, np.int64)
        for slot, index in run.chunks.items():
            chunk = chunks[index]
            ids[slot - run.lo, :len(chunk.tokens)] = chunk.tokens
            past[slot - run.lo] = chunk.start
            last[slot - run.lo] = len(chunk.tokens) - 1
        positions = np.minimum(past[:, None] + np.arange(run.seq), self.max_seq_len - 1)
        return {"input_ids": ids, "position_ids": positions, "past_len": past,
                "last_index": last}
