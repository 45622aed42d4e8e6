"""The front's sends to data-parallel replicas (:mod:`kiln.runtime.distributed.replicas`,
Sending): a replica that stops reading its pipe (SIGSTOP, wedged) while the pipe is full blocks
neither the front nor the other replica, gets its messages in order once it goes on, and is
killed at shutdown without its blocked writer holding the shutdown up.

A message larger than the pipe holds (a socket pair's buffers, some hundreds of KiB) fills it at
once: the request's prompt text, which the front carries to the replica as it is (the engine's
tiny limits keep its token ids short).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from kiln.builder.api import build
from kiln.runtime import LLM, AsyncLLM, ExecutorOptions, SamplingParams
from tests.models import hf_model, kiln_checkpoint
from tests.runtime.test_distributed_faults import alive, write_char_tokenizer

LIMITS = dict(max_batch_size=2, max_input_len=24, max_seq_len=48, max_num_tokens=32)
BIG = "x" * (4 << 20)  # a prompt text of 4 MiB: more than any pipe holds
BOUND_S = 15.0  # the other replica's requests end within this (tokens of a tiny model)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    hf = hf_model("llama-gqa", root / "hf")
    build(kiln_checkpoint(hf, root / "ckpt"), root / "engine", backend="torch", dtype="float32",
          **LIMITS)
    write_char_tokenizer(root / "engine")
    return root / "engine"


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)


def within(seconds: float, fn, *args) -> bool:
    """Run ``fn`` in a thread of its own: True if it returned within ``seconds`` (a send
    blocked on a stopped replica's pipe would block the test itself)."""
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def serve_replica_0(core, ids: list[str], done: list[bool]) -> None:
    """Add the requests (the big one second: replica 1 takes it) and step until every request
    replica 0 can take has ended; ``done`` says it did within BOUND_S."""
    ids.append(core.add_request([5, 6, 7], params(9)).request_id)  # replica 0
    ids.append(core.add_request([8, 9], params(9), prompt=BIG).request_id)  # replica 1
    ids.extend(core.add_request([10 + i, 11], params(3)).request_id for i in range(5))
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        core.step()
        # replica 1 holds two at most (its slots): the big one and one more
        if sum(core.requests[rid].finished for rid in ids) >= len(ids) - 2:
            done.append(True)
            return


def test_a_stopped_replica_with_a_full_pipe_blocks_neither_the_front_nor_the_other(engine):
    """SIGSTOP replica 1, then send it more than its pipe holds: the front's send had blocked
    on the full pipe, and with it every step, so replica 0's requests stalled too. Now replica
    0's end within the bound; SIGCONT, and replica 1's end as well, in the order sent."""
    with LLM(engine, ExecutorOptions(device="cpu", dp=2)) as llm:
        core = llm.core
        pid = core.pool.processes[1].pid
        ids: list[str] = []
        done: list[bool] = []
        os.kill(pid, signal.SIGSTOP)
        try:
            driver = threading.Thread(target=serve_replica_0, args=(core, ids, done),
                                      daemon=True)
            driver.start()
            driver.join(BOUND_S + 5)
            blocked = driver.is_alive()
            backlog = None if blocked else core.pool.backlog(1)
        finally:
            os.kill(pid, signal.SIGCONT)  # (a blocked front goes on: the test ends)
        driver.join(60)
        assert not blocked and done, "the front was blocked by the stopped replica's pipe"
        assert backlog >= 1  # the big message was still on its way: the pipe was full
        assert core.served[1] <= 2
        deadline = time.monotonic() + 30
        while core.has_work():
            assert time.monotonic() < deadline
            core.step()
        results = [core.requests[rid] for rid in ids]
        assert all(r.finish_reason == "length" for r in results)
        assert [len(r.output_ids) for r in results] == [9, 9, 3, 3, 3, 3, 3]
        assert core.pool.backlog(1) == 0


def test_shutdown_with_a_stopped_replica_and_its_writer_blocked_takes_a_second(engine):
    """A writer blocked on a stopped replica's full pipe holds no shutdown up: killed at once
    (close(now=True), the fault path) or after the wait for a graceful exit, the replica is
    gone, its write fails and the writer ends."""
    for now in (True, False):
        llm = LLM(engine, ExecutorOptions(device="cpu", dp=2))
        pool = llm.core.pool
        pids = [p.pid for p in pool.processes]
        os.kill(pids[1], signal.SIGSTOP)
        try:
            llm.core.add_request([5, 6, 7], params(2))  # replica 0
            # to replica 1: its writer blocks (and the front had)
            sent = within(5, llm.core.add_request, [8, 9], params(2), None, BIG)
            assert sent, "the front was blocked by the stopped replica's pipe"
            time.sleep(0.2)  # the writer writes what the pipe takes
            assert pool.backlog(1) == 1
            started = time.monotonic()
            if now:
                llm.close(now=True)
            else:  # a graceful close waits for the exit a stopped replica never makes
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr("kiln.runtime.distributed.replicas.STOP_WAIT_S", 0.5)
                    llm.close()
            took = time.monotonic() - started
        finally:
            if alive(pids[1]):
                os.kill(pids[1], signal.SIGCONT)
            llm.close(now=True)  # (closed already, unless an assertion failed)
        assert took < (1.0 if now else 2.5)
        assert not any(alive(pid) for pid in pids)
        assert not any(outbox.thread.is_alive() for outbox in pool.outboxes)
        assert all(conn.closed for conn in pool.conns)



def test_a_with_block_left_by_ctrl_c_kills_the_replicas_at_once(engine):
    """``kiln run --dp 2`` on a CPU took 5 s to stop on Ctrl-C: leaving the LLM's ``with``,
    its close asked the replicas to exit and waited for the one in a long prefill step. An
    interrupt now kills them at once; a replica that cannot answer (stopped here, as a long
    step is for the ask) does not hold the exit."""
    started = None
    with pytest.raises(KeyboardInterrupt):
        with LLM(engine, ExecutorOptions(device="cpu", dp=2)) as llm:
            pids = [p.pid for p in llm.core.pool.processes]
            os.kill(pids[1], signal.SIGSTOP)
            started = time.monotonic()
            raise KeyboardInterrupt
    took = time.monotonic() - started
    assert llm.closed and not any(alive(pid) for pid in pids)
    assert took < 1.0, f"the interrupted close took {took:.1f} s"



def test_an_async_with_block_cancelled_kills_the_replicas_at_once(tiny_hf, cache):
    """The same through ``async with AsyncLLM(model=...)``: Ctrl-C in ``asyncio.run`` cancels
    the main task, and the close it ran took 5.9 s (a CPU replica in a long prefill)."""

    async def serve(opened: asyncio.Future) -> None:
        async with AsyncLLM(model=tiny_hf, options=ExecutorOptions(device="cpu", dp=2),
                            max_batch_size=2) as engine:
            opened.set_result(engine)
            await asyncio.sleep(60)

    async def cancelled() -> tuple[list[int], float]:
        opened = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(opened))
        pids = [p.pid for p in (await opened).llm.core.pool.processes]
        os.kill(pids[1], signal.SIGSTOP)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pids, time.monotonic() - started

    pids, took = asyncio.run(cancelled())
    assert not any(alive(pid) for pid in pids)
    assert took < 1.0, f"the cancelled close took {took:.1f} s"


