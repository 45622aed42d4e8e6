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
      .content-hashes.json     source file hashes (kiln/build_cache/hashes.py)

Contract:
- An entry appears by one rename of a temporary dir whose ``entry.json`` was written last, so
  ``<name>/`` is either complete or absent. A killed build leaves only a ``.tmp`` dir; the next
  build of that name (which holds the lock, so no one else is writing it) or prune removes it.
- Locks: a lookup and a user of an engine (:meth:`EngineCache.hold`) take the entry's lock
  shared; a build, a repair and a deletion take it exclusively. Prune and eviction never wait:
  an entry whose lock is taken is in use and skipped. Locks die with their process.
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
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import ReadWriteLock, Timeout

from kiln.build_cache.hashes import MEMO_NAME
from kiln.errors import BuildCacheError

log = logging.getLogger(__name__)

ENGINES = "engines"
ENTRY_FILE = "entry.json"
ENGINE_DIR = "engine"
ENTRY_FORMAT = 1
MARKER = "kiln_build_cache"  # entry.json's key holding ENTRY_FORMAT: the cache wrote it
NAME_CHARS = 20
NAME = re.compile(rf"[0-9a-f]{{{NAME_CHARS}}}")
LEFTOVER = re.compile(rf"\.([0-9a-f]{{{NAME_CHARS}}})\.(tmp|del)-\d+-\w+")


def cache_root() -> Path:
    """``$KILN_CACHE_DIR``, else ``$XDG_CACHE_HOME/kiln``, else ``~/.cache/kiln`` (the root the
    SmolLM2 fixture and the English texts of kiln/testing use too)."""
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "kiln"
    return Path.home() / ".cache" / "kiln"


class Busy(Exception):
    """An entry's lock is held by someone else (prune and eviction skip such entries)."""


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

    @property
    def engine_dir(self) -> Path:
        return self.path / ENGINE_DIR

    def size(self) -> int:
        """Bytes of its files (apparent sizes; links are not followed)."""
        return sum(p.lstat().st_size for p in self.path.rglob("*") if not p.is_dir())


@dataclass
class PruneResult:
    removed: list[Entry] = field(default_factory=list)
    in_use: list[Entry] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # path, why
    leftovers: list[Path] = field(default_factory=list)  # removed .tmp / .del dirs
    freed: int = 0


