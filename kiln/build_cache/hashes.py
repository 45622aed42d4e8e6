"""Content hashes of source files, memoized by what the file system says about each file.

Hashing a 16 GB checkpoint takes tens of seconds; a cache lookup must not. :func:`content_hashes`
returns each file's sha256 (:func:`kiln.hashing.sha256_file`) and remembers it in a memo file
beside the cache entries, keyed by the file's resolved path and reused while the file's device,
inode, size, mtime_ns and ctime_ns are all unchanged.

What that trusts: a write to a file changes its ctime (the kernel sets it on every content or
metadata change, and no user tool can set it back, unlike mtime: ``touch -d``, ``rsync -t``),
and a replaced file has a new inode. A file system that does not keep these (some network file
systems with coarse or cached timestamps) could hand back a stale hash; deleting the memo file
(:data:`MEMO_NAME` in the cache's engines dir, or ``kiln cache prune --all``) rehashes everything.

Concurrency: the memo is read, updated and replaced (``os.replace``) under an exclusive
:class:`filelock.FileLock`, held while the missing hashes are computed, so two processes starting
on the same new model hash it once. A file that changes while it is hashed is not memoized.

Non-goals: hashing anything but regular files; sharing the memo between machines.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Event

from filelock import FileLock

from kiln.errors import UNREADABLE_JSON
from kiln.hashing import sha256_file, stops_when

log = logging.getLogger(__name__)

MEMO_NAME = ".content-hashes.json"
MEMO_FORMAT = 1
LOUD_BYTES = 1 << 30  # hashing more than this says so at the default level
THREADS = 4  # hashlib releases the GIL: several files hash at once


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def content_hashes(files: list[Path], memo_dir: Path) -> dict[Path, str]:
    """sha256 of each of ``files`` (as given -> hex digest), from the memo in ``memo_dir`` where
    it still holds, else computed (in threads) and memoized."""
    memo_path = Path(memo_dir) / MEMO_NAME
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(FileLock(memo_path.with_suffix(".lock")))
        except OSError as e:  # a read-only (or not yet made) cache: hash, remember nothing
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
                raise
            log.info("%s: cannot be locked (%s); hashing without the memo's lock",
                     memo_path.with_suffix(".lock"), e.strerror or e)
        memo = _read_memo(memo_path)
        out, todo = {}, []
        for path in files:
            real, identity = str(Path(path).resolve()), _identity(Path(path))
            known = memo.get(real)
            if known is not None and {k: known.get(k) for k in identity} == identity:
                out[path] = known["sha256"]
            else:
                todo.append((path, real, identity))
        if not todo:
            return out
        total = sum(identity["size"] for _, _, identity in todo)
        (log.warning if total > LOUD_BYTES else log.info)(
            "hashing %d source files (%.1f GB) for the build cache key; later calls reuse the "
            "hashes while the files are unchanged", len(todo), total / 1e9)
        digests = _hash_all([path for path, _, _ in todo])
        for (path, real, identity), digest in zip(todo, digests, strict=True):
            out[path] = digest
            if _identity(Path(path)) == identity:  # unchanged while it was read
                memo[real] = {**identity, "sha256": digest}
        try:
            _write_memo(memo_path, {k: v for k, v in memo.items() if Path(k).exists()})
        except OSError as e:  # a read-only cache: the hashes are right, only not remembered
            log.info("%s: not written (%s); the source files are hashed again next time",
                     memo_path, e.strerror or e)
        return out


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of each path, in threads; an interrupt (Ctrl-C) stops every thread within one
    block instead of waiting for whole files."""
    stop = Event()
    pool = ThreadPoolExecutor(min(THREADS, len(paths)))
    try:
        return list(pool.map(lambda p: sha256_file(p, on_block=stops_when(stop)), paths))
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _read_memo(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, *UNREADABLE_JSON):
        return {}  # none yet, or damaged: everything is hashed again
    if not isinstance(data, dict) or data.get("format") != MEMO_FORMAT or \
            not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, dict) and "sha256" in v}


def _write_memo(path: Path, memo: dict[str, dict]) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            json.dump({"format": MEMO_FORMAT, "files": memo}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
