"""Ctrl-C, SIGTERM and SIGHUP stop a command promptly, leave nothing behind, and exit 130 / 143
/ 129.

Each case runs the real CLI in a subprocess that sends the signal to itself at a chosen point
(inside TensorRT's native build, in the middle of a conversion), so the timing is exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kiln.interrupts import (
    TERMINATING,
    Terminated,
    deferred_interrupts,
    exit_code,
    install_termination_signals,
    interruptible,
    signal_name,
)
from tests.models import hf_model, kiln_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "model")


def run_cli(patch: str, args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``kiln ARGS`` in a subprocess after ``patch`` (Python source) and time it."""
    script = textwrap.dedent(patch) + textwrap.dedent(f"""
        import sys
        from kiln.cli.main import run
        run({args!r})
    """)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    return result, time.perf_counter() - started


def tensorrt_build(tmp_path: Path, ckpt: Path, in_monitor: str) -> tuple[list[str], dict]:
    """The command and environment of a TensorRT build whose progress monitor runs
    ``in_monitor`` (Python, with ``m`` the monitor) when it is made, in every process of the
    command (a sitecustomize module: the spawned build worker included)."""
    site = tmp_path / "site"
    site.mkdir()
    body = textwrap.indent(textwrap.dedent(in_monitor), " " * 4)
    (site / "sitecustomize.py").write_text(
        "import multiprocessing, os, signal, time\n"
        "from kiln.builder import tensorrt_backend\n\n"
        "made = tensorrt_backend._progress_monitor\n\n"
        "def monitor(*args):\n"
        "    m = made(*args)\n"
        f"{body}\n"
        "    return m\n\n"
        "tensorrt_backend._progress_monitor = monitor\n")
    command = [sys.executable, "-m", "kiln.cli.main", "build", "--checkpoint_dir", str(ckpt),
               "--output_dir", str(tmp_path / "engine"), "--backend", "tensorrt", "--target",
               "sm86", "--max_batch_size", "2", "--max_seq_len", "16"]
    return command, {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def sent_while_converting(signum: int, ignored: bool = False) -> str:
    """A patch (for :func:`run_cli`) that sends ``signum`` to the process from inside the
    conversion's first write; ``ignored``: with the signal ignored from the start, as ``nohup``
    (SIGHUP) or ``trap ''`` leave it at exec."""
    ignore = f"signal.signal({int(signum)}, signal.SIG_IGN)" if ignored else ""
    return f"""
        import os, signal
        {ignore}
        from kiln.converters import convert

        write = convert._Placement.write

        def interrupted(self, row, chunk):
            os.kill(os.getpid(), {int(signum)})
            return write(self, row, chunk)

        convert._Placement.write = interrupted
    """


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_exit_codes():
    assert exit_code(KeyboardInterrupt()) == 130
    assert exit_code(Terminated()) == 143
    assert exit_code(Terminated(signal.SIGHUP)) == 129
    assert signal_name(Terminated(signal.SIGHUP)) == "SIGHUP"
    assert signal_name(KeyboardInterrupt()) == "Ctrl-C"


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                         (signal.SIGHUP, 129)])
def test_deferred_interrupts_raise_when_the_native_call_returns(signum, code):
    with pytest.raises(KeyboardInterrupt) as info:
        with deferred_interrupts() as pending:
            assert not pending()
            os.kill(os.getpid(), signum)
            assert pending()  # the handler ran: the body goes on until it returns
    assert exit_code(info.value) == code
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def endless_onnx_run():
    """An ONNX Runtime session of a Loop of 10^12 small matrix products (one native call that
    runs until cancelled) and its run options."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    square = [64, 64]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "w"], ["x_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, square)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, square)],
        [numpy_helper.from_array(np.full(square, 1e-3, np.float32), "w")])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)], "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, square)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, square)],
        [numpy_helper.from_array(np.array(10**12, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    options = ort.RunOptions()
    options.log_severity_level = 4
    return (lambda: session.run(None, {"x": np.eye(64, dtype=np.float32)}, options)), options


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_cancels_a_native_onnx_runtime_run(signum, code):
    """A long ONNX Runtime run (a 2,048-token window on a CPU: seconds) holds no GIL and runs
    no Python: the signal's handler runs in the waiting main thread and cancels the run."""
    run, options = endless_onnx_run()
    cancelled = threading.Event()

    def cancel() -> None:
        cancelled.set()
        options.terminate = True

    kill = threading.Timer(0.5, os.kill, (os.getpid(), signum))
    # if the signal never reached the run, it would not end: end it after 30 s, and fail
    watchdog = threading.Timer(30, setattr, (options, "terminate", True))
    previous = {n: signal.getsignal(n) for n in TERMINATING}
    install_termination_signals()  # SIGTERM raises Terminated, as in the CLI
    started = time.perf_counter()
    kill.start()
    watchdog.start()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            interruptible(run, cancel)
    finally:
        watchdog.cancel()
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert cancelled.is_set() and exit_code(info.value) == code
    assert time.perf_counter() - started < 10


