"""Typed errors of the runtime. Each is a :class:`~kiln.errors.KilnError` with a one-line message.

Engine-dir problems (missing, corrupt, incompatible with this machine) raise
:class:`kiln.engine.EngineError`; the classes here cover requests, tokenizers and the KV cache.
"""

from __future__ import annotations

import math
from typing import Any

from kiln.errors import KilnError


def shown(value: Any, most: int = 40) -> str:
    """``repr(value)`` for a message, its middle cut out past ``most`` characters (a request's
    5,000-digit seed had been echoed whole)."""
    # (repr() refuses ints past 4,300 digits)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** most:
        digits = int(abs(value).bit_length() * math.log10(2)) + 1
        return f"{'a negative' if value < 0 else 'an'} integer of about {digits:,} digits"
    text = repr(value)
    return text if len(text) <= most else f"{text[:most // 2]}...{text[-8:]} ({len(text):,} " \
        f"characters)"


def described(value: Any) -> str:
    """A value in an error message: its type, and :func:`shown`'s form of it."""
    return f"{type(value).__name__} {shown(value)}"


class SamplingParamsError(KilnError, ValueError):
    """A sampling parameter is out of range; the message names the parameter (``field``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class RequestError(KilnError, ValueError):
    """One request cannot be served (prompt too long, empty, unknown id); others go on."""


class TokenizerError(KilnError):
    """The engine dir's tokenizer or chat template is missing or unreadable."""


class KVCacheError(KilnError):
    """The KV cache cannot be sized or cannot hold what was asked of it."""


class WorkerError(KilnError):
    """A rank of a multi-process engine died, failed or stopped answering; the message names
    the rank and the cause. The engine's other ranks are stopped: the engine cannot go on."""


class EngineClosedError(KilnError, RuntimeError):
    """An LLM was used after ``close()``: its executor and worker processes are gone."""
