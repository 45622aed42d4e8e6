"""Directories in use: a process that loaded an engine dir holds it, and kiln never replaces a
directory that a process holds. Torch-free.

- :func:`holding`: a shared ``flock(2)`` on a read-only descriptor of the directory itself,
  for as long as the body runs (an ``LLM``, ``kiln serve``, ``run``, ``bench`` and ``eval``
  hold their engine dir through :func:`kiln.build_cache.hold_engine`). Nothing is written:
  an engine dir may be read-only, and the directory above it is the user's. (The build cache
  locks its entries with lock files beside them, in ``engines/``, which it owns:
  kiln/build_cache/store.py; a user's engine dir has no such place.) The kernel drops the
  lock when the process ends, however it ends (SIGKILL included). Processes the holder
  spawns (``--dp`` replicas, ``--engine_process``) end with it (kiln.runtime.distributed.
  process), so the holder's lock covers them.
- :func:`replacing`: an exclusive lock, never waited for, for the body that replaces the
  directory; one held by any process (this one included, through another descriptor) is
  refused (:class:`OutputError`, one line): what is in use, by which process when
  ``/proc/locks`` tells it, and the fix.
- A holder that had to wait while a replacement ran holds whatever the path names once it
  is done (the same device and inode), not the directory moved aside.
- A child forked (``os.fork``) while locks are held closes its copies of their descriptors
  (:func:`os.register_at_fork`), and only those: a descriptor copied by fork shares its lock
  with the parent's, so a child that lives on (a worker, a daemon) had kept the parent's
  engine dir held after the parent closed its LLMs, and ``--overwrite`` was refused blaming
  "this process". (Only closed: ``LOCK_UN`` in the child would drop the parent's lock too.)
- Where a lock cannot be taken (no ``fcntl``: Windows; a file system that refuses flock; a
  directory that cannot be opened for reading; no such directory, which the loader then
  names), nothing is locked and the command goes on, the one fallback: where locks cannot
  work here at all (no flock on the platform or the file system) a WARNING says once a process
  that ``--overwrite`` cannot see engine dirs in use, each directory at debug level.

Non-goals: locks across machines (a network file system's flock is local or emulated); keeping
other programs than kiln from deleting a directory (an advisory lock binds only kiln).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from kiln.errors import OutputError, option

try:
    import fcntl
except ImportError:  # Windows: nothing is locked (module docstring)
    fcntl = None

log = logging.getLogger(__name__)
_ATTEMPTS = 3  # holding: replacements waited for in a row before going on unlocked
PROC_LOCKS = Path("/proc/locks")
_HELD: set[int] = set()  # descriptors holding a lock in this process: a forked child's to close


def _close_held_in_child() -> None:
    """In a forked child, close the copies of this process's lock descriptors (module
    docstring)."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # (not on Windows, which has no flock either)
    os.register_at_fork(after_in_child=_close_held_in_child)


@contextlib.contextmanager
def _held(fd: int | None) -> Iterator[None]:
    """Keep ``fd`` (None: no lock) in :data:`_HELD` while the body runs, and close it after."""
    if fd is None:
        yield
        return
    _HELD.add(fd)
    try:
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)


@contextlib.contextmanager
def holding(directory: str | os.PathLike) -> Iterator[None]:
    """Hold ``directory`` in use (a shared lock) while the body runs (module docstring)."""
    with _held(_hold(Path(directory))):
        yield


@contextlib.contextmanager
def replacing(directory: str | os.PathLike) -> Iterator[None]:
    """Hold ``directory`` exclusively while the body replaces it; refuse one that a process
    holds (:func:`holding`) with :class:`OutputError`."""
    directory = Path(directory)
    fd = _open(directory)
    with _held(fd):
        if fd is not None and _flock(fd, "LOCK_EX", directory) is False:
            pids = _holders(fd)
            one = len(pids) < 2  # (two had been "process 1, process 2 holds it")
            raise OutputError(f"{directory}: is in use: {_named(pids)} "
                              f"{'holds' if one else 'hold'} it loaded (kiln serve, run, bench "
                              f"or eval, or an LLM), and {option('overwrite', True)} would "
                              f"replace it under {'that process' if one else 'them'}; stop "
                              f"{'it (or close its LLM)' if one else 'them (or close their LLMs)'}"
                              f" first, or choose another {option('output_dir')}")
        yield