def test_interruptible_off_the_main_thread_is_the_call_itself():
    seen = []
    worker = threading.Thread(target=lambda: seen.append(
        (interruptible(threading.current_thread, lambda: None), threading.current_thread())))
    worker.start()
    worker.join()
    assert seen[0][0] is seen[0][1]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_tensorrt_build_stops_it(hf_dir, tmp_path, signum, code):
    """TensorRT swallows exceptions raised in its callbacks and runs native phases for minutes
    without one; the build runs in a worker process, which the interrupt ends. SIGINT goes to
    the whole process group (a terminal's Ctrl-C), SIGTERM to the kiln process only."""
    pytest.importorskip("tensorrt_rtx")
    ckpt = kiln_checkpoint(hf_dir, tmp_path / "ckpt")
    command, env = tensorrt_build(tmp_path, ckpt, f"""
        step = m.step_complete

        def step_complete(phase, i):  # once, from inside the worker's native build
            if multiprocessing.parent_process() is not None and not hasattr(m, "sent"):
                m.sent = True
                with open({str(tmp_path / "sent")!r}, "w") as f:
                    f.write(str(time.time()))
                if {int(signum)} == signal.SIGINT:
                    os.killpg(0, signal.SIGINT)
                else:
                    os.kill(os.getppid(), signal.SIGTERM)
                time.sleep(60)  # a native phase without callbacks: only a kill ends it
            return step(phase, i)

        m.step_complete = step_complete
    """)
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300, start_new_session=True)
    ended = time.time()
    assert result.returncode == code, result.stderr
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert ended - float((tmp_path / "sent").read_text()) < 3.0
    assert not (tmp_path / "engine").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("signum,code,told", [(signal.SIGINT, 130, "Ctrl-C"),
                                              (signal.SIGTERM, 143, "SIGTERM"),
                                              (signal.SIGHUP, 129, "SIGHUP")])
def test_a_signal_during_conversion_leaves_nothing(hf_dir, tmp_path, signum, code, told):
    """SIGHUP is a closed terminal or a dropped SSH session: Python's default would end the
    process at once, leaving the temporary output behind."""
    out = tmp_path / "ckpt"
    result, seconds = run_cli(sent_while_converting(signum),
                              ["convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir",
                               str(out)])
    assert result.returncode == code, result.stderr
    assert f"interrupted ({told})" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT],
                         ids=["SIGHUP", "SIGTERM", "SIGINT"])
