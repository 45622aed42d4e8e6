"""Faults of multi-process torch engines: a rank that dies or hangs ends the run with one line
naming it, within seconds, and leaves no process behind; workers end with their driver; Ctrl-C
stops every rank and ``kiln run`` exits 130. Each case starts its own workers (a fault ends
them), on the CPU over gloo.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from kiln.builder.api import build
from kiln.engine import EngineError, read_manifest
from kiln.errors import Wording, worded, wording
from kiln.runtime.compat import MachineInfo
from kiln.runtime.core import EngineCore
from kiln.runtime.distributed import DistributedExecutor
from kiln.runtime.distributed.pool import exit_cause
from kiln.runtime.errors import WorkerError
from kiln.runtime.loader import ExecutorOptions, open_engine
from kiln.runtime.params import SamplingParams
from kiln.runtime.torch_backend.executor import TorchExecutorOptions
from tests.models import hf_model, kiln_checkpoint

ROOT = Path(__file__).resolve().parents[2]
LIMITS = dict(max_batch_size=2, max_input_len=16, max_seq_len=40, max_num_tokens=32)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    hf = hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "hf")
    made = {}

    def get(tp: int, pp: int) -> Path:
        if (tp, pp) not in made:
            root = tmp_path_factory.mktemp(f"tp{tp}-pp{pp}")
            ckpt = kiln_checkpoint(hf, root / "ckpt", tp=tp, pp=pp)
            build(ckpt, root / "engine", backend="torch", dtype="float32", **LIMITS)
            write_char_tokenizer(root / "engine")
            made[tp, pp] = root / "engine"
        return made[tp, pp]
    return get


def write_char_tokenizer(directory: Path) -> None:
    """One token per printable ASCII character (ids 1-95): text prompts for a 128-token model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(directory / "tokenizer.json"))


def generate_until_error(executor, fault, after: float = 0.3) -> tuple[WorkerError, float]:
    """Generate without end; ``fault()`` runs in a thread ``after`` seconds in (mid-step, most
    likely). The WorkerError that ends it, and the seconds from the fault to it."""
    core = EngineCore(executor)
    at = []
    timer = threading.Timer(after, lambda: (at.append(time.monotonic()), fault()))
    timer.start()
    try:
        with pytest.raises(WorkerError) as info:
            for _ in range(100_000):
                if not core.has_work():
                    core.add_request([1, 2, 3], SamplingParams(temperature=0, ignore_eos=True,
                                                               max_tokens=30))
                core.step()
    finally:
        timer.cancel()
    return info.value, time.monotonic() - at[0]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_killed_worker_ends_the_run_within_seconds_and_no_rank_is_left(engines):
    engine = engines(2, 2)
    executor = DistributedExecutor.open(engine, read_manifest(engine), torch.device("cpu"),
                                        TorchExecutorOptions())
    processes = executor.pool.processes
    error, seconds = generate_until_error(executor, lambda: processes[3].kill())
    assert str(error) == ("rank 3 (tp 1, stage 1) died: killed by SIGKILL (sent by a user, or by "
                          "the kernel's OOM killer when memory ran out); the engine's other ranks "
                          "were stopped")
    assert seconds < 10
    assert all(not p.is_alive() for p in processes.values())
    with pytest.raises(WorkerError, match="rank 3"):  # the engine stays failed
        executor.step([])
    executor.close()


def test_a_rank_that_dies_at_startup_is_named_by_the_engines_mapping(engines, monkeypatch):
    """pp 2: rank 2 is (tp 0, stage 1), not the (tp 2, stage 0) of a tp-only world; it dies
    while the pool starts (before any engine command)."""
    from kiln.runtime.distributed import pool as pool_module

    start = pool_module.start

    def start_and_kill_rank2(process):
        start(process)
        if process.name == "kiln-rank2":
            process.kill()

    monkeypatch.setattr(pool_module, "start", start_and_kill_rank2)
    engine = engines(2, 2)
    with pytest.raises(WorkerError) as info:
        DistributedExecutor.open(engine, read_manifest(engine), torch.device("cpu"),
                                 TorchExecutorOptions())
    assert str(info.value).startswith("rank 2 (tp 0, stage 1) died: killed by SIGKILL")


