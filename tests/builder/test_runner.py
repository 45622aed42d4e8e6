"""The build runner's worker processes (kiln/builder/runner.py), as Ctrl-C leaves them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_killed_mid_build_leaves_no_leaked_semaphore_warning():
    """A worker killed after its progress bar existed (Ctrl-C in a TensorRT build) must not
    leave the resource tracker a semaphore to warn about on kiln's stderr: tqdm's default
    lock is a multiprocessing semaphore, which a SIGKILLed process never unlinks."""
    script = textwrap.dedent("""
        import multiprocessing, os, time
        from concurrent.futures import ProcessPoolExecutor
        from kiln.builder.runner import _init_worker
        from tests.builder._worker_jobs import bar_then_wait

        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(30, os.getpid()))
        future = pool.submit(bar_then_wait)
        time.sleep(4)  # the worker started and drew its bar
        for process in list(pool._processes.values()):
            process.kill()
            process.join()
        pool.shutdown(wait=False, cancel_futures=True)
        print("done")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip() == "done", result.stderr
    assert "leaked semaphore" not in result.stderr, result.stderr