def test_a_signal_ignored_at_start_stays_ignored(hf_dir, tmp_path, signum):
    """``nohup kiln convert_checkpoint ... &`` must outlive the terminal: a signal the process
    was started with ignored (nohup's SIGHUP, a shell's ``trap '' INT``) is not caught. The
    conversion that receives it in its middle finishes (kiln had made SIGHUP end it, 129)."""
    out = tmp_path / "ckpt"
    result, _ = run_cli(sent_while_converting(signum, ignored=True),
                        ["convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir",
                         str(out)])
    assert result.returncode == 0, result.stderr
    assert "interrupted" not in result.stderr
    assert (out / "config.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_deferred_interrupts_leave_an_ignored_signal_ignored(signum):
    before = signal.signal(signum, signal.SIG_IGN)
    try:
        with deferred_interrupts() as pending:
            os.kill(os.getpid(), signum)
            assert not pending()
        assert signal.getsignal(signum) is signal.SIG_IGN
    finally:
        signal.signal(signum, before)


CONSOLE_SCRIPT = """
    import sys
    sys.argv[0] = "/venv/bin/kiln"  # as the console script starts
    import kiln.cli
"""


def test_ctrl_c_while_kiln_starts_is_one_line_and_130():
    """A trial's Ctrl-C 0.07 s into `kiln run` printed a traceback of the import it stopped."""
    script = textwrap.dedent(CONSOLE_SCRIPT) + textwrap.dedent("""
        import os, signal, time
        os.kill(os.getpid(), signal.SIGINT)  # as click and the command's module import
        time.sleep(30)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr) == (130, "interrupted (Ctrl-C)\n")


@pytest.mark.parametrize("command", ["run", "convert_checkpoint"])
@pytest.mark.parametrize("signum, code, told", [(signal.SIGINT, 130, "Ctrl-C"),
                                                 (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_during_the_heavy_imports_ends_the_command_at_once(tmp_path, signum, code,
                                                                   told, command):
    """Before a command's work, nothing is written: a signal while torch imports exits at once
    (a trial's Ctrl-C then took up to 1.5 s: it had waited for the import's end; convert's,
    not wrapped as the lazy commands are, had been lost or ended in a traceback). Here the
    import stalls for 60 s."""
    args = ["run", "--engine_dir", str(tmp_path), "--input_text", "hi"] if command == "run" \
        else ["convert_checkpoint", "--model_dir", str(tmp_path), "--output_dir",
              str(tmp_path / "out")]
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time

        class SlowTorch:  # a finder that stalls torch's import
            def find_spec(self, name, path=None, target=None):
                if name == "torch":  # the handler the import runs under, then the signal
                    print(getattr(signal.getsignal(signal.SIGINT), "__name__", None), flush=True)
                    threading.Timer(0.5, os.kill, (os.getpid(), {int(signum)})).start()
                    time.sleep(60)
                return None

        sys.meta_path.insert(0, SlowTorch())
        from kiln.cli.main import run
        sys.argv = ["kiln", *{args!r}]
        run()
    """)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=50)
    assert time.monotonic() - start < 30, result.stderr  # not the 60 s of the stalled import
    assert (result.returncode, result.stderr) == (code, f"interrupted ({told})\n")
    # (a KeyboardInterrupt in a pure-Python stall would end it too: the handler says which)
    assert result.stdout == "_exit_now\n" and not (tmp_path / "out").exists()


