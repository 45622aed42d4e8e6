"""Typed errors of the runtime. Each is a :class:`~kiln.errors.KilnError` with a one-line message.

Engine-dir problems (missing, corrupt, incompatible with this machine) raise
:class:`kiln.engine.EngineError`; the classes here cover requests, tokenizers and the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.errors import KilnError, build_larger, shown

NO_VALUE: Any = object()  # a SamplingParamsError's value where its message shows none


class SamplingParamsError(KilnError, ValueError):
    """A sampling parameter is out of range. ``field`` names it (``stop[1]``: an entry of
    ``stop``), ``problem`` says what is wrong, and ``value``, where the message ends "found
    <value>", is the value at fault: a caller that spells values otherwise words the message
    with :meth:`worded` (kiln serve shows JSON's ``100`` and ``NaN``, not Python's ``100.0`` and
    ``nan``). ``str()``: ``SamplingParams.top_p must be in (0, 1], found 100.0``."""

    def __init__(self, field: str, problem: str, value: Any = NO_VALUE):
        self.field, self.problem, self.value = field, problem, value
        super().__init__(f"SamplingParams.{self.name} {self.worded(shown)}")

    @property
    def name(self) -> str:
        """The parameter's name (``stop`` for ``stop[1]``)."""
        return self.field.partition("[")[0]

    def worded(self, show: Callable[[Any], str]) -> str:
        """What is wrong, after the parameter's name: ``problem``, and ``value`` as ``show``
        shows it (``must be in (0, 1], found 100.0``)."""
        if self.value is NO_VALUE:
            return self.problem
        return f"{self.problem}, found {show(self.value)}"

    def __reduce__(self) -> tuple[Any, ...]:  # pickled as made (a replica's error, sent back)
        no_value = self.value is NO_VALUE
        return type(self), (self.field, self.problem) + (() if no_value else (self.value,))


class RequestError(KilnError, ValueError):
    """One request cannot be served (prompt too long, empty, unknown id); others go on.
    ``field``: the request's part at fault where the refusal names one (``stop_token_ids[1]``),
    for a caller that points at it (kiln serve's ``param``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple:  # pickled as made (a replica's refusal, sent back)
        return type(self), (str(self), self.field)


class TokenizerError(KilnError):
    """The engine dir's tokenizer or chat template is missing or unreadable."""


class KVCacheError(KilnError):
    """The KV cache cannot be sized or cannot hold what was asked of it."""


class WorkerError(KilnError):
    """A rank of a multi-process engine died, failed or stopped answering; the message names
    the rank and the cause. The engine's other ranks are stopped: the engine cannot go on."""


class EngineClosedError(KilnError, RuntimeError):
    """An LLM was used after ``close()``: its executor and worker processes are gone."""


class StepInterrupted(KilnError, RuntimeError):
    """An executor's step ended early because :meth:`~kiln.runtime.executor.Executor.interrupt`
    asked it to (a close, or an abort of every request, from another thread). Nothing of it
    was committed: the same step may run again."""


def prompt_too_long(tokens: str, max_input_len: int, why: str = "") -> str:
    """The message of a prompt over the engine's ``max_input_len`` (``tokens``: its count in
    words, "1,200" or "more than 1,000"; ``why``: how that is known, in parentheses)."""
    return (f"prompt of {tokens} tokens exceeds the engine's max_input_len {max_input_len}"
            f"{f' ({why})' if why else ''}; shorten it, or {build_larger('max_input_len')}")