class Pool:
    """Two replicas of ``slots`` slots and no process: what the front sends each, and whether
    its pipe takes it (``written``; a replica's backlog counts what it has not)."""

    size, failed = 2, False

    def __init__(self, slots: int):
        from kiln.engine import BuildLimits
        from kiln.runtime.distributed.replica_worker import ReplicaInfo

        self.infos = [ReplicaInfo(BuildLimits(slots, 8, 16, 8), 100, False)] * 2
        self.sent: list[list[tuple]] = [[], []]
        self.written = [True, True]  # a replica's pipe takes nothing once it is False

    def send(self, i, message):
        self.sent[i].append(message)
        return True

    def backlog(self, i):
        return 0 if self.written[i] else len(self.sent[i])

    def ids(self) -> list[list[str]]:
        """The request ids of what each replica was sent."""
        return [[m[1] for m in sent] for sent in self.sent]

    def check(self):
        pass

    def receive(self, timeout):
        return []


def test_a_replica_whose_pipe_takes_nothing_more_is_routed_no_new_request():
    """Past max_batch_size messages not yet written (aborts free its slots, each new request
    adds one more), a replica is given no new request: they go to the other, or wait in the
    front; its backlog is bounded."""
    from kiln.runtime.distributed.replicas import ReplicaCore

    pool = Pool(slots=2)
    core = ReplicaCore(pool, None, has_tokenizer=False)
    pool.written[1] = False
    core.add_request([1], params(2), request_id="a")  # replica 0
    core.add_request([1], params(2), request_id="b")  # replica 1: backlog 1
    core.abort("b")  # backlog 2, a free slot again
    core.add_request([1], params(2), request_id="c")  # replica 1 still: 2 is not past 2
    core.abort("c")  # backlog 4: past
    for rid in "defg":
        core.add_request([1], params(2), request_id=rid)
    assert [m[1] for m in pool.sent[1]] == ["b", "b", "c", "c"]
    assert [m[1] for m in pool.sent[0] if m[0] == "add"] == ["a", "d"]
    assert list(core._queue) == ["e", "f", "g"]  # replica 0 is full: they wait in the front
    pool.written[1] = True  # its pipe took them
    core.step()
    assert [m[1] for m in pool.sent[1][4:]] == ["e", "f"] and list(core._queue) == ["g"]


def test_a_quiet_replica_is_routed_nothing_new_while_another_speaks():
    """A replica with requests outstanding that has said nothing for QUIET_S (stopped, hung) is
    given no new request while another is not quiet, even a full one (they wait in the front
    for its slots): a retest's stopped replica had been given half of 200 new requests, which
    waited for it. When both are quiet, routing is as before."""
    from kiln.runtime.distributed import replicas
    from kiln.runtime.distributed.replicas import ReplicaCore

    for quiet in (True, False):
        pool = Pool(slots=3)
        core = ReplicaCore(pool, None, has_tokenizer=False)
        core.add_request([1], params(2), request_id="a")  # replica 0
        core.add_request([1], params(2), request_id="b")  # replica 1
        if quiet:  # nothing from replica 1 for longer than QUIET_S; replica 0 steps
            core._heard[1] = time.monotonic() - replicas.QUIET_S - 1
        for rid in "cdef":
            core.add_request([1], params(2), request_id=rid)
        if quiet:  # c and d to replica 0, the busier; e and f wait for its slots (3)
            assert pool.ids() == [["a", "c", "d"], ["b"]] and list(core._queue) == ["e", "f"]
            core._heard[0] -= replicas.QUIET_S + 1  # both quiet: routed as ever
            core.step()
            assert pool.ids() == [["a", "c", "d"], ["b", "e", "f"]]
        else:  # the least loaded first, as before
            assert pool.ids() == [["a", "c", "e"], ["b", "d", "f"]]
