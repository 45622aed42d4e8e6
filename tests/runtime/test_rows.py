"""Step planning into runs over consecutive slots (kiln.runtime.rows)."""

from __future__ import annotations

import random

import pytest

from kiln.runtime.executor import SequenceChunk
from kiln.runtime.rows import SlotRows


def plan(rows: SlotRows, *chunks: tuple[int, int, int]) -> list[tuple[int, int, int, list[int]]]:
    """(lo, hi, seq, chunk slots) per run for chunks given as (slot, tokens, start)."""
    step = [SequenceChunk(slot, tuple(range(n)), start) for slot, n, start in chunks]
    return [(r.lo, r.hi, r.seq, sorted(r.chunks)) for r in rows.plan(step)]


def with_lengths(fresh: bool, lengths: list[int]) -> SlotRows:
    rows = SlotRows(len(lengths), 32, fresh_prompt_batches=fresh)
    rows.lengths = list(lengths)
    return rows


def test_standard_graphs_batch_every_prefill():
    rows = with_lengths(False, [5, 0, 9, 0])
    assert plan(rows, (0, 1, 5), (1, 4, 0), (2, 3, 9), (3, 4, 0)) == [
        (0, 1, 1, [0]), (1, 4, 4, [1, 2, 3])]


def test_gqa_graphs_run_a_continued_prefill_alone():
    rows = with_lengths(True, [5, 0, 9, 0])
    assert plan(rows, (0, 1, 5), (1, 4, 0), (2, 3, 9), (3, 4, 0)) == [
        (0, 1, 1, [0]), (1, 2, 4, [1]), (3, 4, 4, [3]), (2, 3, 3, [2])]


def test_gqa_prompt_batches_skip_slots_that_hold_tokens():
    """An idle row inside a prompt batch would have its cache overwritten from position 0."""
    rows = with_lengths(True, [0, 7, 0, 0])
    assert plan(rows, (0, 3, 0), (2, 3, 0), (3, 2, 0)) == [(0, 1, 3, [0]), (2, 4, 3, [2, 3])]
    rows = with_lengths(True, [0, 0, 0, 0])
    assert plan(rows, (0, 3, 0), (3, 3, 0)) == [(0, 4, 3, [0, 3])]


def test_decodes_may_span_idle_rows_in_both_forms():
    for fresh in (False, True):
        rows = with_lengths(fresh, [4, 7, 2, 0])
        assert plan(rows, (0, 1, 4), (2, 1, 2)) == [(0, 3, 1, [0, 2])]


def test_an_idle_row_fits_at_the_length_an_earlier_run_of_the_step_gives_it():
    # slot 1 decodes at 16 -> 17 first; idle in the 16-token prompt run after, it would write
    # [17, 33) in a 32-token cache (ONNX Runtime's TensorScatter refuses the run)
    rows = with_lengths(False, [0, 16, 0])
    assert plan(rows, (0, 16, 0), (1, 1, 16), (2, 16, 0)) == [
        (1, 2, 1, [1]), (0, 1, 16, [0]), (2, 3, 16, [2])]


@pytest.mark.parametrize("fresh", [False, True])
def test_no_run_writes_past_the_cache(fresh):
    rng = random.Random(1)
    for _ in range(2000):
        rows = with_lengths(fresh, [rng.choice([0, 0, rng.randrange(32)]) for _ in range(6)])
        step = []
        for slot, length in enumerate(rows.lengths):
            if length < 32 and rng.random() < 0.6:
                n = 1 if length and rng.random() < 0.5 else rng.randint(1, 32 - length)
                step.append(SequenceChunk(slot, tuple(range(n)), length))
        if not step:
            continue
        expected = list(rows.lengths)
        for chunk in step:
            expected[chunk.slot] = chunk.start + len(chunk.tokens)
        for run in rows.plan(step):
            past = rows.feeds(run, step)["past_len"]
            assert all(p + run.seq <= 32 for p in past), (rows.lengths, step, run)
            rows.commit(run, step)
        assert rows.lengths == expected