def test_the_console_script_s_command_still_cleans_up_on_ctrl_c(hf_dir, tmp_path):
    """Once the command begins, Ctrl-C is Python's KeyboardInterrupt again: the command
    removes what it was writing (the start-up handler would exit at once)."""
    patch = textwrap.dedent(CONSOLE_SCRIPT) + textwrap.dedent(
        sent_while_converting(signal.SIGINT))
    out = tmp_path / "ckpt"
    result, _ = run_cli(patch, ["convert_checkpoint", "--model_dir", str(hf_dir),
                                "--output_dir", str(out)])
    assert result.returncode == 130, result.stderr
    assert "interrupted (Ctrl-C)" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_ctrl_c_during_onnx_runtime_optimization_stops_at_once(hf_dir, tmp_path):
    """ONNX Runtime optimizes in native code for minutes on large models: it runs in a child
    process that the interrupt stops."""
    ckpt = kiln_checkpoint(hf_dir, tmp_path / "ckpt")
    patch = f"""
        import os, signal, subprocess, time
        from kiln.builder import onnx_backend

        class Popen(subprocess.Popen):
            def communicate(self, *args, **kwargs):
                with open({str(tmp_path / "sent")!r}, "w") as f:
                    f.write(str(time.time()))
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)  # the child's optimization, as long as a large model's

        onnx_backend.subprocess.Popen = Popen
    """
    out = tmp_path / "engine"
    result, _ = run_cli(patch, ["build", "--checkpoint_dir", str(ckpt), "--output_dir",
                                str(out), "--max_batch_size", "2", "--max_seq_len", "16"])
    assert result.returncode == 130, result.stderr
    assert time.time() - float((tmp_path / "sent").read_text()) < 3.0
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_build_worker_dies_with_its_killed_parent(hf_dir, tmp_path):
    """SIGKILL (the OOM killer, a CI timeout) cannot be handled by the parent; its TensorRT
    worker must not build on and then wait forever for its next job."""
    pytest.importorskip("tensorrt_rtx")
    ckpt = kiln_checkpoint(hf_dir, tmp_path / "ckpt")
    command, env = tensorrt_build(tmp_path, ckpt, f"""
        with open({str(tmp_path / "worker.tmp")!r}, "w") as f:
            f.write(str(os.getpid()))
        os.replace({str(tmp_path / "worker.tmp")!r}, {str(tmp_path / "worker")!r})  # whole
        time.sleep(120)  # a long native phase
    """)
    parent = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "worker").exists() and time.time() < deadline:
        time.sleep(0.2)
    worker = int((tmp_path / "worker").read_text())
    parent.kill()
    parent.wait()
    deadline = time.time() + 5
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_an_interrupted_command_exits_without_waiting_for_the_interpreters_teardown(tmp_path):
    """The console entry point exits at once after a signal's message: a thread still running
    (a reader stuck in I/O) and slow teardown (torch's, ONNX Runtime's: 0.5-1 s on 2 cores) are
    not waited for. Buffered output is flushed first."""
    patch = """
        import atexit, os, signal, sys, threading, time
        from kiln.cli import verify

        threading.Thread(target=time.sleep, args=(60,)).start()  # not a daemon: joined at exit
        atexit.register(time.sleep, 60)

        def interrupted(*args, **kwargs):
            sys.stdout.write("written before the signal")  # no newline: still in the buffer
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

        verify.read_manifest_data = interrupted
    """
    (tmp_path / "config.json").write_text('{"format_version": 1}')  # verify reads its manifest
    result, seconds = run_cli(patch, ["verify", str(tmp_path)])
    assert result.returncode == 143, result.stderr
    assert "interrupted (SIGTERM)" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "written before the signal"
    assert seconds < 30


def test_interruptible_in_a_forked_child_runs_there():
    """The worker thread is the parent's: a forked child's call had waited for it for ever."""
    assert interruptible(lambda: 1, lambda: None) == 1  # the parent's worker is up
    child = os.fork()
    if child == 0:  # the child: exit 0 if the call ran, else the watchdog's 3
        threading.Timer(10, os._exit, (3,)).start()
        os._exit(0 if interruptible(lambda: 2, lambda: None) == 2 else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_the_interrupted_command_exits_changes_nothing(hf_dir, tmp_path,
                                                                             second):
    """A retest's second Ctrl-C 0.1 s after the first reached ``logging.shutdown()`` on the way
    out: a traceback and exit -2 (or a tqdm ``__del__``'s "Exception ignored")."""
    patch = textwrap.dedent(sent_while_converting(signal.SIGINT)) + textwrap.dedent(f"""
        import logging, time
        shutdown = logging.shutdown

        def slow_shutdown(*args):
            os.kill(os.getpid(), {int(second)})  # while the exit flushes the logs
            time.sleep(0.5)
            shutdown(*args)

        logging.shutdown = slow_shutdown
    """)
    out = tmp_path / "ckpt"
    result, _ = run_cli(patch, ["convert_checkpoint", "--model_dir", str(hf_dir),
                                "--output_dir", str(out)])
    assert (result.returncode, result.stderr) == (130, "interrupted (Ctrl-C)\n")
    assert not out.exists() and leftovers(tmp_path) == []
