"""Run the planned parts through a backend: in this process, or in ``workers`` processes
(always in a worker process for a backend whose native build cannot be interrupted).

Each part gets ``max_build_memory / workers`` (the planner sized parts for that). Worker
processes are spawned (not forked) so each starts small and a backend library is initialized
once per worker. A finished part's files are hashed (sha256, for the manifest) in a background
thread while the next part builds; their sizes are recorded too (the runtime's load check).
Progress: one line per finished part (rank, stage, layers, stage timings).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from kiln.builder.backends import (
    Backend,
    BuildPlan,
    PartJob,
    PartResult,
    get_backend,
    part_label,
)
from kiln.builder.graph.context import PartSpec
from kiln.hashing import sha256_file
from kiln.progress import report_line

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # linux/prctl.h: signal this process when its parent thread exits


def run_parts(engine: Backend, plan: BuildPlan, parts: list[PartSpec], out_dir: Path,
              workers: int, progress: bool) -> list[PartResult]:
    started = time.perf_counter()
    work_dir = out_dir / ".work"
    work_dir.mkdir()
    workers = min(workers, len(parts))
    # A live progress line only from a single builder: several would overwrite each other.
    live = progress and workers == 1
    jobs = [PartJob(plan=plan, part=p, out_dir=out_dir, work_dir=work_dir, progress=live)
            for p in parts]
    hashes: dict[str, Future] = {}
    try:
        with ThreadPoolExecutor(1) as hasher:
            def finished(result: PartResult, done: int) -> None:
                for name in result.files:
                    hashes[name] = hasher.submit(sha256_file, out_dir / name)
                _report(plan, result, done, len(jobs), progress, started)

            if workers == 1 and not engine.isolated:
                results = []
                for job in jobs:
                    results.append(engine.build_part(job))
                    finished(results[-1], len(results))
            else:
                results = _run_pool(engine.name, jobs, workers, finished)
            for result in results:
                result.checksums = {name: hashes[name].result() for name in result.files}
                result.sizes = {name: (out_dir / name).stat().st_size for name in result.files}
        return results
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _run_pool(backend: str, jobs: list[PartJob], workers: int,
              finished: Callable[[PartResult, int], None]) -> list[PartResult]:
    results = []
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(level, os.getpid())) as pool:
        futures = [pool.submit(_build_in_worker, backend, job) for job in jobs]
        try:
            for future in as_completed(futures):
                results.append(future.result())
                finished(results[-1], len(results))
        except BaseException:
            # Ctrl-C, SIGTERM or a failed part: end the other builds now instead of letting the
            # pool's exit wait minutes for them (no public API stops a running worker).
            processes = list((pool._processes or {}).values())  # shutdown() forgets them
            for process in processes:
                process.kill()  # SIGKILL: a worker defers SIGTERM while TensorRT builds
            for process in processes:
                process.join()  # gone before the caller removes the files it was writing
            # Waiting is quick now (its workers are gone) and ends the pool's manager thread
            # here: left running, it raced the interpreter's exit, whose wake-up write to the
            # thread then failed on a closed pipe ("Exception ignored ... Bad file descriptor").
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _init_worker(level: int, parent: int) -> None:
    """A worker logs like its parent, in kiln.cli.main's format (TensorRT's warnings, progress),
    and dies with it: a parent killed outright (SIGKILL, the OOM killer, a CI timeout) cannot
    stop its workers, which would build on and then wait forever for the next job."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # tqdm's default lock is a multiprocessing semaphore, which a worker killed mid-build
    # (Ctrl-C) never unlinks: the resource tracker then warned of it on kiln's stderr. One
    # worker draws at most one bar (runner: a live line only from a single builder).
    tqdm.set_lock(threading.RLock())


def _build_in_worker(backend: str, job: PartJob) -> PartResult:
    return get_backend(backend).build_part(job)


def _report(plan: BuildPlan, result: PartResult, done: int, total: int, progress: bool,
            started: float) -> None:
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    line = f"[{done}/{total}] {part_label(plan, result.part)}: {stages}"
    log.info("%s", line)
    report_line(line, show=progress, started=started)