def _hold(directory: Path) -> int | None:
    """A descriptor of ``directory`` holding its shared lock, or None where none can be had."""
    for _ in range(_ATTEMPTS):
        fd = _open(directory)
        if fd is None:
            return None
        taken = _flock(fd, "LOCK_SH", directory)
        if taken is False:  # a replacement is under way: it is quick, and never waits
            log.info("%s: waiting for the kiln command replacing it", directory)
            taken = _flock(fd, "LOCK_SH", directory, wait=True)
        if taken and _names(directory, fd):
            return fd
        os.close(fd)  # not taken, or taken on the directory a replacement moved aside
        if taken is None:
            return None
    log.debug("%s: not locked (replaced %d times while waiting)", directory, _ATTEMPTS)
    return None


def check_unused(directory: str | os.PathLike) -> None:
    """Refuse ``directory`` if a process holds it, as :func:`replacing` does."""
    with replacing(directory):
        pass


def _open(directory: Path) -> int | None:
    """A read-only descriptor of ``directory``, or None where it cannot be locked."""
    if fcntl is None:
        _unlockable(directory, "no flock on this platform")
        return None
    try:
        return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        log.debug("%s: not locked (%s)", directory, e.strerror or e)
        return None


def _flock(fd: int, how: str, directory: Path, wait: bool = False) -> bool | None:
    """Take the lock ``how`` (``LOCK_SH`` / ``LOCK_EX``): True when taken, False when another
    descriptor holds it (without ``wait``), None where flock fails here (:func:`_unlockable`)."""
    try:
        fcntl.flock(fd, getattr(fcntl, how) | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        _unlockable(directory, e.strerror or str(e))
        return None


_said_unlockable: set[str] = set()  # the reasons said at WARNING in this process


def _unlockable(directory: Path, why: str) -> None:
    """Say that ``directory`` is not locked because locks cannot work here: at WARNING once a
    process for each reason (the user must know ``--overwrite`` is blind to engines in use),
    at debug for each directory."""
    log.debug("%s: not locked (%s)", directory, why)
    if why not in _said_unlockable:
        _said_unlockable.add(why)
        log.warning("engine directories cannot be locked here (%s, at %s): kiln build "
                    "--overwrite will not see an engine dir another process has loaded",
                    why, directory)


def _names(directory: Path, fd: int) -> bool:
    """Whether ``directory`` still names the directory open as ``fd``."""
    try:
        now, held = os.stat(directory), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _holders(fd: int) -> list[int]:
    """The ids of the processes holding a lock on the directory open as ``fd``, sorted, from
    ``/proc/locks`` (Linux); none where it cannot be read."""
    held = os.fstat(fd)
    where = f"{os.major(held.st_dev):02x}:{os.minor(held.st_dev):02x}:{held.st_ino}"
    try:
        lines = PROC_LOCKS.read_text().splitlines()
    except OSError:
        lines = []
    # "1: FLOCK  ADVISORY  READ 12345 fd:01:1234 0 EOF"; a waiter's line has "->" after "1:"
    pids = {int(f[4]) for f in map(str.split, lines)
            if len(f) > 5 and f[1] == "FLOCK" and f[5] == where and f[4].isdigit()}
    return sorted(pid for pid in pids if pid > 0)


def _named(pids: list[int]) -> str:
    """Processes ``pids`` in a message: "process 12", "this process (pid 12)", "processes 12
    and 34", "processes 12 (this process), 34 and 56"; none: "another process"."""
    if not pids:
        return "another process"
    if len(pids) == 1:
        return f"this process (pid {pids[0]})" if pids[0] == os.getpid() else f"process {pids[0]}"
    names = [f"{pid} (this process)" if pid == os.getpid() else str(pid) for pid in pids]
    return f"processes {', '.join(names[:-1])} and {names[-1]}"
