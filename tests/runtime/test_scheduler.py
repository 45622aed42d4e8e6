"""The scheduler state machine: limits, chunked prefill, decode-first, slots, reservation."""

from __future__ import annotations

import pytest

from kiln.engine import BuildLimits
from kiln.runtime.scheduler import Scheduler, WaitingQueue


def make(limits, reserve=lambda slot, n: True):
    released = []
    return Scheduler(limits, reserve, released.append), released


def run_step(s, sampled=None):
    out = s.schedule()
    s.commit(out)
    for row in out.chunks:
        if row.samples:
            s.append(row.request_id, (sampled or {}).get(row.request_id, 7))
    return out


def test_prefill_is_chunked_within_max_num_tokens():
    s, _ = make(BuildLimits(max_batch_size=2, max_input_len=20, max_seq_len=40, max_num_tokens=8))
    s.add("a", list(range(20)), capacity=30)
    starts = []
    for _ in range(3):
        out = run_step(s)
        (row,) = out.chunks
        starts.append((row.chunk.start, len(row.chunk.tokens), row.samples))
    assert starts == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert run_step(s).chunks[0].chunk.tokens == (7,)  # then one decode token per step


def test_decodes_go_first_and_new_requests_fill_the_budget():
    s, _ = make(BuildLimits(max_batch_size=3, max_input_len=16, max_seq_len=40, max_num_tokens=6))
    s.add("a", [1, 2, 3], capacity=10)
    run_step(s)
    s.add("b", list(range(10)), capacity=20)
    out = run_step(s)
    assert [(r.request_id, len(r.chunk.tokens)) for r in out.chunks] == [("a", 1), ("b", 5)]
    assert out.admitted == ("b",) and out.num_tokens == 6


def test_batch_is_capped_at_max_batch_size_and_slots_are_reused_at_once():
    s, released = make(BuildLimits(max_batch_size=2, max_input_len=4, max_seq_len=16,
                                   max_num_tokens=16))
    for rid in "abc":
        s.add(rid, [1, 2], capacity=8)
    out = run_step(s)
    assert [r.request_id for r in out.chunks] == ["a", "b"]
    assert sorted(r.chunk.slot for r in out.chunks) == [0, 1]
    s.finish("a")
    assert released == [0]
    out = run_step(s)
    assert {r.request_id: r.chunk.slot for r in out.chunks} == {"b": 1, "c": 0}
    assert out.admitted == ("c",)


def test_abort_of_a_waiting_request_removes_it():
    s, released = make(BuildLimits(1, 4, 16, 16))
    s.add("a", [1], capacity=4)
    s.add("b", [1], capacity=4)
    s.finish("b")
    assert [r.request_id for r in run_step(s).chunks] == ["a"]
    s.finish("a")
    assert not s.has_work() and released == [0]


def test_refused_reservation_keeps_the_request_waiting():
    budget = {"free": 10}

    def reserve(slot, n):
        return n <= budget["free"]

    s, _ = make(BuildLimits(2, 8, 32, 32), reserve)
    s.add("big", [1] * 8, capacity=20)
    assert run_step(s).empty and len(s.waiting) == 1
    assert s.stalled() is not None  # nothing runs, so it can never be admitted
    budget["free"] = 20
    assert run_step(s).admitted == ("big",)


def test_scheduler_output_rows_never_repeat_a_slot():
    s, _ = make(BuildLimits(4, 8, 32, 10))
    for i in range(6):
        s.add(str(i), [1] * (i + 1), capacity=12)
    for _ in range(6):
        out = run_step(s)
        slots = [r.chunk.slot for r in out.chunks]
        assert len(slots) == len(set(slots)) and out.num_tokens <= 10


def test_aborts_in_any_order_keep_the_others_first_come_first_served():
    s, _ = make(BuildLimits(2, 4, 16, 64))
    ids = [f"r{i}" for i in range(12)]
    for rid in ids:
        s.add(rid, [1], capacity=4)
    aborted = ["r7", "r0", "r11", "r4", "r5", "r1"]  # front, back, middle, neighbours
    for rid in aborted:
        s.finish(rid)
    left = [rid for rid in ids if rid not in aborted]
    assert [seq.request_id for seq in s.waiting] == left
    admitted = []
    while s.has_work():
        out = run_step(s)
        admitted += out.admitted
        for rid in out.admitted:
            s.finish(rid)
    assert admitted == left


def test_the_waiting_queue_is_a_sequence_oldest_first():
    """Policies read it as a Sequence; the scheduler removes any one in O(1) (a deque's
    removal scanned it: benchmarks/scheduler_queue.py)."""
    s, _ = make(BuildLimits(1, 4, 16, 16))
    for rid in "abcde":
        s.add(rid, [1], capacity=4)
    s.finish("c")
    queue = s.waiting
    assert isinstance(queue, WaitingQueue) and len(queue) == 4 and queue
    names = [queue[i].request_id for i in range(-4, 4)]
    assert names == list("abde") * 2
    assert [seq.request_id for seq in reversed(queue)] == list("edba")
    assert [seq.request_id for seq in queue[1:3]] == list("bd")
    first = queue[0]
    assert first in queue and queue.index(first) == 0 and "a" not in queue
    for index in (4, -5):
        with pytest.raises(IndexError):
            queue[index]
    queue.remove(first)
    with pytest.raises(ValueError, match="request 'a' is not waiting"):
        queue.remove(first)
    s.add("a", [1], capacity=4)  # the id again: a new sequence, at the end
    assert first not in queue and [seq.request_id for seq in queue] == list("bdea")
