"""Typed errors of the runtime. Each is a :class:`~kiln.errors.KilnError` with a one-line message.

Engine-dir problems (missing, corrupt, incompatible with this machine) raise
:class:`kiln.engine.EngineError`; the classes here cover requests, tokenizers and the KV cache.
"""

from __future__ import annotations

from kiln.errors import KilnError, build_larger


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


def prompt_too_long(tokens: str, max_input_len: int, why: str = "") -> str:
    """The message of a prompt over the engine's ``max_input_len`` (``tokens``: its count in
    words, "1,200" or "more than 1,000"; ``why``: how that is known, in parentheses)."""
    return (f"prompt of {tokens} tokens exceeds the engine's max_input_len {max_input_len}"
            f"{f' ({why})' if why else ''}; shorten it, or {build_larger('max_input_len')}")