def test_a_hung_worker_ends_the_run_at_the_collective_timeout(engines):
    engine = engines(2, 1)
    executor = DistributedExecutor.open(engine, read_manifest(engine), torch.device("cpu"),
                                        TorchExecutorOptions(collective_timeout_s=2))
    victim = executor.pool.processes[1]
    try:
        error, seconds = generate_until_error(executor,
                                              lambda: os.kill(victim.pid, signal.SIGSTOP))
    finally:
        executor.close()
    assert str(error) == ("rank 1 (tp 1, stage 0) did not answer within the collective timeout "
                          "of 2 s (alive but stuck or stopped); the engine's ranks were stopped")
    assert seconds < 10
    assert not alive(victim.pid)


def test_a_killed_rank_fails_every_asyncllm_request_for_good(engines, caplog):
    """kiln serve's view: the running request's stream raises the one line naming the rank,
    healthy() turns False, a later request's stream raises it too, one log line, no traceback."""
    import asyncio

    from kiln.runtime import LLM, AsyncLLM

    llm = LLM(engines(2, 1), ExecutorOptions(device="cpu"))
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=30)

    async def main():
        async with AsyncLLM(llm) as engine:
            rid = await engine.submit("Hello", params)
            with pytest.raises(WorkerError) as running:
                async for delta in engine.stream(rid):
                    if delta.token_ids and llm.executor.pool.processes[1].is_alive():
                        llm.executor.pool.processes[1].kill()
            engine._thread.join(10)
            healthy = engine.healthy()
            later = await engine.submit("Hi", params)
            with pytest.raises(WorkerError) as after:
                [d async for d in engine.stream(later)]
            return running.value, after.value, healthy

    try:
        with caplog.at_level("INFO"):
            running, after, healthy = asyncio.run(main())
        with pytest.raises(WorkerError, match="rank 1"):  # the sync API: the same error
            llm.generate("Hi", params)
    finally:
        llm.close()
    assert str(running).startswith("rank 1 (tp 1, stage 0) died: killed by SIGKILL")
    assert str(after) == str(running) and not healthy
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None


def wait_gone(pids: list[int], seconds: float = 10) -> bool:
    """Collect garbage until every pid has exited (True) or ``seconds`` passed."""
    import gc

    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


def test_an_engine_dropped_without_close_releases_its_workers(engines):
    """The pool's monitor thread holds the pool; the engine's finalizer kills its workers when
    the LLM (alone, or under an AsyncLLM never closed) is collected."""
    from kiln.runtime import LLM, AsyncLLM

    llm = LLM(engines(2, 1), ExecutorOptions(device="cpu"))
    llm.generate([1, 2, 3], SamplingParams(max_tokens=2))
    pids = [p.pid for p in llm.executor.pool.processes.values()]
    del llm
    assert wait_gone(pids)
    engine = AsyncLLM(LLM(engines(2, 1), ExecutorOptions(device="cpu")))
    pids = [p.pid for p in engine.llm.executor.pool.processes.values()]
    thread = engine._thread
    del engine
    assert wait_gone(pids)
    thread.join(timeout=10)  # told to stop by the finalizer; it ends at its next wake-up
    assert not thread.is_alive()


