"""The build cache across processes: two first calls build once (the entry's lock); a killed
build leaves nothing usable and the next call rebuilds; Ctrl-C in ``kiln cache build`` leaves
nothing half-written and exits 130.

Each process runs :data:`DRIVER`, which wraps the conversion-and-build step to record that it
ran and to pause where the test needs it (what ran is asserted, never timing).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kiln.build_cache.store import EngineCache

ROOT = Path(__file__).resolve().parents[2]
DRIVER = r"""
import logging, os, sys, time
from pathlib import Path
from kiln.build_cache import api

runs, pause_until, how, model = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
real = api._convert_and_build


def recorded(tmp, *args, **kwargs):
    with open(runs / "builds", "a") as f:
        f.write(f"{os.getpid()}\n")
    (runs / "started").touch()
    deadline = time.monotonic() + 120
    while not (runs / pause_until).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(tmp, *args, **kwargs)


class Waiting(logging.Handler):  # the other process announces that it waits for the lock
    def emit(self, record):
        if "waiting for another kiln process" in record.getMessage():
            (runs / "waiting").touch()


api._convert_and_build = recorded
logging.getLogger("kiln.build_cache").addHandler(Waiting())
if how == "api":
    logging.basicConfig(level=logging.WARNING)
    print(api.engine_for_model(model), flush=True)
else:
    from kiln.cli.main import run
    run(["cache", "build", "--model_dir", model])
"""


def _start(runs: Path, pause_until: str, how: str, model: Path, cache_dir: Path):
    env = {**os.environ, "KILN_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(runs), pause_until, how,
                             str(model)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_two_first_calls_build_once(tiny_hf, tmp_path, cache_dir):
    """The builder pauses until the other process says it waits for the entry's lock."""
    runs = tmp_path / "runs"
    runs.mkdir()
    processes = [_start(runs, "waiting", "api", tiny_hf, cache_dir) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert len((runs / "builds").read_text().split()) == 1
    engines = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(engines) == 1 and Path(engines.pop()).is_dir()
    assert sum("using cached engine" in err for _, err in outputs) == 1
    assert len(EngineCache(cache_dir).entries()) == 1


def test_a_killed_build_leaves_nothing_usable_and_the_next_call_rebuilds(tiny_hf, tmp_path,
                                                                         cache_dir, builds):
    from kiln.build_cache import engine_for_model

    runs = tmp_path / "runs"
    runs.mkdir()
    process = _start(runs, "never", "api", tiny_hf, cache_dir)
    _wait_for(runs / "started", process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    cache = EngineCache(cache_dir)
    (leftover,) = cache.names()[1]  # the killed build's temporary dir
    assert cache.entries() == []
    engine = engine_for_model(tiny_hf)  # the dead process's lock is free: no wait
    assert builds == [str(tiny_hf)] and engine.is_dir() and not leftover.exists()
    assert cache.names()[1] == []


def test_ctrl_c_in_kiln_cache_build_exits_130_and_leaves_nothing(tiny_hf, tmp_path, cache_dir):
    runs = tmp_path / "runs"
    runs.mkdir()
    process = _start(runs, "never", "cli", tiny_hf, cache_dir)
    _wait_for(runs / "started", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)"
    cache = EngineCache(cache_dir)
    assert cache.entries() == [] and cache.names() == ([], [], [])
