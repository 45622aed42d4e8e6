"""The build cache: an HF checkpoint (local dir or hub id) + build options -> an engine dir,
converted and built once per machine, then reused.

Public: :func:`engine_for_model` (an HF checkpoint -> its cached engine dir),
:func:`hold_engine` (keeps prune and ``--overwrite`` away while an engine is used),
:func:`cached_engine` (both: what ``--model_dir`` on run/bench/eval and ``LLM(model=...)`` use),
:class:`EngineCache` (entries, ``kiln cache list`` / ``prune``), :func:`cache_root`.

Where what lives: the key (what decides an engine) in :mod:`kiln.build_cache.key`, memoized
source hashes in :mod:`kiln.build_cache.hashes`, the on-disk layout, locks and pruning in
:mod:`kiln.build_cache.store` (torch-free, for ``kiln cache list``), the lookup-or-build in
:mod:`kiln.build_cache.api`. User documentation: docs/build_cache.md.

Non-goals: caching kiln checkpoints (each entry converts again; only the engine is kept),
``kiln quantize`` inside the cache, sharing a cache between machines.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "engine_for_model": "kiln.build_cache.api",
    "hold_engine": "kiln.build_cache.api",
    "cached_engine": "kiln.build_cache.api",
    "EngineCache": "kiln.build_cache.store",
    "Entry": "kiln.build_cache.store",
    "cache_root": "kiln.build_cache.store",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.build_cache' has no attribute {name!r}")
