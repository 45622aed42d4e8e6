"""Typed errors for everything a user can get wrong.

The errors of the pipeline (convert, build, the engine dir contract) live here, the runtime's
in :mod:`kiln.runtime.errors`. Every error a user can cause is a :class:`KilnError`; its message is one line that says what is
wrong, where, and how to fix it. The CLI prints that line (exit code 2) and shows the traceback
only under ``--debug``. Anything else escaping is a bug in kiln.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any


def a_or_an(word: str) -> str:
    """``word`` after its article, for messages: "an onnx engine", "a torch engine"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def shown(value: Any, most: int = 40) -> str:
    """``repr(value)`` for a message, its middle cut out past ``most`` characters (a request's
    5,000-digit seed had been echoed whole)."""
    # (repr() refuses ints past 4,300 digits)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** most:
        digits = int(abs(value).bit_length() * math.log10(2)) + 1
        return f"{'a negative' if value < 0 else 'an'} integer of about {digits:,} digits"
    return cut(repr(value), most)


def cut(text: str, most: int = 40) -> str:
    """``text`` for a message, its middle cut out past ``most`` characters."""
    return text if len(text) <= most else f"{text[:most // 2]}...{text[-8:]} ({len(text):,} " \
        f"characters)"


def listed(names: list[str], most: int = 5) -> str:
    """A list of names for a one-line message, as Python writes a list, its first ``most``
    only and how many more: ``['a', 'b', 'c', 'd', 'e'] and 85 more`` (a checkpoint missing
    90 tensors had listed every one)."""
    if len(names) <= most:
        return str(names)
    return f"{names[:most]} and {len(names) - most} more"


def described(value: Any) -> str:
    """A value in an error message: its type, and :func:`shown`'s form of it."""
    return f"{type(value).__name__} {shown(value)}"


@dataclasses.dataclass(frozen=True)
class OutsideVocabulary:
    """A token id outside an engine's vocabulary ``[0, vocab_size)``, found by
    :func:`outside_vocabulary`; ``str()`` words it, naming ``path`` where there is one."""

    path: str | None  # label[k] (label[b][k] in a batch's rows); None: the id names it alone
    token: Any
    vocab_size: int

    def __str__(self) -> str:
        where = "" if self.path is None else f"{self.path}: "
        value = shown(self.token)  # (past 40 digits: "an integer of about 301 digits")
        token = f"token id {value}" if value.lstrip("-")[:1].isdigit() else f"a token id, {value},"
        return (f"{where}{token} is outside the vocabulary [0, {self.vocab_size}); pass ids of "
                f"the model's tokenizer")


def outside_vocabulary(ids: Sequence[Any], vocab_size: int,
                       label: str | None = None) -> OutsideVocabulary | None:
    """The first of ``ids`` outside the vocabulary ``[0, vocab_size)``, by its path (``label[k]``;
    ``label[b][k]`` in nested sequences), or None when every id is inside: the one wording of
    this refusal (the runtime's, kiln run's, kiln serve's, the reference decoder's and
    evaluate's had each had their own). The caller raises its error with it."""
    for k, token in enumerate(ids):
        path = None if label is None else f"{label}[{k}]"
        if isinstance(token, (list, tuple)):
            found = outside_vocabulary(token, vocab_size, path)
            if found is not None:
                return found
        elif not 0 <= token < vocab_size:
            return OutsideVocabulary(path, token, vocab_size)
    return None


def json_type(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words ("a number", "an array", "null")."""
    for kind, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def as_json(value: Any) -> str:
    """A parsed JSON value in JSON's words, cut as :func:`cut` cuts: null, true, a number 1.5,
    a string "a"."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if not isinstance(value, (int, float, str, list, dict)):  # a Python caller's object
        return described(value)
    return f"{json_type(value)} {cut(json.dumps(value, ensure_ascii=False, default=repr))}"


def malformed(error: KeyError | TypeError | ValueError) -> str:
    """What a config's KeyError, TypeError or ValueError says, in a user's words: the key
    missing rather than Python's ``KeyError('dtype')`` or ``__init__() missing 1 required
    positional argument`` (a retest's deleted keys)."""
    if isinstance(error, KeyError):
        return f"missing key {error.args[0]!r}"
    found = re.search(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.+)$",
                      str(error))
    if found:
        return f"missing key{'s' if ' and ' in found[1] else ''} {found[1]}"
    return str(error)


# Whether messages name options as the CLI's flags: set while a kiln command runs
# (:func:`options_as_flags`), else they name the Python API's keywords.
_AS_FLAGS: contextvars.ContextVar[bool] = contextvars.ContextVar("kiln_options_as_flags",
                                                                 default=False)
# Whether the engine that messages advise on is built from the options of the command (or call)
# that runs it (the build cache's: kiln run --model_dir): set by :func:`limits_as_options`.
_LIMITS_AS_OPTIONS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "kiln_limits_as_options", default=False)
_NO_VALUE = object()


def named_as_flags() -> bool:
    """Whether messages made here name options as flags (:func:`options_as_flags`)."""
    return _AS_FLAGS.get()


