"""Engine dirs in use: ``--overwrite`` refuses a directory another process holds loaded, and
takes it once that process has ended, however it ended (kiln/dir_locks.py).

The holders are real processes: one running ``LLM(engine_dir)``, as ``kiln serve`` and ``kiln
run`` do, and one holding the lock alone (:data:`HOLDER`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import kiln
from kiln import dir_locks
from kiln.build_cache import hold_engine
from kiln.cli.main import main
from kiln.errors import OutputError
from kiln.output_dirs import atomic_dir, check_output
from kiln.runtime import LLM
from tests.models import kiln_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(max_batch_size=2, max_input_len=8, max_seq_len=16)
BUILD = ("--backend", "onnx", "--max_batch_size", "2", "--max_input_len", "8", "--max_seq_len",
         "16")
# holds its argument (an LLM: the engine loaded; else the lock alone) until stdin closes
HOLDER = r"""
import sys
from kiln.dir_locks import holding
from kiln.runtime import LLM

if sys.argv[2] == "llm":
    held = LLM(sys.argv[1])
else:
    held = holding(sys.argv[1])  # (kept: a dropped one is closed, and lets go)
    held.__enter__()
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def built(tiny_hf, tmp_path_factory) -> tuple[Path, Path]:
    """(kiln checkpoint, onnx engine dir with a tokenizer), copied by tests that change them."""
    root = tmp_path_factory.mktemp("built")
    ckpt = kiln_checkpoint(tiny_hf, root / "ckpt")
    kiln.build(ckpt, root / "engine", backend="onnx", **LIMITS)
    return ckpt, root / "engine"


@pytest.fixture
def engine(built, tmp_path) -> Path:
    return Path(shutil.copytree(built[1], tmp_path / "engine"))


