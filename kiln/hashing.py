"""sha256 of a file: the one helper behind the converter's provenance, the builder's manifest
checksums, ``--verify_checksums`` and ``kiln verify``.

Reads in 16 MiB blocks (hashlib releases the GIL on them, so a hashing thread runs beside
other work). Non-goal: anything but sha256 hex digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

BLOCK_SIZE = 16 << 20


def sha256_file(path: str | Path, on_block: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of a file's bytes; ``on_block(n)`` after each block read (progress bars)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            h.update(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()