class EngineCache:
    """The engine cache under ``root`` (default :func:`cache_root`)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else cache_root()
        self.dir = self.root / ENGINES

    def ensure(self) -> None:
        """Create the engines dir; refuse one kiln cannot write (one line, with the fix)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.mkdtemp(prefix=".probe-", dir=self.dir)
            os.rmdir(probe)
        except OSError as e:
            raise BuildCacheError(f"{self.dir}: the build cache cannot be written "
                                  f"({e.strerror or e}); set KILN_CACHE_DIR to a writable "
                                  f"directory") from None

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
        for attempt in range(3):
            lock = ReadWriteLock(self.dir / f"{name}.lock", timeout=-1 if blocking else 0,
                                 blocking=blocking, is_singleton=False)
            try:
                (lock.acquire_write if write else lock.acquire_read)()
                return lock
            except Timeout:
                lock.close()
                return None
            except OSError as e:  # prune removed the lock file while this one waited on it
                lock.close()
                if attempt == 2 or "unlinked or replaced" not in str(e):
                    raise
        raise AssertionError("unreachable")

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
            elif LEFTOVER.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                leftovers.append(path)
            elif not (path.name.endswith(".lock") and NAME.fullmatch(path.stem)) and \
                    not path.name.startswith(MEMO_NAME.removesuffix("json")):
                foreign.append(path)
        return names, leftovers, foreign

    def read(self, name: str) -> Entry | None:
        """The entry ``name`` if ``entry.json`` is one the cache wrote, else None."""
        path = self.dir / name
        try:
            data = json.loads((path / ENTRY_FILE).read_text())
            mtime = (path / ENTRY_FILE).stat().st_mtime
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get(MARKER) != ENTRY_FORMAT or \
                not str(data.get("key", "")).startswith(name):
            return None
        try:
            return Entry(name=name, path=path, key=data["key"], source=str(data["source"]),
                         backend=str(data["backend"]), created=float(data["created"]),
                         last_used=mtime, build_seconds=float(data["build_seconds"]),
                         parts=dict(data.get("parts") or {}))
        except (KeyError, TypeError, ValueError):
            return None

    def entries(self) -> list[Entry]:
        """Complete entries, least recently used first."""
        found = [e for n in self.names()[0] if (e := self.read(n)) is not None]
        return sorted(found, key=lambda e: e.last_used)

    def touch(self, entry: Entry) -> None:
        """Record a use now (the LRU order)."""
        with contextlib.suppress(OSError):  # a read-only cache still serves its engines
            os.utime(entry.path / ENTRY_FILE)

    def new_tmp(self, name: str) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=self.dir))
        tmp.chmod(0o777 & ~_umask())
        return tmp

    def install(self, tmp: Path, name: str, record: dict[str, Any]) -> Entry:
        """Write ``entry.json`` into ``tmp`` (last, synced) and rename ``tmp`` to the entry.
        The caller holds the entry's write lock."""
        data = {MARKER: ENTRY_FORMAT, **record}
        with open(tmp / ENTRY_FILE, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(self.dir / name)
        entry = self.read(name)
        if entry is None:  # pragma: no cover - what was just written
            raise BuildCacheError(f"{self.dir / name}: the entry just written does not read back")
        return entry

    def clear_leftovers(self, name: str) -> None:
        """Remove ``name``'s .tmp / .del dirs (the caller holds its write lock: none is live)."""
        for path in self.dir.glob(f".{name}.*"):
            if LEFTOVER.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
                log.warning("removing %s, left by a kiln build or prune that did not finish",
                            path)
                shutil.rmtree(path, ignore_errors=True)

    def remove(self, entry: Entry) -> int:
        """Delete ``entry`` (the caller holds its write lock); its size. Refuses, with
        :class:`BuildCacheError`, an entry holding anything the cache did not write."""
        problem = self.foreign_content(entry)
        if problem:
            raise BuildCacheError(f"{entry.path}: {problem}, which the build cache did not "
                                  f"write; it is left alone: move those files away, then "
                                  f"delete the entry yourself or prune again")
        size = entry.size()
        trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.del-{os.getpid()}-", dir=self.dir))
        entry.path.rename(trash / entry.name)
        shutil.rmtree(trash, ignore_errors=True)
        return size

    def foreign_content(self, entry: Entry) -> str | None:
        """What in ``entry`` the cache did not write (None: nothing)."""
        from kiln.errors import OutputError
        from kiln.output_dirs import describe_replaceable

        others = sorted(p.name for p in entry.path.iterdir() if p.name not in (ENTRY_FILE,
                                                                                ENGINE_DIR))
        if others:
            return f"holds {', '.join(others)}"
        engine = entry.engine_dir
        if engine.is_symlink() or (engine.exists() and not engine.is_dir()):
            return f"{ENGINE_DIR} is not a directory the cache made"
        if engine.is_dir():
            try:
                describe_replaceable(engine)
            except OutputError as e:
                return str(e).split(";")[0].removeprefix(f"{engine}: ")
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
                freed = sizes[entry.name] if dry_run else self._remove_unused(entry)
            except Busy:
                result.in_use.append(entry)
                continue
            except BuildCacheError as e:
                result.refused.append((entry.path, str(e)))
                continue
            result.removed.append(entry)
            result.freed += freed
            total -= sizes[entry.name]
        if not dry_run:
            result.leftovers = self._prune_leftovers()
            self._prune_locks()
            if everything:  # a fresh start: source files are hashed again (hashes.py)
                (self.dir / MEMO_NAME).unlink(missing_ok=True)
        return result

    def _remove_unused(self, entry: Entry) -> int:
        with self.locked(entry.name, write=True, wait=False):
            current = self.read(entry.name)  # it may have been rebuilt or removed meanwhile
            if current is None or current.key != entry.key:
                raise Busy(entry.name)
            return self.remove(current)

    def _prune_leftovers(self) -> list[Path]:
        removed = []
        for path in self.names()[1]:
            name = LEFTOVER.fullmatch(path.name).group(1)
            try:
                with self.locked(name, write=True, wait=False):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            except Busy:
                continue  # a build of that entry is running
        return removed

    def _prune_locks(self) -> None:
        """Delete the lock files of entries that no longer exist (a process waiting on one
        takes a fresh lock: :meth:`_acquire`)."""
        names = set(self.names()[0])
        for lock in self.dir.glob("*.lock"):
            name = lock.stem
            if not NAME.fullmatch(name) or name in names or any(self.dir.glob(f".{name}.*")):
                continue
            with contextlib.suppress(Busy), self.locked(name, write=True, wait=False):
                if not (self.dir / name).exists():
                    lock.unlink(missing_ok=True)

    # -- holding an engine ----------------------------------------------------------------

    def entry_of(self, engine_dir: str | Path) -> str | None:
        """The entry name owning ``engine_dir``, if it is one of this cache's engine dirs."""
        path = Path(engine_dir).expanduser().absolute()
        if path.name == ENGINE_DIR and path.parent.parent == self.dir.absolute() and \
                NAME.fullmatch(path.parent.name):
            return path.parent.name
        return None

    @contextlib.contextmanager
    def hold(self, engine_dir: str | Path) -> Iterator[Path]:
        """Keep prune away from the entry of ``engine_dir`` while the body uses the engine (a
        shared lock; a dir outside the cache passes through)."""
        name = self.entry_of(engine_dir)
        if name is None:
            yield Path(engine_dir)
            return
        with self.locked(name, write=False):
            if self.read(name) is None:
                raise BuildCacheError(f"{engine_dir}: the cached engine was removed (kiln cache "
                                      f"prune) before it was used; ask for it again to rebuild")
            yield Path(engine_dir)


def damage(engine_dir: Path) -> str | None:
    """What is missing or truncated in a cached engine dir, from its manifest (no data read);
    None when every listed file is there at its recorded size."""
    try:
        manifest = json.loads((engine_dir / "config.json").read_text())
        ranks = manifest["rank_files"]
        sizes = manifest.get("sizes") or {}
        names = [name for files in ranks.values() for name in files]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError):
        return "config.json is missing or unreadable"
    for name in names:
        path = engine_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if name in sizes and path.stat().st_size != sizes[name]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {sizes[name]}"
    return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
