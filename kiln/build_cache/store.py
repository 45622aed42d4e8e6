"""The build cache on disk: entries, their locks, listing, pruning. Torch-free.

Layout (``<root>``: :func:`cache_root`; the cache owns ``<root>/engines`` and nothing else)::

    <root>/engines/
      <name>/                  a complete entry (name: the key's first 20 hex digits)
        entry.json             what it is: key and key parts, source, backend, created, build
                               seconds; its mtime is the entry's last use
        engine/                the engine dir handed out
      <name>.lock              the entry's reader/writer lock (filelock.ReadWriteLock)
      .<name>.tmp-<pid>-<x>/   a build in progress, or one that was killed
      .<name>.del-<pid>-<x>/   an entry being deleted
        .kiln-build-cache-tmp  written first into both: the cache made this dir (the name is no
                               proof: a user may have made a dir of that name)
      .content-hashes.json     source file hashes (kiln/build_cache/hashes.py)
      .content-hashes.lock     their lock

Contract:
- An entry appears by one rename of a temporary dir whose ``entry.json`` was written last, so
  ``<name>/`` is either complete or absent. A killed build leaves only a ``.tmp`` dir; the next
  build of that name (which holds the lock, so no one else is writing it) or prune removes it.
  A dir is a leftover only if it holds :data:`TMP_MARKER` (or an ``entry.json`` of the cache);
  one with a leftover's name but no marker is someone else's and is left alone.
- Locks: a lookup and a user of an engine (:meth:`EngineCache.hold`) take the entry's lock
  shared; a build, a repair and a deletion take it exclusively. Prune and eviction never wait:
  an entry whose lock is taken is in use and skipped. Locks die with their process. A lock
  file that is not a lock database is not the cache's: it is named (one line) and left alone.
  A lock file that cannot be written (a read-only cache) makes a lookup and a hold run
  unlocked, with one warning; a build or a deletion refuses (one line).
- What the cache deletes: entries whose ``entry.json`` it wrote and which hold nothing else than
  that file and an engine dir of files kiln writes (:func:`kiln.output_dirs.describe_replaceable`),
  and its own leftovers. Anything else under ``engines/`` is reported and left alone; nothing
  outside it is touched. An entry is renamed aside before it is deleted, so a crash mid-delete
  leaves a leftover, never a damaged entry.

Non-goals: sharing one cache between machines (locks are local; the hash memo trusts local
file identities).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import ReadWriteLock, Timeout

from kiln.build_cache.hashes import MEMO_NAME
from kiln.dirs import DirKind, classify_dir, expand_home, special_file, unknown_home, unusable_path
from kiln.errors import UNREADABLE_JSON, USER_TEXT, BuildCacheError, check_path
from kiln.hashing import manifest_edited, sha256_file

log = logging.getLogger(__name__)

ENGINES = "engines"
ENTRY_FILE = "entry.json"
ENGINE_DIR = "engine"
ENTRY_FORMAT = 1
MARKER = "kiln_build_cache"  # entry.json's key holding ENTRY_FORMAT: the cache wrote it
NAME_CHARS = 20
NAME = re.compile(rf"[0-9a-f]{{{NAME_CHARS}}}")
LEFTOVER = re.compile(rf"\.([0-9a-f]{{{NAME_CHARS}}})\.(tmp|del)-\d+-\w+")
TMP_MARKER = ".kiln-build-cache-tmp"  # in a .tmp / .del dir: the cache made it
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_warned_unlocked = False  # the read-only warning is given once per process
_warned_xdg: set[str] = set()  # XDG_CACHE_HOME values warned of as not absolute (once each)


def cache_root() -> Path:
    """``$KILN_CACHE_DIR``, else ``$XDG_CACHE_HOME/kiln``, else ``~/.cache/kiln`` (the root the
    SmolLM2 fixture and the English texts of kiln/testing use too). An empty variable is an
    unset one, as the XDG Base Directory spec reads its own (``KILN_CACHE_DIR= kiln ...``:
    the default). A KILN_CACHE_DIR of blanks, or ``-``, is refused (one line), as
    ``--cache_dir`` refuses them: it had made a cache in ``./-`` or ``./ ``. An XDG_CACHE_HOME
    that is not absolute is ignored, as that spec says, with a warning (once per value)."""
    given = os.environ.get("KILN_CACHE_DIR", "")
    if given:
        default = "or unset it for the default ($XDG_CACHE_HOME/kiln, else ~/.cache/kiln)"
        if not given.strip():
            raise BuildCacheError(f"KILN_CACHE_DIR is blank ({given!r}); set it to the build "
                                  f"cache's directory, {default}")
        if given == "-":
            raise BuildCacheError(f"KILN_CACHE_DIR is '-', which kiln reads as standard input or "
                                  f"output, not a directory; set it to the build cache's "
                                  f"directory (./- for one named '-'), {default}")
        if (problem := unknown_home(given)) is not None:
            raise BuildCacheError(f"KILN_CACHE_DIR {given!r} {problem}; set it to the build "
                                  f"cache's directory, {default}")
        return Path(given).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(os.path.expanduser(xdg)).is_absolute():  # (~nouser: relative, no error)
        return Path(os.path.expanduser(xdg)) / "kiln"
    if xdg and xdg not in _warned_xdg:  # a blank or relative one had made a cache per cwd
        _warned_xdg.add(xdg)
        log.warning("XDG_CACHE_HOME %r is not an absolute path, which the XDG Base Directory "
                    "spec says to ignore: the build cache is ~/.cache/kiln (set KILN_CACHE_DIR "
                    "for another)", xdg)
    return Path.home() / ".cache" / "kiln"


class Busy(Exception):
    """An entry's lock is held by someone else (prune and eviction skip such entries)."""


