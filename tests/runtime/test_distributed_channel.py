"""The control channel of torchrun's ranks (kiln/runtime/distributed/channel.py) over a real TCP
store: commands and replies keep their order, the store does not grow per step and is empty
once the engine closes, a rank that stops beating (a thread, or a killed process) is seen as
lost, and a worker's watch (kiln/runtime/distributed/torchrun.py) ends its process when the
driver aborts or stops beating."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from kiln.runtime.distributed.channel import HEARTBEAT_S, LOST_AFTER_S, Pulse, StoreChannel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server():
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=10),
                          wait_for_workers=False)
    yield store


def ends(server, world: int) -> list[StoreChannel]:
    """Every rank's end, each over a connection of its own, under one prefix."""
    return [StoreChannel(dist.PrefixStore("kiln", dist.TCPStore(
        "127.0.0.1", server.port, 1, False, timeout=timedelta(seconds=10))), rank, world)
        for rank in range(world)]


def replies_until(driver: StoreChannel, count: int) -> list[tuple[int, tuple]]:
    """The driver's replies until ``count`` came: a store's queue_push is not acknowledged, so
    another client sees it a moment later (the driver's monitor polls them)."""
    got, deadline = [], time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        got += driver.replies()
        time.sleep(0.005)
    return got


def test_commands_and_replies_keep_their_order(server):
    driver, one, two = ends(server, 3)
    sent = [("step", i, list(range(i))) for i in range(30)]
    for message in sent:
        driver.post(pickle.dumps(message))
    got = {1: [], 2: []}

    def serve(end: StoreChannel) -> None:
        for _ in sent:
            got[end.rank].append(end.command())
            end.reply(("done", got[end.rank][-1][1]))

    threads = [threading.Thread(target=serve, args=(end,)) for end in (one, two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert got == {1: sent, 2: sent}
    replies = replies_until(driver, 60)
    assert len(replies) == 60
    for rank in (1, 2):
        assert [m[1] for r, m in replies if r == rank] == list(range(30))
    assert driver.replies() == []  # consumed


def test_a_command_waits_for_the_driver(server):
    driver, worker = ends(server, 2)
    got = []
    thread = threading.Thread(target=lambda: got.append(worker.command()))
    thread.start()
    time.sleep(0.3)
    assert got == [] and thread.is_alive()
    driver.post(pickle.dumps(("exit",)))
    thread.join(10)
    assert got == [("exit",)]


def test_the_store_does_not_grow_per_step_and_is_empty_once_cleared(server):
    driver, worker = ends(server, 2)
    empty = server.num_keys()  # the store's own (a key per client)
    driver.say_hello({"device": "cpu"})
    assert worker.hello() == {"device": "cpu"}

    def one_step() -> None:
        driver.post(pickle.dumps(("step", [], [])))
        worker.command()
        worker.reply(("ready",))
        worker.beat(steps=1)
        driver.beat()
        assert driver.beats(1) >= 1 and worker.beats(0) >= 1 and replies_until(driver, 1)

    one_step()
    after_one = server.num_keys()
    for _ in range(50):
        one_step()
    assert server.num_keys() == after_one
    assert driver.steps(1) == 51
    driver.clear()
    assert server.num_keys() == empty
    assert worker.aborted() is None
    driver.abort("rank 1 died")
    # a store's set is not acknowledged: another client sees it a moment later (the workers'
    # watch polls it every heartbeat)
    deadline = time.monotonic() + 5
    while worker.aborted() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.aborted() == "rank 1 died" and server.num_keys() == empty + 1


def test_pulse_tells_a_counter_that_stopped():
    now = [100.0]
    pulse = Pulse([1, 2], clock=lambda: now[0])
    pulse.see(1, 1)
    assert pulse.started(1) and not pulse.started(2)
    for beat in range(2, 10):  # rank 1 beats, rank 2 never does
        now[0] += HEARTBEAT_S
        pulse.see(1, beat)
        pulse.see(2, 0)
    assert pulse.silent_for(1) == 0 and pulse.silent_for(2) == pytest.approx(8 * HEARTBEAT_S)
    now[0] += LOST_AFTER_S
    pulse.see(1, 9)  # read again, not moved
    assert pulse.silent_for(1) == pytest.approx(LOST_AFTER_S)


LOST = 1.0  # these tests' lost time (the channel's is LOST_AFTER_S): the logic is the same


def watch_lost(channel: StoreChannel, rank: int, seconds: float) -> float | None:
    """Read ``rank``'s counter every heartbeat for up to ``seconds``: when it was first silent
    for :data:`LOST` (seconds from the call), or None."""
    pulse, start = Pulse([rank]), time.monotonic()
    while time.monotonic() - start < seconds:
        pulse.see(rank, channel.beats(rank))
        if pulse.started(rank) and pulse.silent_for(rank) >= LOST:
            return time.monotonic() - start
        time.sleep(HEARTBEAT_S)
    return None


def test_a_killed_peer_is_lost_within_the_lost_time(server):
    """A process that beats, then is killed: alive while it beats, lost LOST after."""
    peer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from datetime import timedelta
        import torch.distributed as dist
        from kiln.runtime.distributed.channel import StoreChannel
        store = dist.TCPStore("127.0.0.1", {server.port}, 1, False, timeout=timedelta(seconds=10))
        end = StoreChannel(dist.PrefixStore("kiln", store), 1, 2)
        while True:
            end.beat()
            time.sleep({HEARTBEAT_S})
    """)], cwd=ROOT)
    try:
        driver = ends(server, 2)[0]
        deadline = time.monotonic() + 60
        while driver.beats(1) < 3 and time.monotonic() < deadline:  # it started beating
            time.sleep(0.05)
        assert watch_lost(driver, 1, 1.5 * LOST) is None  # alive: never silent for long
        peer.kill()
        lost = watch_lost(driver, 1, LOST + 3)
    finally:
        peer.kill()
        peer.wait()
    assert lost is not None and LOST - HEARTBEAT_S <= lost <= LOST + 1


WATCHER = """
    import logging, time
    from datetime import timedelta
    import torch.distributed as dist
    from kiln.runtime.distributed import torchrun
    from kiln.runtime.distributed.channel import StoreChannel
    from kiln.runtime.distributed.torchrun import Watch, catch_stops
    logging.basicConfig(format="%(message)s")
    torchrun.LOST_AFTER_S = {lost}
    store = dist.TCPStore("127.0.0.1", {port}, 1, False, timeout=timedelta(seconds=10))
    end = StoreChannel(dist.PrefixStore("kiln", store), 1, 2)
    with catch_stops() as signals:
        Watch(end, "rank 1 (tp 1, stage 0)", "here", signals, 1).start()
        time.sleep(60)
"""


@pytest.mark.parametrize("event", ["the driver aborts", "the driver stops beating", "SIGTERM"])
def test_a_workers_watch_ends_it_when_the_driver_aborts_or_is_gone_or_torchrun_stops_it(
        server, event):
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WATCHER).format(
        port=server.port, lost=LOST)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    driver = ends(server, 2)[0]
    try:
        deadline = time.monotonic() + 60
        while driver.beats(1) < 1 and time.monotonic() < deadline:  # its watch runs
            driver.beat()
            time.sleep(0.05)
        for _ in range(round(1.5 * LOST / HEARTBEAT_S)):  # the driver alive: the worker stays
            driver.beat()
            time.sleep(HEARTBEAT_S)
        assert worker.poll() is None
        if event == "the driver aborts":
            driver.abort("rank 3 (tp 1, stage 1) died: killed by SIGKILL")
        elif event == "SIGTERM":
            worker.send_signal(signal.SIGTERM)
        start = time.monotonic()
        while worker.poll() is None and time.monotonic() - start < LOST + 10:
            if event != "the driver stops beating":
                driver.beat()
            time.sleep(0.05)
        seconds = time.monotonic() - start
        stderr = worker.communicate(timeout=10)[1]
    finally:
        worker.kill()
    if event == "the driver aborts":
        assert worker.returncode == 1 and seconds < 2 * HEARTBEAT_S + 1
        assert stderr == ("rank 1 (tp 1, stage 0) stopped: rank 3 (tp 1, stage 1) died: killed "
                          "by SIGKILL\n")
    elif event == "the driver stops beating":
        assert worker.returncode == 1
        assert LOST - 2 * HEARTBEAT_S <= seconds <= LOST + 1.5
        assert stderr == ("rank 1 (tp 1, stage 0) stopped: the driver (rank 0) stopped "
                          "answering (no heartbeat for 1 s)\n")
    else:  # the driver hears why first (the verdict prefers a rank that died on its own)
        assert worker.returncode == 128 + signal.SIGTERM and seconds < 2 * HEARTBEAT_S + 1
        assert stderr == "rank 1 (tp 1, stage 0) stopped by SIGTERM\n"
        assert replies_until(driver, 1) == [(1, (
            "error", "stopped", "was stopped by SIGTERM (torchrun stops a node's ranks when one "
                                "fails, or when it is stopped)"))]
