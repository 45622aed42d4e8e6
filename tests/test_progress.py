"""kiln.progress: a bar on a terminal, plain lines in a log, nothing for a short job."""

import io
import sys

import pytest

import kiln.progress
from kiln.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def stderr(monkeypatch):
    def use(stream):
        monkeypatch.setattr(sys, "stderr", stream)
        return stream
    return use


def _run(total: int, **kwargs) -> None:
    with progress_bar(total=total, desc="job", **kwargs) as bar:
        for _ in range(total):
            bar.update(1)


def test_a_terminal_gets_a_bar_redrawn_in_place(stderr):
    out = stderr(_Terminal())
    _run(3, show=True)
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()


def test_a_log_gets_a_line_per_redraw_and_no_carriage_returns(stderr, monkeypatch):
    monkeypatch.setattr(kiln.progress, "LOG_EVERY_S", 0.0)
    out = stderr(io.StringIO())
    _run(3, show=True, leave=False)  # leave=False: the blank redraw that clears it is dropped
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and lines and all(line.startswith("job") for line in lines)
    assert "3/3" in lines[-1]


def test_a_short_job_writes_nothing_to_a_log(stderr):
    out = stderr(io.StringIO())
    _run(3, show=True)  # over in far less than LOG_EVERY_S
    assert out.getvalue() == ""


@pytest.mark.parametrize(("stream", "show"), [(_Terminal, False), (io.StringIO, None)])
def test_hidden_when_asked_or_when_only_a_terminal_may_show_it(stderr, monkeypatch, stream, show):
    monkeypatch.setattr(kiln.progress, "LOG_EVERY_S", 0.0)
    out = stderr(stream())
    _run(3, show=show)
    assert out.getvalue() == ""


def test_show_none_on_a_terminal_draws_the_bar(stderr):
    out = stderr(_Terminal())
    _run(3, show=None)
    assert "3/3" in out.getvalue()


def test_a_new_phase_name_waits_for_the_interval_in_a_log(stderr, monkeypatch):
    monkeypatch.setattr(kiln.progress, "LOG_EVERY_S", 3600.0)
    out = stderr(io.StringIO())
    with progress_bar(total=2, desc="graph", show=True, leave=False) as bar:
        bar.set_description_str("optimize")  # tqdm redraws at once, ignoring its delay
        bar.set_postfix_str("phase")
        bar.update(2)
    assert out.getvalue() == ""


@pytest.mark.parametrize(("stream", "ran_s", "shown"), [
    (_Terminal, 0.0, True), (io.StringIO, 0.0, False), (io.StringIO, 31.0, True)])
def test_a_finished_step_is_reported_on_a_terminal_or_once_the_work_is_long(
        stderr, stream, ran_s, shown):
    import time

    from kiln.progress import report_line

    out = stderr(stream())
    report_line("[1/2] part", show=True, started=time.perf_counter() - ran_s)
    report_line("[2/2] part", show=False, started=time.perf_counter() - ran_s)
    assert out.getvalue() == ("[1/2] part\n" if shown else "")


def test_a_log_gets_lines_on_a_clock_while_a_long_step_runs(stderr, monkeypatch):
    """One step longer than the interval (a large model's layer) still writes its lines."""
    import time

    monkeypatch.setattr(kiln.progress, "LOG_EVERY_S", 0.2)
    out = stderr(io.StringIO())
    with progress_bar(total=2, desc="quantize", show=True, leave=False) as bar:
        time.sleep(1.0)  # no update at all
        during = out.getvalue().splitlines()
        bar.update(2)
    time.sleep(0.5)
    assert len(during) >= 2 and all(line.startswith("quantize:   0%") for line in during)
    assert len(out.getvalue().splitlines()) <= len(during) + 2  # the clock stopped with it


def test_an_iterating_bar_counts_each_step_once_while_its_clock_draws(stderr, monkeypatch):
    """The clock's lines must not move tqdm's own bookkeeping: an iterating bar had counted
    steps twice (a trial's quantize showed "43layer" of 30, its total lost)."""
    import time

    monkeypatch.setattr(kiln.progress, "LOG_EVERY_S", 0.05)
    out = stderr(io.StringIO())
    bar = progress_bar(range(30), desc="quantize", show=True, leave=True)
    for _ in bar:
        time.sleep(0.02)
    assert bar.n == 30
    lines = out.getvalue().splitlines()
    assert lines and "30/30" in lines[-1]
    assert all("/30" in line for line in lines), lines  # the total is never lost


def test_a_terminal_that_reports_no_width_still_gets_a_bar(stderr):
    """A trial's `script -c` terminal said 0 columns: tqdm drew nothing through a 71 s run."""
    import os
    import select

    reader, writer = os.openpty()  # a pseudo-terminal never sized: 0 x 0
    try:
        with open(writer, "w", closefd=False) as stream:
            stderr(stream)
            _run(3, show=True)
        out = b""
        while select.select([reader], [], [], 0.2)[0]:
            out += os.read(reader, 4096)
    finally:
        os.close(reader)
        os.close(writer)
    assert b"job: 100%" in out and b"3/3" in out