class Unwritable(BuildCacheError):
    """A lock file that cannot be written (a read-only cache), where a write lock is needed."""


class _NoLock:
    """What :meth:`EngineCache._acquire` holds where a read-only cache cannot be locked."""

    def close(self) -> None:
        pass


_NO_LOCK = _NoLock()


@dataclass(frozen=True)
class Entry:
    """One complete cache entry, as ``entry.json`` describes it."""

    name: str
    path: Path
    key: str
    source: str
    backend: str
    created: float
    last_used: float
    build_seconds: float
    parts: dict[str, Any] = field(default_factory=dict)
    # the names of the files the build wrote into engine/ (None: an entry of an older kiln),
    # so that an entry whose config.json was lost can still be told from a user's files
    files: frozenset[str] | None = None

    @property
    def engine_dir(self) -> Path:
        return self.path / ENGINE_DIR

    def size(self) -> int:
        """Bytes of its files (apparent sizes; links are not followed)."""
        return dir_size(self.path)


@dataclass
class PruneResult:
    removed: list[Entry] = field(default_factory=list)
    in_use: list[Entry] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # path, why
    leftovers: list[tuple[Path, int]] = field(default_factory=list)  # .tmp / .del dirs, bytes
    freed: int = 0  # bytes of the entries removed (leftovers: their own sizes)
    remaining: int = 0  # bytes of the entries left (as measured before the removals)
    unlocked: bool = False  # a dry run on a cache whose locks cannot be written: in use unknown


def _what(path: Path) -> str:
    """What a path that is not a directory is, for a message: "a character device"..., else
    "a file"."""
    return special_file(path) or "a file"


def entry_holding(path: Path) -> Path | None:
    """The build cache entry (a directory whose ``entry.json`` the cache wrote) that ``path``
    is or lies inside, or None. The cache's own builds write into temporary dirs, which hold no
    ``entry.json`` until they are complete."""
    found = _entry_data(path)
    return found[0] if found is not None else None


def built_from(engine_dir: str | Path) -> str | None:
    """The Hugging Face checkpoint a build cache engine was built from (its path, or
    org/name@commit: ``kiln cache list``'s source), or None for an engine dir outside any
    cache: where a user edits what the engine holds a copy of."""
    path = Path(engine_dir).absolute()
    found = _entry_data(path)
    if found is None or path != found[0] / ENGINE_DIR or not isinstance(found[1].get("source"),
                                                                        str):
        return None
    return found[1]["source"]


def _entry_data(path: Path) -> tuple[Path, dict[str, Any]] | None:
    for directory in (path, *path.parents):
        try:
            data = json.loads((directory / ENTRY_FILE).read_text(USER_TEXT))
        except (OSError, *UNREADABLE_JSON):
            continue
        if isinstance(data, dict) and MARKER in data:
            return directory, data
    return None


