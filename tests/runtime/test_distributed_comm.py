"""kiln.runtime.distributed.comm: a gloo collective's wait can be ended while the peer hangs
alive (Ctrl-C, or the pool's verdict through Groups.abort); point-to-point waits are plain."""

from __future__ import annotations

import _thread
import threading
import time

import pytest

from kiln.runtime.distributed.comm import CollectiveError, Groups, collective


class Pending:
    """A work whose peer never answers: never completed; ``wait()`` would block forever."""

    def __init__(self):
        self.waited = False

    def is_completed(self) -> bool:
        return False

    def wait(self) -> None:
        self.waited = True
        raise AssertionError("wait() on a work that never completes would block forever")


def gloo_groups() -> Groups:
    groups = Groups.__new__(Groups)  # no process group is needed to wait on a work
    groups.backend, groups.stopped = "gloo", threading.Event()
    groups.world, groups._tp = None, {}  # what abort() looks through
    return groups


def test_abort_ends_a_collectives_wait_on_a_hung_peer():
    groups, work = gloo_groups(), Pending()
    threading.Timer(0.2, groups.abort).start()
    start = time.monotonic()
    with pytest.raises(CollectiveError, match="the engine's ranks were stopped"):
        with collective("tensor-parallel all-reduce"):
            groups.wait(work)
    assert time.monotonic() - start < 2 and not work.waited


def test_ctrl_c_ends_a_collectives_wait_on_a_hung_peer():
    groups, work = gloo_groups(), Pending()
    with pytest.raises(KeyboardInterrupt):
        # (started inside the block, so that an interrupt however early is the test's own)
        threading.Timer(0.2, _thread.interrupt_main).start()  # SIGINT's KeyboardInterrupt
        start = time.monotonic()
        groups.wait(work)
    assert time.monotonic() - start < 2 and not work.waited


def test_a_completed_work_and_point_to_point_works_are_waited_for():
    class Done(Pending):
        def is_completed(self) -> bool:
            return True

        def wait(self) -> None:
            self.waited = True

    groups = gloo_groups()
    done = Done()
    groups.wait(done)
    assert done.waited
    groups.stopped.set()  # a send or receive cannot poll (gloo completes it in wait())
    p2p = Done()
    p2p.is_completed = lambda: False
    groups.wait(p2p, poll=False)
    assert p2p.waited