def run_python(source: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(source)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(path: Path, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return path.read_text()


def test_workers_end_with_their_killed_driver(engines, tmp_path):
    """SIGKILL (the OOM killer, a CI timeout) gives the driver no chance to stop its ranks:
    they notice it is gone, mid-step or idle, and exit."""
    pids = tmp_path / "pids"
    driver = run_python(f"""
        import multiprocessing
        from kiln.runtime.core import EngineCore
        from kiln.runtime.loader import ExecutorOptions, open_engine
        from kiln.runtime.params import SamplingParams

        _, executor = open_engine({str(engines(2, 2))!r}, ExecutorOptions(device="cpu"))
        core = EngineCore(executor)
        for step in range(100_000):
            if not core.has_work():
                core.add_request([1, 2], SamplingParams(ignore_eos=True, max_tokens=30))
            core.step()
            if step == 3:
                pids = [str(p.pid) for p in multiprocessing.active_children()]
                with open({str(pids)!r} + ".tmp", "w") as f:
                    f.write(" ".join(pids))
                import os
                os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
    """)
    workers = [int(p) for p in wait_for(pids).split()]
    assert len(workers) == 3
    driver.kill()
    driver.communicate()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in workers)


def test_a_child_ends_with_its_killed_driver_while_it_still_imports(tmp_path):
    """A spawned child detaches (ends with its parent) before it imports its entry: a retest's
    driver SIGKILLed while its ranks imported torch had left them running 2.7-6 s."""
    importing = tmp_path / "importing"
    (tmp_path / "slow_entry.py").write_text(
        f"import time\nopen({str(importing)!r}, 'w').close()\n"
        f"time.sleep(60)  # an import that takes long (torch, on a busy machine)\n"
        f"def main(spec):\n    pass\n")
    pids = tmp_path / "pids"
    driver = run_python(f"""
        import multiprocessing, os, pickle, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from kiln.runtime.distributed.process import spawned, start

        if __name__ == "__main__":
            process = multiprocessing.get_context("spawn").Process(
                target=spawned, args=(os.getpid(), False, "slow_entry:main", pickle.dumps(None)))
            start(process)
            with open({str(pids)!r} + ".tmp", "w") as f:
                f.write(str(process.pid))
            os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
            process.join()
    """)
    child = int(wait_for(pids))
    wait_for(importing)
    driver.kill()
    driver.wait()  # (not communicate: the child holds the driver's pipes until it ends)
    gone_by = time.monotonic() + 3  # PARENT_POLL_S 0.5, with room for a busy machine
    while alive(child) and time.monotonic() < gone_by:
        time.sleep(0.05)
    left = alive(child)
    if left:
        os.kill(child, signal.SIGKILL)  # (not left to sleep on after a failure)
    assert not left


def test_a_child_starts_with_the_group_signals_blocked_even_the_first(tmp_path):
    """The group's signals stay blocked until the child's detach, in the first child too:
    multiprocessing's resource tracker, started by the first spawn, had unblocked SIGINT and
    SIGTERM in the driver during that start, so its child came up with only SIGHUP blocked."""
    (tmp_path / "mask_entry.py").write_text(
        "import signal\n"
        "def report():\n"
        "    print(sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),\n"
        "          flush=True)\n")
    driver = run_python(f"""
        import multiprocessing, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import mask_entry
        from kiln.runtime.distributed.process import start

        if __name__ == "__main__":
            for _ in range(2):
                process = multiprocessing.get_context("spawn").Process(target=mask_entry.report)
                start(process)
                process.join()
    """)
    out, err = driver.communicate(timeout=60)
    assert driver.returncode == 0, err
    assert out.splitlines() == ["['SIGHUP', 'SIGINT', 'SIGTERM']"] * 2


def test_a_driver_that_exits_with_its_children_running_ends_them(tmp_path):
    """multiprocessing ends a driver's daemon children at its exit with SIGTERM, then waits for
    them: a child that ignored every SIGTERM (a group's stop) had hung that exit (a script
    whose engine was never closed)."""
    (tmp_path / "idle_entry.py").write_text("import time\ndef main(spec):\n    time.sleep(60)\n")
    driver = run_python(f"""
        import multiprocessing, sys, time
        sys.path.insert(0, {str(tmp_path)!r})
        from kiln.runtime.distributed.process import spawn_args, spawned, start

        if __name__ == "__main__":
            process = multiprocessing.get_context("spawn").Process(
                target=spawned, args=spawn_args("idle_entry:main", None), daemon=True)
            start(process)
            time.sleep(1.5)  # past its detach; then the interpreter exits, the child running
            print(process.pid, flush=True)
    """)
    try:
        out, _ = driver.communicate(timeout=20)
    finally:
        driver.kill()
    assert driver.returncode == 0 and not alive(int(out.split()[0]))


@pytest.mark.parametrize("by_main_thread", [True, False])
def test_a_stopped_child_ends_with_its_killed_driver_and_ignores_a_group_sigterm(tmp_path,
                                                                                by_main_thread):
    """Retest 44d: a SIGSTOPped replica had outlived its SIGKILLed server (its watching thread
    cannot run), under setsid; and systemd's SIGTERM to every process of the unit had killed
    the replicas under a request. A child the driver's main thread started is killed by Linux
    (PR_SET_PDEATHSIG); one another thread started still ends by its watch, once it runs."""
    (tmp_path / "idle_entry.py").write_text("import time\ndef main(spec):\n    time.sleep(60)\n")
    pids = tmp_path / "pids"
    driver = run_python(f"""
        import multiprocessing, os, pickle, sys, threading
        sys.path.insert(0, {str(tmp_path)!r})
        from kiln.runtime.distributed.process import spawn_args, spawned, start

        def go():
            process = multiprocessing.get_context("spawn").Process(
                target=spawned, args=spawn_args("idle_entry:main", None))
            start(process)
            with open({str(pids)!r} + ".tmp", "w") as f:
                f.write(str(process.pid))
            os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
            process.join()

        if __name__ == "__main__":
            if {by_main_thread}:
                go()
            else:
                threading.Thread(target=go).start()
    """, start_new_session=True)  # (no terminal's group to wake the stopped child)
    child = int(wait_for(pids))
    time.sleep(1.0)  # past its detach
    try:
        os.kill(child, signal.SIGTERM)  # a service manager's stop: the driver stops it
        time.sleep(0.5)
        assert alive(child)
        os.kill(child, signal.SIGSTOP)
        driver.kill()
        driver.wait()
        gone_by = time.monotonic() + 3
        while alive(child) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert alive(child) != by_main_thread  # another thread's child: stopped, it waits
        if not by_main_thread:
            os.kill(child, signal.SIGCONT)  # running again, its watch ends it
            gone_by = time.monotonic() + 3
            while alive(child) and time.monotonic() < gone_by:
                time.sleep(0.05)
            assert not alive(child)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_ctrl_c_stops_every_rank_and_kiln_run_exits_130(engines, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the workers ignore it, the driver
    stops them all. It lands mid-step (in the driver's forward, between two all-reduces), so
    the worker waits in a collective the driver never joins: it is killed."""
    pids = tmp_path / "pids"
    cli = run_python(f"""
        import multiprocessing, os, signal
        from kiln.runtime.distributed import comm

        all_reduce = comm.DistCollectives.all_reduce
        count = [0]

        def interrupted(self, x):
            count[0] += 1
            if count[0] == 10:
                with open({str(pids)!r}, "w") as f:
                    f.write(" ".join(str(p.pid) for p in multiprocessing.active_children()))
                os.killpg(0, signal.SIGINT)  # after the write: the file is complete
            return all_reduce(self, x)

        comm.DistCollectives.all_reduce = interrupted
        from kiln.cli.main import run
        run(["run", "--engine_dir", {str(engines(2, 1))!r}, "--device", "cpu",
             "--input_text", "Hello there", "--max_output_len", "20", "--ignore_eos"])
    """, start_new_session=True)
    _, stderr = cli.communicate(timeout=120)
    assert time.time() - pids.stat().st_mtime < 5  # the interrupt ended the run at once
    assert cli.returncode == 130, stderr
    assert "interrupted (Ctrl-C)" in stderr and "Traceback" not in stderr
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 1 and not alive(workers[0])


def test_a_script_without_the_main_guard_is_told_to_add_it(engines, tmp_path):
    """The spawned rank imports the script again and would open the engine again: it exits
    at once, and the driver's last line says what to do (not multiprocessing's traceback)."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from kiln.runtime import LLM, ExecutorOptions
        llm = LLM({str(engines(2, 1))!r}, ExecutorOptions(device="cpu"))
        print(llm.generate("Hi")[0].text)
    """))
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln.runtime.errors.WorkerError: rank 1 (tp 1, stage 0) died while "
                           "starting: the script that opened the engine has no 'if __name__ == "
                           "\"__main__\":' guard"), result.stderr
    assert "bootstrapping" not in result.stderr


def test_kiln_run_of_a_tp2_engine_on_the_cpu(engines):
    result = subprocess.run([sys.executable, "-m", "kiln.cli.main", "run", "--engine_dir",
                             str(engines(2, 1)), "--device", "cpu", "--input_text", "Hi",
                             "--max_output_len", "5", "--ignore_eos"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "5 tokens, 1 request, finish: length" in result.stderr
    assert "for speed run it on 2 CUDA GPUs (2 ranks" in result.stderr  # not an onnx engine
    assert "--backend onnx" not in result.stderr


def test_a_cuda_engine_of_more_ranks_than_gpus_is_refused_saying_how_many(engines):
    engine = engines(2, 2)
    one_gpu = MachineInfo(kiln_version=read_manifest(engine).kiln_version, gpus=((9, 0),))
    with pytest.raises(EngineError) as info:
        open_engine(engine, ExecutorOptions(device="cuda"), machine=one_gpu)
    assert str(info.value) == (
        "this torch engine has 4 ranks (tp 2 x pp 2), one process each and one GPU per process, "
        "and 1 CUDA GPU(s) are visible here; run it where 4 GPUs are visible, or rebuild from a "
        "checkpoint converted with fewer ranks (--tp_size/--pp_size)")


def test_a_multi_rank_engine_without_a_gpu_is_told_to_pass_device_cpu(engines):
    """Not an onnx engine (ONNX Runtime runs tp 1 only); --device cuda names the GPUs needed."""
    engine = engines(2, 1)
    no_gpu = MachineInfo(kiln_version=read_manifest(engine).kiln_version)
    with pytest.raises(EngineError) as auto:
        open_engine(engine, ExecutorOptions(), machine=no_gpu)
    assert str(auto.value).startswith(
        "this torch engine needs 2 CUDA GPUs (2 ranks, tp 2 x pp 1, one GPU each) for its Triton "
        "kernels, and none is visible here; pass device='cpu' to run its ranks on the CPU")
    assert "onnx" not in str(auto.value).split("slower")[0]
    with pytest.raises(EngineError) as cuda:
        open_engine(engine, ExecutorOptions(device="cuda"), machine=no_gpu)
    assert str(cuda.value).startswith(
        "no CUDA GPU is visible, and this torch engine needs 2 CUDA GPUs (2 ranks, tp 2 x pp 1, "
        "one GPU each); run it where they are visible, or pass device='cpu' to run")
    from kiln.errors import options_as_flags

    with options_as_flags(), pytest.raises(EngineError) as cuda:  # kiln run's words
        open_engine(engine, ExecutorOptions(device="cuda"), machine=no_gpu)
    assert "or pass --device cpu to run its ranks" in str(cuda.value)


@pytest.mark.parametrize("rank, message", [
    (5, "rank 5 is not a rank of this engine, which has 2 (0 to 1); leave rank out (0)"),
    (1, "rank must be 0 for a torch engine, found 1: the process that opens it is the driver "
        "(rank 0) and starts the engine's other ranks itself; leave rank out")])
def test_a_rank_option_other_than_0_is_refused_for_a_torch_engine(engines, rank, message):
    with pytest.raises(EngineError) as info:
        open_engine(engines(2, 1), ExecutorOptions(device="cpu", rank=rank))
    assert str(info.value) == message


def test_exit_causes():
    assert exit_cause(-9).startswith("died: killed by SIGKILL (sent by a user, or by the kernel")
    assert exit_cause(-15) == "died: killed by SIGTERM"
    assert exit_cause(1) == "died: exited with code 1"


@pytest.mark.parametrize("given", [Wording(), Wording(as_flags=True),
                                   Wording(limits_as_options=True)])
def test_a_rank_words_its_messages_as_its_driver_does(monkeypatch, given):
    """A rank process's messages word options and limits as its driver's do (kiln run
    --tp_size 2: the flags; kiln.errors.wording), as kiln serve's replicas."""
    from kiln.runtime.distributed import pool, worker

    started = []

    def start(process):
        started.append(pickle.loads(process._args[3]))  # (spawned's payload)
        raise RuntimeError("not started")

    monkeypatch.setattr(pool, "start", start)
    with worded(given), pytest.raises(RuntimeError, match="not started"):
        pool.WorkerPool(2)
    assert [spec.wording for spec in started] == [given]

    seen = []
    monkeypatch.setattr(worker, "_serve", lambda spec, end: seen.append(wording()))
    monkeypatch.setattr(worker.os, "_exit", lambda code: None)
    worker.main(started[0], mock.Mock(), [0, 0])
    assert seen == [given] and wording() == Wording()
