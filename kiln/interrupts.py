"""Ctrl-C and SIGTERM: every command stops within about a second and leaves nothing behind.

Contract:
- SIGINT raises :class:`KeyboardInterrupt` (Python's default) and SIGTERM raises
  :class:`Terminated`, a subclass, once :func:`install_sigterm` ran (the CLI does). Both unwind
  through ``finally`` blocks, so temporary outputs are removed (kiln.output_dirs.atomic_dir); the
  CLI exits 130 or 143 (:func:`exit_code`).
- Native calls that run Python callbacks and swallow their exceptions (TensorRT's builder logs
  ``Exception caught in log(): KeyboardInterrupt`` and carries on) run inside
  :func:`deferred_interrupts`: a signal only sets a flag, the callee polls it (TensorRT's
  progress monitor cancels the build) and the interrupt is raised when the call returns.

Non-goals: interrupting native code that never calls back into Python (it is interrupted when
it returns).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
    number = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
    return 128 + int(number)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def install_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (no-op in other threads)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextmanager
def deferred_interrupts() -> Iterator[Callable[[], bool]]:
    """Yield ``pending()``: True once SIGINT or SIGTERM arrived during the body, which is then
    ended by raising the interrupt when the body returns (see the module docstring)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signals are delivered to the main thread only
        return

    def remember(signum, frame) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, remember) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(received)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        raise Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()
