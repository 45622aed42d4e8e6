"""What every worker process kiln spawns shares: how it starts, how it ends with its driver, and
how its end is told.

- :func:`start` starts a spawned process with SIGINT, SIGHUP and SIGTERM blocked
  (:data:`GROUP_SIGNALS`, the signals sent to a whole process group: a terminal's Ctrl-C, a
  closed window, a service manager's stop, which systemd sends every process of the unit): the
  child inherits the blocked signals through fork and exec, so one that arrives while the child
  starts Python and imports torch stays pending until :func:`detach` makes the child ignore it
  (a handler would be reset by exec). The driver stops its workers itself (a retest's SIGTERM
  to ``kiln serve --dp 2``'s group had killed the replicas under a request: a 500, not the
  drain); a SIGTERM the driver sends (multiprocessing's, to its daemon children at exit) still
  ends the child: a thread takes SIGTERM and tells the sender by its pid.
- :func:`detach` (first thing in the child): ignore those signals, drop pending ones, and start a
  thread that ends the process within :data:`PARENT_POLL_S` once the driver's pid is gone
  (killed outright: nothing else would stop a process blocked in a collective or a step). A
  child started by the driver's main thread also asks Linux for SIGKILL when the driver dies
  (``PR_SET_PDEATHSIG``, which reaches a stopped process, where the thread cannot run: a
  retest's SIGSTOPped replica had outlived its SIGKILLed server; the kernel sends it when the
  starting *thread* ends, so only the main thread's children ask).
  :func:`spawned` is every child's ``Process`` target: it detaches, then imports the child's
  own entry (a rank's, a replica's: torch, seconds on a busy machine) and runs it, so a driver
  killed while its children start up takes them with it within :data:`PARENT_POLL_S` (a retest's
  SIGKILL at start-up had left seven ranks running 2.7-6 s, until their imports ended). Their
  spec travels pickled (``payload``) for the same reason: unpickled after the detach.
- :func:`exit_cause` says how a process ended, from its exit code.
- A script that opens a multi-process engine without the ``if __name__ == "__main__":`` guard
  runs again in every process spawned for it (the spawn start method imports the parent's main
  module in the child), so the child opens the engine too and comes to :func:`start` while
  multiprocessing bootstraps it, where multiprocessing would raise its RuntimeError (a
  traceback, then exit code 1). :func:`start` ends such a child at once with
  :data:`UNGUARDED_EXIT`, which :func:`exit_cause` turns into the advice to add the guard.

Torch-free, so a replica can set its visible GPU before anything imports CUDA.
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from typing import Any

# what a terminal sends to its whole foreground process group (SIGHUP: not on Windows)
GROUP_SIGNALS = {signal.SIGINT, signal.SIGTERM} | (
    {signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
PR_SET_PDEATHSIG = 1  # linux/prctl.h: signal this process when its parent thread exits

PARENT_POLL_S = 0.5
UNGUARDED_EXIT = 87  # a spawned child that ran the unguarded script of its parent (see above)
UNGUARDED = ("died while starting: the script that opened the engine has no "
             "'if __name__ == \"__main__\":' guard, and every process the engine spawns imports "
             "that script again (multiprocessing's spawn start method), so it opened the engine "
             "once more; put the code that opens the engine under the guard")


def start(process: BaseProcess) -> None:
    """``process.start()`` with :data:`GROUP_SIGNALS` blocked until it returns (see the module
    docstring).
    In a child that multiprocessing is still bootstrapping (an unguarded script run again):
    exit with :data:`UNGUARDED_EXIT`."""
    # the test multiprocessing's own spawn._check_not_importing_main makes (CPython 3.8-3.13)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        os._exit(UNGUARDED_EXIT)
    if os.name == "posix":
        # the spawn starts multiprocessing's resource tracker the first time, and that start
        # unblocks SIGINT and SIGTERM in this thread on its way out: the child would be
        # spawned with them acting by default until its detach
        resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def spawned(parent_pid: int, by_main_thread: bool, entry: str, payload: bytes,
            *live: Any) -> None:
    """A spawned child's ``Process`` target: :func:`detach`, then ``entry`` (``module:name``)
    called with the unpickled ``payload`` and ``live`` (pipes and shared memory, which
    multiprocessing hands over at the spawn). ``by_main_thread``: the driver's main thread
    starts it (:func:`spawn_args`)."""
    detach(parent_pid, by_main_thread)
    module, _, name = entry.partition(":")
    getattr(importlib.import_module(module), name)(pickle.loads(payload), *live)


def spawn_args(entry: str, spec: Any, *live: Any) -> tuple:
    """:func:`spawned`'s arguments for a child of this process that runs ``entry`` on
    ``spec``, started by the thread that calls this."""
    return (os.getpid(), threading.current_thread() is threading.main_thread(), entry,
            pickle.dumps(spec), *live)


def detach(parent_pid: int, by_main_thread: bool = False) -> None:
    """In the child: ignore :data:`GROUP_SIGNALS` (pending ones are dropped) and end with the
    parent (killed by Linux if the parent's main thread started it: the module docstring)."""
    if by_main_thread and sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(3)
    ignored = GROUP_SIGNALS - {signal.SIGTERM}
    for number in ignored:
        signal.signal(number, signal.SIG_IGN)  # blocked since the spawn (start)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (before any thread starts)
        # SIGTERM stays blocked in every thread (those made later inherit the mask) and is
        # taken by one: the driver's ends the process (multiprocessing terminates its daemon
        # children at the driver's exit, then waits for them), anyone else's is dropped
        threading.Thread(target=_take_sigterm, args=(parent_pid,), daemon=True,
                         name="kiln-sigterm").start()
    else:  # (no sigwaitinfo, as on macOS: SIGTERM ends the child whoever sends it)
        ignored = GROUP_SIGNALS
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ignored)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="kiln-parent-watch").start()


def _take_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(128 + signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(3)  # the driver is gone (its pid is no longer our parent)


def exit_cause(code: int | None) -> str:
    """How a process ended, from its exit code (negative: the signal)."""
    if code is None:
        return "is gone"
    if code == UNGUARDED_EXIT:
        return UNGUARDED
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (sent by a user, or by the kernel's OOM killer when memory ran out)" \
            if -code == signal.SIGKILL else ""
        return f"died: killed by {name}{hint}"
    return f"died: exited with code {code}"
