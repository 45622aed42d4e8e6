"""Ctrl-C, SIGTERM and SIGHUP: every command stops within about a second and leaves nothing
behind.

Contract:
- SIGINT raises :class:`KeyboardInterrupt` (Python's default); SIGTERM and SIGHUP (a closed
  terminal, a dropped SSH session) raise :class:`Terminated`, a subclass that names its signal,
  once :func:`install_termination_signals` ran (the CLI does). All unwind through ``finally``
  blocks, so temporary outputs are removed (kiln.output_dirs.atomic_dir); the CLI exits 130, 143
  or 129 (:func:`exit_code`).
- Native calls that run Python callbacks and swallow their exceptions (TensorRT's builder logs
  ``Exception caught in log(): KeyboardInterrupt`` and carries on) run inside
  :func:`deferred_interrupts`: any of the three signals only sets a flag, the callee polls it
  (TensorRT's progress monitor cancels the build) and the interrupt is raised when the call
  returns.

- A signal the process was started with ignored (``SIG_IGN``) stays ignored wherever kiln
  installs handlers (:func:`catchable`): ``nohup``'s SIGHUP, a shell's ``trap '' INT``, SIGINT
  in a background job of a non-interactive shell; Python leaves an ignored SIGINT alone too.

- A long native call that runs no Python and holds no GIL (an ONNX Runtime run: a 2,048-token
  window took 7.5 s on a 2-core CPU) runs through :func:`interruptible`: in a worker thread
  while the main thread waits, where the signal's handler runs; the interrupt cancels the call
  (ONNX Runtime's ``RunOptions.terminate``, checked between nodes), waits for it to end and is
  raised.

Non-goals: interrupting other native code that never calls back into Python (it is interrupted
when it returns).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

# signals that end a command like Ctrl-C does; SIGHUP does not exist on Windows
TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                    if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM or SIGHUP (``signum``)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signal.Signals(signum)


def signal_name(interrupt: KeyboardInterrupt) -> str:
    """What the user is told stopped the command: "Ctrl-C", "SIGTERM" or "SIGHUP"."""
    return interrupt.signum.name if isinstance(interrupt, Terminated) else "Ctrl-C"


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
    number = interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT
    return 128 + int(number)


def interrupt_in(error: BaseException | None) -> KeyboardInterrupt | None:
    """The interrupt anywhere in ``error``'s cause/context chain: a library that catches it
    in its own import or callback re-raises its own error (onnxruntime's native import:
    ``ImportError: initialization failed``, caused by the Ctrl-C)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def catchable(signals: tuple[int, ...]) -> tuple[int, ...]:
    """``signals`` less those this process ignores: what its parent set to ``SIG_IGN`` for it
    (``nohup kiln serve ...`` must outlive the terminal) is not kiln's to catch."""
    return tuple(s for s in signals if signal.getsignal(s) is not signal.SIG_IGN)


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def install_termination_signals() -> None:
    """Make SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (no-op in other
    threads), unless ignored (:func:`catchable`)."""
    if threading.current_thread() is threading.main_thread():
        for number in catchable(TERMINATING):
            signal.signal(number, _raise_terminated)


@contextmanager
def deferred_interrupts() -> Iterator[Callable[[], bool]]:
    """Yield ``pending()``: True once SIGINT, SIGTERM or SIGHUP arrived during the body, which is
    then ended by raising the interrupt when the body returns (see the module docstring)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signals are delivered to the main thread only
        return

    def remember(signum, frame) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, remember) for s in catchable((signal.SIGINT, *TERMINATING))}
    try:
        yield lambda: bool(received)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        raise KeyboardInterrupt() if received[0] == signal.SIGINT else Terminated(received[0])


_native_worker: concurrent.futures.ThreadPoolExecutor | None = None
_native_worker_lock = threading.Lock()


def _forget_native_worker() -> None:
    """In a forked child: the parent's worker thread is not there (a submit would wait for it
    for ever); the next call starts the child's own."""
    global _native_worker, _native_worker_lock
    _native_worker, _native_worker_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_native_worker)


def interruptible(call: Callable[[], T], cancel: Callable[[], None]) -> T:
    """``call()``, a native call that runs no Python and releases the GIL, made to stop within
    about a second of a signal (see the module docstring). On the main thread it runs in a
    worker while the main thread waits for it; an interrupt there calls ``cancel()``, which
    must make ``call`` return soon (its error, if any, is dropped), waits for it and is raised.
    Elsewhere it is ``call()`` (signals reach the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return call()
    global _native_worker
    with _native_worker_lock:
        if _native_worker is None:
            _native_worker = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="kiln-native")
    future = _native_worker.submit(call)
    try:
        return future.result()
    except KeyboardInterrupt:
        cancel()
        while True:  # the call uses what its caller will now tear down: let it end first
            try:
                concurrent.futures.wait([future])
                break
            except KeyboardInterrupt:  # a second Ctrl-C: the cancelled call ends soon anyway
                continue
        raise
