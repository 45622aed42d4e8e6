"""sha256 of a file: the one helper behind the converter's provenance, the builder's manifest
checksums, ``--verify_checksums`` and ``kiln verify``; and the check of the other files a
manifest records (:func:`other_file_problems`).

Reads in 16 MiB blocks (hashlib releases the GIL on them, so a hashing thread runs beside
other work); :func:`stops_when` makes such a thread end within a block once its caller is
interrupted. Non-goal: anything but sha256 hex digests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from threading import Event
from typing import Any

BLOCK_SIZE = 16 << 20
# a manifest's own digest (manifest_digest), recorded in it by its writer: kiln build, and
# kiln convert_checkpoint / kiln quantize for a checkpoint's config.json
DIGEST_KEY = "manifest_sha256"


def sha256_file(path: str | Path, on_block: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of a file's bytes; ``on_block(n)`` after each block read (progress bars)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            h.update(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()


class HashingStopped(Exception):
    """Raised by :func:`stops_when`'s callback: the caller stopped wanting the digest."""


def stops_when(stop: Event) -> Callable[[int], None]:
    """An ``on_block`` callback for :func:`sha256_file` that raises :class:`HashingStopped`
    once ``stop`` is set (a hashing thread of an interrupted command ends within a block)."""
    def check(_: int) -> None:
        if stop.is_set():
            raise HashingStopped

    return check


def other_file_problems(directory: Path, other_files: dict[str, str] | None,
                        writer: str = "the build", since: str = "the build",
                        record: str = "the manifest's") -> list[str]:
    """The files kiln wrote beside the config (tokenizer files, the generation config:
    ``other_files``, name -> sha256) that are gone or changed since: a chat template or
    sampling defaults edited in a shipped engine (none recorded by an older kiln). ``writer``,
    ``since`` and ``record`` word the messages (who wrote them, since when, where their sha256
    is)."""
    problems = []
    for name, digest in sorted((other_files or {}).items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing ({writer} wrote it)")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: changed since {since} (sha256 differs from {record})")
    return problems


def manifest_digest(data: dict[str, Any], as_written: bool = False) -> str | None:
    """sha256 of a manifest's content (an engine's or a checkpoint's config.json), its digest
    field left out: canonical JSON (sorted keys, no spaces), so that what is written and what
    is read back give the same digest, with each whole float as an int: ``100000.0`` and
    ``100000`` are one JSON number, which tools that rewrite JSON (JavaScript's among them)
    write either way. ``as_written``: numbers as parsed, the digest kiln recorded before
    2026-12-06. None for content kiln never writes (a NaN or Infinity, which Python's json
    reads): no recorded digest matches it."""
    content = {k: v for k, v in data.items() if k != DIGEST_KEY}
    try:
        text = json.dumps(content if as_written else _whole_floats_as_ints(content),
                          sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a trial's "eval_ppl": NaN had given a traceback
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _whole_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _whole_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_floats_as_ints(v) for v in value]
    return value


def manifest_edited(data: dict[str, Any]) -> bool:
    """Whether a manifest that records its digest (:data:`DIGEST_KEY`) was edited since: its
    content no longer gives that digest, nor the digest kiln recorded before (numbers as
    written); a null or malformed one never matches. False where none is recorded (written
    before kiln recorded it)."""
    if DIGEST_KEY not in data:
        return False
    recorded = data[DIGEST_KEY]
    return recorded is None or recorded not in (manifest_digest(data),
                                                manifest_digest(data, as_written=True))
