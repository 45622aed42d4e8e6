"""Runtime: executors, KV caches, scheduling and sampling over built engines.

Public API: :class:`LLM` (sync generate / generate_stream / chat), :class:`AsyncLLM` (asyncio
submit / stream / abort), :class:`SamplingParams`, and the result types. The names are imported
lazily (PEP 562), so ``from kiln.runtime import SamplingParams`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LLM": "kiln.runtime.llm",
    "AsyncLLM": "kiln.runtime.async_llm",
    "SamplingParams": "kiln.runtime.params",
    "TokenLogprobs": "kiln.runtime.params",
    "ExecutorOptions": "kiln.runtime.loader",
    "open_engine": "kiln.runtime.loader",
    "CompletionResult": "kiln.runtime.results",
    "RequestTimings": "kiln.runtime.results",
    "StreamDelta": "kiln.runtime.results",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
