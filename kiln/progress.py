"""Progress bars on a terminal, progress lines in a log.

Every long kiln step (conversion, quantization, a build, checksums, a benchmark, an
evaluation) reports through :func:`progress_bar`. On a terminal it is a tqdm bar redrawn in
place. Anywhere else (a CI job's log, a pipe, a file) a bar redrawn with carriage returns
would be one ever-growing line, and no bar at all leaves a long job silent, which CI systems
read as a hang. There the same bar is written as a plain line every :data:`LOG_EVERY_S`
seconds, the first after that long: a long job is never silent, a short one writes nothing.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

LOG_EVERY_S = 30.0


class _Lines(io.TextIOBase):
    """A text stream that writes each of tqdm's redraws ("\\r" + the bar) as a line of its own,
    and drops the blank redraw that clears a finished bar."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar for a log. A line is drawn once :data:`LOG_EVERY_S` has passed since the last one
    (and the bar's delay since its start), whatever asks: an update, a forced redraw (a new
    description or postfix), or the bar's clock, a thread that wakes when the next line is
    due, so that one step longer than the interval (a large model's layer) does not leave the
    log silent until it ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._closed = threading.Event()
        self._line_at = float("-inf")  # when a line was last drawn (tqdm's own clock untouched)
        super().__init__(*args, **kwargs)
        threading.Thread(target=self._clock, name="progress-line", daemon=True).start()

    def _due(self) -> float:
        return max(self.start_t + self.delay, self._line_at + self.mininterval)

    def _clock(self) -> None:
        while not self._closed.wait(max(0.05, self._due() - self._time())):
            self.refresh()

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> bool | None:
        # tqdm's last_print_t is its update()'s and __iter__'s bookkeeping: moved from here,
        # an iterating bar counted some steps twice (a trial's "43layer" of 30)
        if hasattr(self, "start_t"):  # (not yet: tqdm's first draw, at no delay)
            now = self._time()
            if now < self._due():
                return False
            self._line_at = now
        return super().refresh(nolock=nolock, lock_args=lock_args)

    def close(self) -> None:
        closed = getattr(self, "_closed", None)  # None: a signal ended __init__ before it
        if closed is not None:
            closed.set()
        super().close()


def progress_bar(iterable: Iterable | None = None, *, show: bool | None,
                 **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on stderr. ``show`` False: nothing; None: a bar on a
    terminal only; True: a bar on a terminal, otherwise a line every :data:`LOG_EVERY_S` s
    (closing the bar, as ``with`` or the end of its iterable does, stops them)."""
    stream = sys.stderr
    if show is None:
        show = stream.isatty()
    if show and not stream.isatty():
        kwargs.update(file=_Lines(stream), mininterval=LOG_EVERY_S, ascii=True,
                      delay=max(kwargs.get("delay", 0.0), LOG_EVERY_S), dynamic_ncols=False)
        return _LogBar(iterable, **kwargs)
    if show and "ncols" not in kwargs and _columns(stream) == 0:  # tqdm would draw nothing (a
        kwargs.update(ncols=80, nrows=24, dynamic_ncols=False)  # trial's `script -c` said 0)
    return tqdm(iterable, disable=not show, **kwargs)


def _columns(stream: Any) -> int | None:
    """The terminal width ``stream`` reports (0 from a pseudo-terminal never sized), or None."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return None


def report_line(line: str, *, show: bool, started: float) -> None:
    """Write a finished step's ``line`` (e.g. one part of a build) to stderr when ``show``: on a
    terminal always, in a log once the work (begun at ``time.perf_counter()`` ``started``) has
    run :data:`LOG_EVERY_S`, as a bar would be."""
    if show and (sys.stderr.isatty() or time.perf_counter() - started >= LOG_EVERY_S):
        print(line, file=sys.stderr, flush=True)
