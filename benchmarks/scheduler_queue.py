"""The scheduler with a long queue: N requests added, then aborted while queued, in submission
and in random order (what LLM.generate_stream does when an eval of N windows is stopped).

    PYTHONPATH=. python3 benchmarks/scheduler_queue.py [--requests 20000]

Before the thirty-fourth session each add scanned the queue for its id and each abort removed
by the dataclass's equality (token lists compared): 20,000 adds took 6.3 s on the dev box, and
a trial's Ctrl-C of an eval of 18,749 windows took 19 s to exit. Then aborts in random order
(a server's clients leaving) still removed from a deque by identity, O(n) each: 1.0 s for
20,000, quadratic in their number. The queue is an OrderedDict by id now
(kiln.runtime.scheduler.WaitingQueue), O(1) an abort in any order. Goal: adds and aborts in
either order under a second. Results: benchmarks/scheduler_queue.txt.
"""

from __future__ import annotations

import argparse
import random
import time

from kiln.engine import BuildLimits
from kiln.runtime.scheduler import Scheduler


def timed(n: int, shuffle: bool) -> tuple[float, float]:
    limits = BuildLimits(max_batch_size=16, max_input_len=128, max_seq_len=128,
                         max_num_tokens=256)
    s = Scheduler(limits, reserve=lambda slot, capacity: True, release=lambda slot: None)
    ids = [f"r{i}" for i in range(n)]
    started = time.perf_counter()
    for rid in ids:
        s.add(rid, list(range(100)), 100)
    added = time.perf_counter()
    if shuffle:
        random.Random(0).shuffle(ids)
    for rid in ids:
        s.finish(rid)
    assert not s.has_work()
    return added - started, time.perf_counter() - added


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    n = parser.parse_args().requests
    for order, shuffle in (("submission", False), ("random", True)):
        add_s, abort_s = timed(n, shuffle)
        print(f"{n} requests: add {add_s:.2f} s, abort in {order} order {abort_s:.2f} s "
              f"(goal: each < 1 s)")


if __name__ == "__main__":
    main()