class EngineCache:
    """The engine cache under ``root`` (default :func:`cache_root`)."""

    def __init__(self, root: str | Path | None = None) -> None:
        if root is not None:  # a Python caller's cache_dir="" had built into ./engines
            check_path("cache_dir", root, BuildCacheError, "give the build cache's directory, "
                       "or leave it out for the default ($KILN_CACHE_DIR, else "
                       "~/.cache/kiln)", directory=True)
        self.root = expand_home(root, "cache_dir", BuildCacheError).absolute() \
            if root is not None else cache_root()
        self.dir = self.root / ENGINES

    def check_dir(self) -> None:
        """Refuse (one line) a cache root or engines dir that exists but is not a directory, or
        a root under a file (``KILN_CACHE_DIR=/dev/null/x`` had failed in a lock's mkdir with a
        bare "Not a directory"), or a path the OS refuses (a symbolic link loop, a name too
        long: :func:`kiln.dirs.unusable_path`)."""
        fix = "set KILN_CACHE_DIR (or --cache_dir) to a directory"
        for path in (self.root, self.dir):
            if (problem := unusable_path(path)) is not None:
                raise BuildCacheError(f"{path}: the build cache {problem}; set KILN_CACHE_DIR "
                                      f"(or --cache_dir) to another directory")
            if path.exists() and not path.is_dir():
                raise BuildCacheError(f"{path}: the build cache is {_what(path)}, not a "
                                      f"directory; {fix}")
        above = next((p for p in self.root.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise BuildCacheError(f"{self.root}: the build cache cannot be made there, {above} "
                                  f"is {_what(above)}, not a directory; {fix}")

    def check_placement(self) -> None:
        """Refuse (one line) a cache root that is or lies inside a checkpoint or engine dir (an
        HF checkpoint, a kiln checkpoint, an engine dir: a ``config.json`` says so), where its
        ``engines/`` would be written among files the cache did not write: a retest's
        ``--cache_dir`` naming its ``--model_dir`` had put ``engines/`` into the model's files,
        and one naming a kiln checkpoint had left it one that ``--overwrite`` refused. Checked
        before a build writes anything; ``kiln cache list`` and ``prune`` do not ask (a cache
        made there by an earlier kiln stays listable and prunable)."""
        parent = EngineCache(self.root.parent)
        if not self.dir.exists() and parent.dir == self.root and any(parent.names()[:2]):
            # (kiln cache list shows it: retest 44c's had made a second cache in it)
            raise BuildCacheError(f"{self.root}: is the engines dir of the build cache at "
                                  f"{parent.root}; set KILN_CACHE_DIR (or --cache_dir) to that, "
                                  f"the cache's root")
        if (entry := entry_holding(self.root)) is not None:  # (its engine/ is an engine dir)
            raise BuildCacheError(f"{self.root}: the build cache "
                                  f"{'is' if entry == self.root else 'lies inside'} {entry}, an "
                                  f"entry of another build cache, which manages it: set "
                                  f"KILN_CACHE_DIR (or --cache_dir) to a directory outside it")
        for directory in (self.root, *self.root.parents):
            kind = classify_dir(directory)
            if kind is not DirKind.OTHER:
                where = "is" if directory == self.root else "lies inside"
                raise BuildCacheError(f"{self.root}: the build cache {where} {directory}, "
                                      f"{kind.value}; its engines/ would be written among that "
                                      f"directory's files: set KILN_CACHE_DIR (or --cache_dir) "
                                      f"to a directory outside it")

    def ensure(self) -> None:
        """Create the engines dir; refuse one kiln cannot write (one line, with the fix)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.mkdtemp(prefix=".probe-", dir=self.dir)
            os.rmdir(probe)
        except OSError as e:
            raise BuildCacheError(f"{self.dir}: the build cache cannot be written "
                                  f"({e.strerror or e}); set KILN_CACHE_DIR (or --cache_dir) "
                                  f"to a writable directory") from None

    # -- locks ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, name: str, write: bool, wait: bool = True,
               on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold entry ``name``'s lock, shared or exclusive (``write``). Without ``wait`` a taken
        lock raises :class:`Busy`; with it, ``on_wait()`` runs once before waiting."""
        lock = self._acquire(name, write, blocking=False)
        if lock is None:
            if not wait:
                raise Busy(name)
            if on_wait is not None:
                on_wait()
            lock = self._acquire(name, write, blocking=True)
        try:
            yield
        finally:
            lock.close()

    def _acquire(self, name: str, write: bool, blocking: bool) -> ReadWriteLock | None:
        path = self.dir / f"{name}.lock"
        for attempt in range(3):
            lock: ReadWriteLock | _NoLock = _NO_LOCK  # the constructor opens the file
            try:
                lock = ReadWriteLock(path, timeout=-1 if blocking else 0, blocking=blocking,
                                     is_singleton=False)
                (lock.acquire_write if write else lock.acquire_read)()
                return lock
            except Timeout:
                lock.close()
                return None
            except sqlite3.DatabaseError as e:
                lock.close()
                if type(e) is not sqlite3.DatabaseError:  # OperationalError: cannot open/write
                    return self._unlocked(path, write, str(e))
                raise BuildCacheError(f"{path}: is not a kiln lock file (not a lock database: "
                                      f"kiln did not write it); move it away, or delete it if it "
                                      f"is yours to delete, then try again") from None
            except OSError as e:  # prune removed the lock file while this one waited on it
                lock.close()
                if e.errno in _READ_ONLY:
                    return self._unlocked(path, write, e.strerror or str(e))
                if attempt == 2 or "unlinked or replaced" not in str(e):
                    raise
        raise AssertionError("unreachable")

    def _unlocked(self, path: Path, write: bool, why: str) -> None:
        """A lock file that cannot be written: a build or deletion refuses; a lookup or a hold
        runs without the lock (said once), as nothing can change a read-only cache."""
        global _warned_unlocked
        if write:
            raise Unwritable(f"{path}: cannot be written ({why}); building or removing "
                             f"cached engines needs a writable build cache: set "
                             f"KILN_CACHE_DIR (or --cache_dir) to a writable directory") from None
        if not _warned_unlocked:
            _warned_unlocked = True
            log.warning("%s: cannot be written (%s); using the build cache without its locks "
                        "(a kiln cache prune elsewhere could remove an engine in use)", path, why)
        return _NO_LOCK

    def in_use(self, name: str) -> bool:
        """Whether another process holds entry ``name``'s lock. Raises
        :class:`BuildCacheError` for a lock file that is not kiln's, :class:`Unwritable` for
        one that cannot be written (then no one can tell)."""
        try:
            with self.locked(name, write=True, wait=False):
                return False
        except Busy:
            return True

    # -- entries --------------------------------------------------------------------------

    def names(self) -> tuple[list[str], list[Path], list[Path]]:
        """(entry names, leftover dirs, other things under engines/ that the cache did not
        make); each sorted."""
        names, leftovers, foreign = [], [], []
        if not self.dir.is_dir():
            return names, leftovers, foreign
        for path in sorted(self.dir.iterdir()):
            if NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                names.append(path.name)
            elif self.is_leftover(path):
                leftovers.append(path)
            elif not (path.name.endswith(".lock") and NAME.fullmatch(path.stem)) and \
                    not path.name.startswith(MEMO_NAME.removesuffix("json")):
                foreign.append(path)
        return names, leftovers, foreign

    def read(self, name: str, path: Path | None = None) -> Entry | None:
        """The entry ``name`` (in ``path``, default its place) if ``entry.json`` is one the
        cache wrote, else None."""
        path = self.dir / name if path is None else path
        try:
            data = json.loads((path / ENTRY_FILE).read_text(USER_TEXT))
            mtime = (path / ENTRY_FILE).stat().st_mtime
        except (OSError, *UNREADABLE_JSON):
            return None
        if not isinstance(data, dict) or data.get(MARKER) != ENTRY_FORMAT or \
                not str(data.get("key", "")).startswith(name):
            return None
        try:
            return Entry(name=name, path=path, key=data["key"], source=str(data["source"]),
                         backend=str(data["backend"]), created=float(data["created"]),
                         last_used=mtime, build_seconds=float(data["build_seconds"]),
                         parts=dict(data.get("parts") or {}),
                         files=frozenset(map(str, data["files"])) if "files" in data else None)
        except (KeyError, TypeError, ValueError):
            return None

    def is_leftover(self, path: Path) -> bool:
        """Whether ``path`` is a .tmp / .del dir the cache made (module docstring): its name
        and its marker, or an ``entry.json`` the cache wrote (a build killed while renaming)."""
        match = LEFTOVER.fullmatch(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            return False
        try:
            marker = json.loads((path / TMP_MARKER).read_text(USER_TEXT))
        except (OSError, *UNREADABLE_JSON):
            marker = None
        if isinstance(marker, dict) and marker.get(MARKER) == ENTRY_FORMAT:
            return True
        return self.read(match.group(1), path) is not None

    def entries(self) -> list[Entry]:
        """Complete entries, least recently used first."""
        found = [e for n in self.names()[0] if (e := self.read(n)) is not None]
        return sorted(found, key=lambda e: e.last_used)

    def touch(self, entry: Entry) -> None:
        """Record a use now (the LRU order)."""
        with contextlib.suppress(OSError):  # a read-only cache still serves its engines
            os.utime(entry.path / ENTRY_FILE)

    def new_tmp(self, name: str, kind: str = "tmp") -> Path:
        """A new .tmp (a build) or .del (a deletion) dir for ``name``, marked as the cache's."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=self.dir))
        try:
            (tmp / TMP_MARKER).write_text(json.dumps({MARKER: ENTRY_FORMAT}) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.chmod(0o777 & ~_umask())
        return tmp

    def install(self, tmp: Path, name: str, record: dict[str, Any]) -> Entry:
        """Write ``entry.json`` into ``tmp`` (last, synced) and rename ``tmp`` to the entry.
        The caller holds the entry's write lock."""
        engine = tmp / ENGINE_DIR
        data = {MARKER: ENTRY_FORMAT, **record,
                "files": sorted(p.name for p in engine.iterdir() if p.is_file())}
        with open(tmp / ENTRY_FILE, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        (tmp / TMP_MARKER).unlink(missing_ok=True)  # entry.json marks it from here on
        tmp.rename(self.dir / name)
        entry = self.read(name)
        if entry is None:  # pragma: no cover - what was just written
            raise BuildCacheError(f"{self.dir / name}: the entry just written does not read back")
        return entry

    def clear_leftovers(self, name: str) -> None:
        """Remove ``name``'s .tmp / .del dirs (the caller holds its write lock: none is live)."""
        for path in self.dir.glob(f".{name}.*"):
            if self.is_leftover(path):
                log.warning("removing %s, left by a kiln build or prune that did not finish",
                            path)
                shutil.rmtree(path, ignore_errors=True)

    def remove(self, entry: Entry) -> int:
        """Delete ``entry`` (the caller holds its write lock); its size. Refuses, with
        :class:`BuildCacheError`, an entry holding anything the cache did not write."""
        self._check_removable(entry)
        size = entry.size()
        trash = self.new_tmp(entry.name, "del")
        entry.path.rename(trash / entry.name)
        shutil.rmtree(trash, ignore_errors=True)
        return size

    def _check_removable(self, entry: Entry) -> None:
        problem = self.foreign_content(entry)
        if problem:
            raise BuildCacheError(f"{problem}; the entry {entry.path} is left alone: move those "
                                  f"files away, then delete the entry yourself or prune again")

    def foreign_content(self, entry: Entry) -> str | None:
        """What in ``entry`` the cache did not write, named from its path (None: nothing)."""
        from kiln.errors import OutputError
        from kiln.output_dirs import describe_replaceable

        others = sorted(p.name for p in entry.path.iterdir() if p.name not in (ENTRY_FILE,
                                                                                ENGINE_DIR))
        if others:
            return f"{entry.path}: holds {', '.join(others)}, which the build cache did not write"
        engine = entry.engine_dir
        if engine.is_symlink() or (engine.exists() and not engine.is_dir()):
            return f"{engine}: is not a directory the build cache made"
        if not engine.is_dir():
            return None
        if entry.files is not None:  # what the build wrote is known: any other name is not
            unknown = sorted(p.name for p in engine.iterdir()
                             if p.name not in entry.files or p.is_symlink() or not p.is_file())
            return f"{engine}: holds {', '.join(unknown)}, which the build did not write" \
                if unknown else None
        try:  # an entry of an older kiln: its manifest says what the build wrote
            describe_replaceable(engine, damaged_ranks=True)
        except OutputError as e:
            return str(e).split(";")[0]
        return None

    # -- prune ----------------------------------------------------------------------------

    def prune(self, *, everything: bool = False, older_than: float | None = None,
              max_size: int | None = None, keep: tuple[str, ...] = (),
              dry_run: bool = False) -> PruneResult:
        """Remove entries: all of them, those last used more than ``older_than`` seconds ago,
        and least recently used ones until the rest fit in ``max_size`` bytes; never those in
        ``keep`` or in use. Leftovers of builds and deletions that did not finish go too."""
        result = PruneResult()
        entries = self.entries()
        sizes = {e.name: e.size() for e in entries}
        total = sum(sizes.values())
        now = time.time()
        for entry in entries:  # least recently used first
            old = older_than is not None and now - entry.last_used > older_than
            over = max_size is not None and total > max_size
            if entry.name in keep or not (everything or old or over):
                continue
            try:
                freed = self._remove_unused(entry, dry_run, result)
            except Busy:
                result.in_use.append(entry)
                continue
            except BuildCacheError as e:
                result.refused.append((entry.path, str(e)))
                continue
            result.removed.append(entry)
            result.freed += freed
            total -= sizes[entry.name]
        result.remaining = total
        result.leftovers = self._prune_leftovers(result, dry_run)
        if not dry_run:
            self._prune_locks(result)
            if everything:  # a fresh start: source files are hashed again (hashes.py)
                (self.dir / MEMO_NAME).unlink(missing_ok=True)
        return result

    @contextlib.contextmanager
    def _pruning(self, name: str, dry_run: bool, result: PruneResult) -> Iterator[None]:
        """Entry ``name``'s write lock, held for a removal; a dry run on a cache whose locks
        cannot be written (a read-only mount) goes on without it, and says so in ``result``
        (a trial's dry run there had said it would remove nothing)."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.locked(name, write=True, wait=False))
            except Unwritable:
                if not dry_run:
                    raise
                result.unlocked = True
            yield

    def _remove_unused(self, entry: Entry, dry_run: bool, result: PruneResult) -> int:
        """Remove ``entry`` unless in use (:class:`Busy`) or holding what the cache did not
        write (:class:`BuildCacheError`); its size. ``dry_run``: the same checks, no removal,
        so that a dry run reports what the real one would do."""
        with self._pruning(entry.name, dry_run, result):
            current = self.read(entry.name)  # it may have been rebuilt or removed meanwhile
            if current is None or current.key != entry.key:
                raise Busy(entry.name)
            if dry_run:
                self._check_removable(current)
                return current.size()
            return self.remove(current)

    def _prune_leftovers(self, result: PruneResult, dry_run: bool) -> list[tuple[Path, int]]:
        """The leftovers removed (with ``dry_run``: that would be), with their sizes."""
        removed = []
        for path in self.names()[1]:
            name = LEFTOVER.fullmatch(path.name).group(1)
            try:
                with self._pruning(name, dry_run, result):
                    size = dir_size(path)
                    if not dry_run:
                        shutil.rmtree(path, ignore_errors=True)
                    removed.append((path, size))
            except Busy:
                continue  # a build of that entry is running
            except BuildCacheError as e:
                result.refused.append((path, str(e)))
        return removed

    def _prune_locks(self, result: PruneResult) -> None:
        """Delete the lock files of entries that no longer exist (a process waiting on one
        takes a fresh lock: :meth:`_acquire`)."""
        names = set(self.names()[0])
        for lock in self.dir.glob("*.lock"):
            name = lock.stem
            if not NAME.fullmatch(name) or name in names:
                continue
            try:
                with self.locked(name, write=True, wait=False):
                    self.drop_lock(name)
            except Busy:
                continue
            except BuildCacheError as e:
                result.refused.append((lock, str(e)))

    def drop_lock(self, name: str) -> None:
        """Delete entry ``name``'s lock file if no entry or leftover of that name is left. The
        caller holds the lock exclusively: a process waiting on this file finds it unlinked
        when it gets the lock and takes a fresh one (filelock checks the file's identity after
        locking; :meth:`_acquire` retries), so no two processes ever hold two files of one
        name."""
        if not (self.dir / name).exists() and not any(self.dir.glob(f".{name}.*")):
            (self.dir / f"{name}.lock").unlink(missing_ok=True)

    # -- holding an engine ----------------------------------------------------------------

    def entry_of(self, engine_dir: str | Path) -> str | None:
        """The entry name owning ``engine_dir``, if it is one of this cache's engine dirs, however
        the path is spelled (``..``, a symbolic link to it or to the cache: a trial's run by
        ``../cache/engines/<entry>/engine`` was neither held nor counted as a use, and a prune
        deleted the engine under it)."""
        path = expand_home(engine_dir, "engine_dir", BuildCacheError).resolve()
        if path.name == ENGINE_DIR and path.parent.parent == self.dir.resolve() and \
                NAME.fullmatch(path.parent.name):
            return path.parent.name
        return None

    @contextlib.contextmanager
    def hold(self, engine_dir: str | Path) -> Iterator[Path]:
        """Keep prune away from the entry of ``engine_dir`` while the body uses the engine (a
        shared lock; a dir outside the cache passes through), and record the use (the LRU
        order: an engine run by its path had kept the age of its last build) when the body
        starts and again when it ends (a week-long ``kiln serve`` is a use until it stops, not
        a week old when a ``prune --older_than 7d`` follows it)."""
        name = self.entry_of(engine_dir)
        if name is None:
            yield Path(engine_dir)
            return
        with self.locked(name, write=False):
            entry = self.read(name)
            if entry is None:
                raise BuildCacheError(f"{engine_dir}: the cached engine was removed (kiln cache "
                                      f"prune) before it was used; ask for it again to rebuild")
            self.touch(entry)
            try:
                yield Path(engine_dir)
            finally:
                self.touch(entry)


def cache_of(engine_dir: str | Path) -> EngineCache | None:
    """The build cache ``engine_dir`` is an engine dir of, whichever root it has
    (``<root>/engines/<name>/engine`` beside an ``entry.json`` the cache wrote), else None: an
    engine of another cache than the shell's ``KILN_CACHE_DIR`` had not been held, and a prune
    of that cache could delete it while it ran."""
    path = expand_home(engine_dir, "engine_dir", BuildCacheError).resolve()
    entry = path.parent
    if path.name != ENGINE_DIR or not NAME.fullmatch(entry.name) or \
            entry.parent.name != ENGINES:
        return None
    cache = EngineCache(entry.parent.parent)
    return cache if cache.read(entry.name) is not None else None


def describe_options(parts: dict[str, Any]) -> str:
    """What tells entries of one source apart, short: the dtype, the mapping when not 1x1, the
    targets, and the build options not at their :class:`~kiln.builder.options.BuildOptions`
    defaults (``max_seq_len=512``, ``norm=disable``); ``-`` for an entry without key parts."""
    from kiln.builder.options import BuildOptions

    convert, build = parts.get("convert") or {}, parts.get("build") or {}
    if not (convert or build):
        return "-"
    out = [str(convert.get("dtype", "auto"))]
    if (convert.get("tp_size", 1), convert.get("pp_size", 1)) != (1, 1):
        out.append(f"tp{convert.get('tp_size', 1)}xpp{convert.get('pp_size', 1)}")
    if parts.get("targets"):
        out.append(",".join(parts["targets"]))
    defaults = {f.name: f.default for f in dataclasses.fields(BuildOptions)}
    for name, value in sorted(build.items()):
        if name == "plugins":
            out += [f"{plugin}={mode}" for plugin, mode in sorted((value or {}).items())]
        elif value is True:
            out.append(name)
        elif value not in (None, False) and value != defaults.get(name):
            out.append(f"{name}={value}")
    return " ".join(out)


def dir_size(path: Path) -> int:
    """Bytes of the files under ``path`` (apparent sizes; links are not followed)."""
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if not p.is_dir():
                total += p.lstat().st_size
    return total


def damage(engine_dir: Path) -> str | None:
    """What is missing, truncated or edited in a cached engine dir, from its manifest: its
    digest (an edited config.json), its rank files at their recorded sizes (no data read) and
    its other files (the tokenizer's, small) at their recorded sha256; None when all is as the
    build left it."""
    try:
        manifest = json.loads((engine_dir / "config.json").read_text(USER_TEXT))
        ranks = manifest["rank_files"]
        sizes = manifest.get("sizes") or {}
        names = [name for files in ranks.values() for name in files]
        others = dict(manifest.get("other_files") or {})
    except (OSError, *UNREADABLE_JSON, KeyError, TypeError,
            AttributeError):
        return "config.json is missing or unreadable"
    if manifest_edited(manifest):  # the runtime would refuse it and name kiln build
        return "config.json was edited since the build"
    for name in [*names, *others]:
        path = engine_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if name in sizes and path.stat().st_size != sizes[name]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {sizes[name]}"
    for name, digest in others.items():  # small files (the tokenizer's): hashed every lookup
        if sha256_file(engine_dir / name) != digest:
            return f"{name} was changed since the build"
    return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