def _hold(directory: Path, how: str) -> subprocess.Popen:
    """A process holding ``directory`` (``how``: "llm" or "lock") once this returns."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), how], cwd=ROOT,
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    if holder.stdout.readline() != "held\n":
        holder.kill()
        pytest.fail(holder.communicate()[1])
    return holder


def _overwrite(ckpt: Path, out: Path):
    return CliRunner().invoke(main, ["build", "--checkpoint_dir", str(ckpt), "--output_dir",
                                     str(out), "--overwrite", *BUILD], prog_name="kiln")


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_a_loaded_engine_dir_is_not_replaced_until_its_holder_ends(built, engine, end):
    holder = _hold(engine, "llm")
    try:
        before = (engine / "rank0.onnx").stat().st_ino
        result = _overwrite(built[0], engine)
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1
        assert f"{engine}: is in use: process {holder.pid} holds it loaded" in result.output
        assert "stop it (or close its LLM) first, or choose another --output_dir" in \
            result.output
        assert (engine / "rank0.onnx").stat().st_ino == before
    finally:
        if end == "kill":  # the kernel drops a killed process's lock
            holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    result = _overwrite(built[0], engine)
    assert result.exit_code == 0, result.output
    assert (engine / "rank0.onnx").stat().st_ino != before


def test_a_holder_that_came_after_the_check_is_refused_at_the_replacement(engine):
    before = (engine / "config.json").read_bytes()
    check_output(engine, overwrite=True)
    with pytest.raises(OutputError, match="is in use: process"):
        with atomic_dir(engine, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
            holder = _hold(engine, "lock")  # while the build runs
    holder.communicate(timeout=60)
    assert (engine / "config.json").read_bytes() == before
    assert sorted(p.name for p in engine.parent.iterdir()) == ["engine"]


def test_a_process_rebuilding_what_it_loaded_closes_it_first(built, engine):
    """Build, load, close, build again: the process never blocks itself; while its own LLM
    is open, the refusal names this process."""
    with LLM(engine) as llm:
        assert llm.generate("ab")[0].token_ids
        with pytest.raises(OutputError, match=rf"this process \(pid {os.getpid()}\)"):
            kiln.build(built[0], engine, backend="onnx", overwrite=True, **LIMITS)
    kiln.build(built[0], engine, backend="onnx", overwrite=True, **LIMITS)
    with LLM(engine) as llm:
        assert llm.generate("ab")[0].token_ids


def test_hold_engine_holds_a_dir_outside_the_cache(engine):
    with hold_engine(engine):
        with pytest.raises(OutputError, match="is in use"):
            dir_locks.check_unused(engine)
    dir_locks.check_unused(engine)


def test_a_holder_that_waited_for_a_replacement_holds_the_new_dir(tmp_path):
    path = tmp_path / "engine"
    path.mkdir()
    started, held = threading.Event(), threading.Event()

    def hold():
        started.set()
        with dir_locks.holding(path):
            held.set()
            release.wait(60)

    release = threading.Event()
    with dir_locks.replacing(path):
        thread = threading.Thread(target=hold)
        thread.start()
        started.wait(60)
        time.sleep(0.2)  # the holder waits on the old directory's lock
        assert not held.is_set()
        path.rename(tmp_path / "old")
        path.mkdir()
    assert held.wait(60)
    with pytest.raises(OutputError, match="is in use"):
        dir_locks.check_unused(path)  # the new directory is held,
    dir_locks.check_unused(tmp_path / "old")  # not the one moved aside
    release.set()
    thread.join(60)


@pytest.mark.parametrize("broken", ["flock", "platform"])
def test_where_flock_fails_nothing_is_locked_and_it_is_said_once(tmp_path, monkeypatch, caplog,
                                                                 broken):
    if broken == "flock":
        def flock(fd, how):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

        monkeypatch.setattr(dir_locks.fcntl, "flock", flock)
    else:
        monkeypatch.setattr(dir_locks, "fcntl", None)
    monkeypatch.setattr(dir_locks, "_said_unlockable", set())
    with caplog.at_level(logging.DEBUG, logger="kiln.dir_locks"):
        for _ in range(2):
            with dir_locks.holding(tmp_path):
                dir_locks.check_unused(tmp_path)
    assert f"{tmp_path}: not locked" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once a process: the user must know, not at every load
    assert "--overwrite will not see an engine dir another process has loaded" in warnings[0]


def test_a_directory_that_does_not_exist_is_not_locked_without_a_word(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="kiln.dir_locks"):
        dir_locks.check_unused(tmp_path / "new")  # a new output dir: nothing to say
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def _fake_locks(monkeypatch, directory: Path, pids: list[int]) -> None:
    """/proc/locks (dir_locks.PROC_LOCKS) with a shared flock on ``directory`` for each pid."""
    held = os.stat(directory)
    where = f"{os.major(held.st_dev):02x}:{os.minor(held.st_dev):02x}:{held.st_ino}"
    locks = directory.parent / f"{directory.name}-locks"
    locks.write_text("".join(f"{i}: FLOCK  ADVISORY  READ {pid} {where} 0 EOF\n"
                             for i, pid in enumerate(pids, 1)))
    monkeypatch.setattr(dir_locks, "PROC_LOCKS", locks)


@pytest.mark.parametrize("pids, named", [
    ([3819], "process 3819 holds it loaded (kiln serve, run, bench or eval, or an LLM), and "
             "overwrite=True would replace it under that process; stop it (or close its LLM) "
             "first"),
    # a retest's "process 3819, process 26185 holds it loaded ... under that process"
    ([26185, 3819], "processes 3819 and 26185 hold it loaded (kiln serve, run, bench or eval, "
                    "or an LLM), and overwrite=True would replace it under them; stop them (or "
                    "close their LLMs) first"),
    ([3819, 0, 26185, 3820], "processes 3819, 3820 and 26185 hold it loaded"),
    ([999999999, "this"], "processes {this} (this process) and 999999999 hold it loaded"),
])
def test_the_holders_are_named_in_the_number_they_are(tmp_path, monkeypatch, pids, named):
    this = os.getpid()
    _fake_locks(monkeypatch, tmp_path, [this if pid == "this" else pid for pid in pids])
    with dir_locks.holding(tmp_path), pytest.raises(OutputError) as info:
        dir_locks.check_unused(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: is in use: {named.format(this=this)}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_forked_child_does_not_keep_its_parents_dir_held(tmp_path):
    """A forked child closes its copies of the lock descriptors (os.register_at_fork): one
    living on had kept the parent's engine dir held after the parent closed its LLMs, and
    --overwrite was refused blaming "this process"."""
    started, told = os.pipe()
    with dir_locks.holding(tmp_path):
        pid = os.fork()
        if pid == 0:  # the child (its fork hooks have run): outlives the parent's hold
            os.write(told, b"1")
            time.sleep(2)
            os._exit(0)
    os.read(started, 1)
    try:
        dir_locks.check_unused(tmp_path)  # the child is still alive here
    finally:
        os.waitpid(pid, 0)
        os.close(started)
        os.close(told)