@dataclasses.dataclass(frozen=True)
class Wording:
    """How messages made here word options (:func:`options_as_flags`) and an engine's limits
    (:func:`limits_as_options`): what a process kiln starts (a replica, a rank) is told
    (:func:`wording`) and words its messages in (:func:`worded`), as its starter does."""

    as_flags: bool = False
    limits_as_options: bool = False


def wording() -> Wording:
    """The :class:`Wording` of messages made here."""
    return Wording(_AS_FLAGS.get(), _LIMITS_AS_OPTIONS.get())


@contextlib.contextmanager
def worded(given: Wording) -> Iterator[None]:
    """Messages made inside are worded as ``given`` says (a started process's: its starter's
    :func:`wording`)."""
    with options_as_flags(given.as_flags), limits_as_options(given.limits_as_options):
        yield


def option(name: str, value: Any = _NO_VALUE, flag: str | None = None) -> str:
    """An option in a message as its user gave it, so that one message serves both: from
    Python its keyword, ``dp`` or ``dp=2``; inside a kiln command (:func:`options_as_flags`)
    its flag, ``--dp`` or ``--dp 2`` (``True``: the flag alone). The flag is ``--`` and the
    keyword, as the CLI builds them from the options dataclasses' fields, unless ``flag`` names
    another (``option("model", flag="model_dir")``: ``LLM(model=...)`` is ``--model_dir``)."""
    if named_as_flags():
        flag = f"--{flag or name}"
        return flag if value is _NO_VALUE or value is True else f"{flag} {value}"
    if value is _NO_VALUE:
        return name
    shown_value = repr(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else value
    return f"{name}={shown_value}"


def build_larger(name: str) -> str:
    """Advice to build the engine again with a larger limit ``name``, in its user's words
    (:func:`option`): from Python ``build with a larger max_input_len (kiln.build, or beside
    LLM(model=...))``, inside a kiln command ``build with a larger --max_input_len (kiln
    build, or beside --model_dir)``; a Python caller had been told of flags it has not. Of an
    engine built from the options given (:func:`limits_as_options`): ``pass a larger
    --max_input_len``."""
    if _LIMITS_AS_OPTIONS.get():
        return f"pass a larger {option(name)}"
    where = "kiln build, or beside --model_dir" if named_as_flags() else \
        "kiln.build, or beside LLM(model=...)"
    return f"build with a larger {option(name)} ({where})"


def build_smaller(*names: str) -> str:
    """Advice to build the engine again with smaller limits ``names`` (either will do), in its
    user's words (:func:`option`): ``rebuild with a smaller --max_seq_len or --max_batch_size``;
    of an engine built from the options given (:func:`limits_as_options`), ``pass a smaller
    --max_seq_len or --max_batch_size``: a ``kiln run --model_dir`` user had been told to
    rebuild an engine that no build of theirs made."""
    verb = "pass" if _LIMITS_AS_OPTIONS.get() else "rebuild with"
    return f"{verb} a smaller {' or '.join(option(name) for name in names)}"


def build_with(name: str, value: Any = True) -> str:
    """A build with option ``name`` set, in its user's words (:func:`option`): from Python
    ``kiln.build(..., gather_context_logits=True)``, inside a kiln command ``kiln build
    --gather_context_logits``."""
    if named_as_flags():
        return f"kiln build {option(name, value)}"
    return f"kiln.build(..., {option(name, value)})"


@contextlib.contextmanager
def options_as_flags(on: bool = True) -> Iterator[None]:
    """Messages made inside name options as flags (:func:`option`; not with ``on`` False): the
    CLI runs its commands in this."""
    token = _AS_FLAGS.set(on)
    try:
        yield
    finally:
        _AS_FLAGS.reset(token)


@contextlib.contextmanager
def limits_as_options(on: bool = True) -> Iterator[None]:
    """Messages made inside advise other engine limits as options to pass again
    (:func:`build_smaller`, :func:`build_larger`; not with ``on`` False): the engine they are
    about is built from the options of the command that runs it (``--model_dir``), not by a
    kiln build of its user's."""
    token = _LIMITS_AS_OPTIONS.set(on)
    try:
        yield
    finally:
        _LIMITS_AS_OPTIONS.reset(token)


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one, for messages: "1 token", "7 tokens"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# What json.loads raises on text it cannot read: bad JSON or bad UTF-8 (ValueError subclasses),
# an integer past Python's digit limit (a plain ValueError), nesting past the recursion limit.
UNREADABLE_JSON = (ValueError, RecursionError)
# How kiln reads the JSON and text files users supply (a checkpoint's config.json and tokenizer
# files, chat templates): UTF-8, with or without the byte-order mark Windows editors write
# (json.loads refuses one: "Unexpected UTF-8 BOM (decode using utf-8-sig)").
USER_TEXT = "utf-8-sig"


class KilnError(Exception):
    """Base class of user-facing errors (bad input, unsupported models, unusable machines)."""


class ConfigError(KilnError, ValueError):
    """A model or build configuration is invalid or unsupported."""


class SettingRangeError(ConfigError):
    """A setting of kiln's model config (``DecoderConfig``) out of its range, named as kiln
    names it (conversion says which config.json it came from)."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture has no registered converter."""


class CheckpointError(KilnError):
    """A checkpoint (source or kiln) is missing, corrupt, or does not match its config."""


class TensorMappingError(CheckpointError):
    """Source tensors and the converter's mapping disagree (missing or unexpected names)."""


class OutputExistsError(KilnError, FileExistsError):
    """The output directory already exists and ``overwrite`` was not asked for."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint was found and loading pickles was not allowed."""


class HubError(KilnError):
    """The Hugging Face hub could not provide the requested model."""


class OutputError(OutputExistsError):
    """The output directory cannot be written or replaced safely (what is in the way is named)."""


class EngineError(KilnError):
    """An engine dir is missing, corrupt, or cannot run on this machine."""


class BuildError(EngineError):
    """A backend failed to build an engine from a valid plan (the library said why)."""


class DatasetError(KilnError):
    """A text dataset (calibration or evaluation) is missing, unreadable or has no text."""


class QuantizationError(KilnError):
    """A checkpoint cannot be quantized as asked (already quantized, sizes the format refuses)."""


class AccuracyGateError(QuantizationError):
    """The quantized model is further from its source than the accuracy gate allows."""


class BuildCacheError(KilnError):
    """The build cache (``$KILN_CACHE_DIR/engines``) cannot be used as asked: an unwritable
    cache directory, something in the way of an entry that the cache did not create."""


def check_counts(options: Any, error: type[Exception], at_least: dict[str, int] | None = None,
                 as_options: bool = True) -> None:
    """Each integer field of a dataclass of options (annotated ``int``, or ``int | None`` where
    None means "the default") holds an int, not a bool, of at least 1 (or ``at_least[name]``):
    the options classes had each checked their own, and build's took ``max_batch_size=True``.
    A field is named as its user gave it (:func:`option`: ``kiln quantize --group_size 0`` had
    been told of ``group_size``), or as it is, where ``as_options`` is False: the fields of a
    file kiln wrote (an engine's limits), which no flag sets."""
    for f in dataclasses.fields(options):
        if f.type not in ("int", "int | None"):
            continue
        value = getattr(options, f.name)
        if value is None and f.type == "int | None":
            continue
        least = (at_least or {}).get(f.name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            wanted = "a positive integer" if least == 1 else f"an integer >= {least}"
            name = option(f.name) if as_options else f.name
            raise error(f"{name} must be {wanted}, found {shown(value)}")


def check_flags(options: Any, error: type[Exception]) -> None:
    """Each true/false field of a dataclass of options (annotated ``bool``, or ``bool | None``
    where None means "the default") holds a bool: the Python API's ``overwrite="no"`` is a
    truthy string, and had replaced an existing output."""
    for f in dataclasses.fields(options):
        if f.type not in ("bool", "bool | None"):
            continue
        value = getattr(options, f.name)
        if not (value is None and f.type == "bool | None"):
            check_flag(f.name, value, error)


def check_integer(name: str, value: Any, error: type[Exception]) -> None:
    """``value`` is an int, not a bool, its range the caller's to check: a Python caller's
    ``evaluate(..., max_length="64")`` had been a TypeError of a comparison. Named as its user
    gave it (:func:`option`)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{option(name)} must be an integer, found {shown(value)}")


def check_path(name: str, value: Any, error: type[Exception], give: str,
               directory: bool = False, flag: str | None = None) -> None:
    """``value`` is a path as a Python caller gives one: a str or os.PathLike (a caller's
    ``convert_checkpoint(src, None)`` had been Python's "expected str, bytes or os.PathLike
    object"), not empty or blank (``Path("")`` is the current directory: a trial's
    ``cache_dir=""`` had built into ./engines), and, for a ``directory``, not ``-``, which
    the CLI reads as standard input or output (``convert_checkpoint(src, "-")`` had written a
    directory named "-"): a str ``"-"`` and ``Path("-")`` alike (``Path("./-")`` is
    ``Path("-")``): the str ``"./-"``, or an absolute path, names one. ``give``:
    the fix for an empty one ("give the directory to write"). Named as its user gave it
    (:func:`option`; ``flag``: its flag's name where that is not ``name``). (``Path("")`` itself
    is ``Path(".")``: nothing tells them apart.)"""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        found = "None" if value is None else described(value)
        raise error(f"{option(name, flag=flag)} must be a path (a str or os.PathLike), found "
                    f"{found}")
    if not text.strip():
        raise error(f"{option(name, flag=flag)} is empty; {give}")
    if "\0" in text:  # no file system's name holds one (kiln.build's had been a bare ValueError)
        raise error(f"{option(name, value, flag)} holds a NUL character, which no path can hold; "
                    f"give the path without it")
    if directory and text == "-":
        raise error(f"{option(name, value, flag)}: kiln reads '-' as standard input or output, not "
                    f"a directory; give the directory's path (./- for one named '-')")


def check_flag(name: str, value: Any, error: type[Exception]) -> None:
    """``value`` is a bool (a Python caller's ``progress="yes"`` is a truthy string)."""
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, found {shown(value)}")
