"""Byte sizes as users write them: ``20GB``, ``20G``, ``512MiB``, ``1.5e9`` or plain bytes.

The one parser of the CLI's size flags (``--max_build_memory``, ``--max_cache_size``,
``--max_body_bytes``: :class:`kiln.cli.context.MemorySize`) and of the Python API's size
keywords, which take the same strings and a number of bytes: ``kiln.build(...,
max_build_memory="18GB")`` had been refused while ``kiln build --max_build_memory 18GB`` built.
Decimal units are powers of 1000 (``GB``, ``G``), binary ones of 1024 (``GiB``), any case.

And the one formatter of sizes in messages (:func:`size_text`): host memory in binary units, so
that what ``kiln build`` warns an engine's KV cache needs and what ``kiln run`` refuses it for
read alike (a trial's build had said "9437183999.9 GB" and its run "8583068.8 TiB" of one
cache); build budgets in decimal ones, as ``--max_build_memory`` parses them; the build cache's
sizes in SI symbols (``5.0 kB``), as ``kiln cache list`` shows them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from kiln.errors import ConfigError, counted, named_as_flags, option, shown

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
         "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}
MAX_SIZE = 10**18  # bytes: one exabyte
NOT_A_SIZE = "is not a size like 20GB, 512MiB or 2000000000"
SIZE_FORMS = "give bytes (an integer), or a size with its unit such as 20GB or 512MiB"
_SIZE = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: Any, least: int | None = 1) -> int:
    """Bytes of ``value``: an int (bytes), or a number, or a string of a number and a unit
    (:data:`UNITS`), a unit's fractions of a byte dropped (1.1GiB). ValueError otherwise,
    whose message follows the value in a refusal: "is not a size like ...", "is more than any
    machine holds ...", "must be at least 1 byte" (``least`` None: any count under 1 EB, 0 and
    negatives included, for a caller that tells its own minimum), "is not a whole number of
    bytes ..." (a number without a unit: ``max_build_memory=1.5`` had been 1 byte)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(NOT_A_SIZE)
    if isinstance(value, int):
        size: float = value
    else:
        match = _SIZE.fullmatch(value if isinstance(value, str) else repr(value))  # nan, inf
        unit = match.group(2).lower() if match else None
        if match is None or unit not in UNITS:
            raise ValueError(NOT_A_SIZE)
        size = float(match.group(1)) * UNITS[unit]
        if UNITS[unit] == 1 and size <= MAX_SIZE and size != int(size):
            raise ValueError(f"is not a whole number of bytes; {SIZE_FORMS}")
    if size > MAX_SIZE:  # 1e400GB is infinite as a float, and no machine's anyway
        raise ValueError("is more than any machine holds (at most 1 EB)")
    if least is not None and size < least:
        raise ValueError(f"must be at least {counted(least, 'byte')}")
    return int(max(size, -MAX_SIZE))  # (-1e400GB: int() of -inf raises)


def size_option(name: str, value: Any, least: int = 1, short: str = "",
                fix: str = "") -> int | None:
    """The bytes of the size option ``name`` (None stays None: the default), or a
    :class:`~kiln.errors.ConfigError` naming it and its value as its user gave them (``kiln
    serve --max_body_bytes 1KB``'s text, not its 1000 bytes). ``least``: the fewest bytes it
    takes; under it, 0 and negatives included, the refusal says ``short`` (why: "less than the
    400 MiB any build needs") and ``fix`` ("give 400MiB or more") at once: a trial's 0 had been
    told "at least 1 byte", then its 1 that it needed 400 MiB."""
    if value is None:
        return None
    given = option(name, value) if named_as_flags() else f"{option(name)} {shown(value)}"
    try:
        size = parse_size(value, least=1 if least <= 1 else None)
    except ValueError as e:
        forms = " (a string, or a number of bytes)" if str(e) == NOT_A_SIZE else ""
        raise ConfigError(f"{given} {e}{forms}") from None
    if size < least:
        bytes_ = f"{counted(size, 'byte')}, " if size >= 0 else ""
        raise ConfigError(f"{given} is {bytes_}{short}; {fix}")
    return size


@dataclass(frozen=True)
class Rung:
    """One unit of a :data:`LADDERS` ladder: figures from ``since`` bytes are told in it."""

    unit: str
    scale: float  # bytes
    since: float  # bytes
    decimals: int = 0
    round_up: bool = False  # at no ``digits``: never "0" of it (a need of 1 byte is "1 KiB")


# Each ladder's last rung takes whatever is left.
LADDERS: dict[str, tuple[Rung, ...]] = {
    # host memory (kiln build's KV cache warning, kiln run's refusals)
    "binary": (Rung("EiB", 2**60, 2**60, 1), Rung("PiB", 2**50, 2**50, 1),
               Rung("TiB", 2**40, 2**40, 1), Rung("GiB", 2**30, 2**30 / 10, 1),
               Rung("MiB", 2**20, 2**20), Rung("KiB", 2**10, 0, round_up=True)),
    # build budgets, as --max_build_memory parses them ("1 KB" from 999.5 bytes)
    "decimal": (Rung("GB", 1e9, 1e8, 1), Rung("MB", 1e6, 1e6), Rung("KB", 1e3, 999.5),
                Rung("bytes", 1, 0)),
    # the build cache: kiln cache list's column, its prune and the cache's warnings
    "si": (Rung("GB", 1e9, 1e9, 1), Rung("MB", 1e6, 1e6, 1), Rung("kB", 1e3, 1e3, 1),
           Rung("B", 1, 0)),
}
Units = Literal["binary", "decimal", "si"]


def size_text(n: float, units: Units = "binary", digits: int = 0) -> str:
    """Bytes for a message, in the first unit of ``LADDERS[units]`` that ``n`` reaches, with
    its decimals and ``digits`` more: "1.2 GiB", "5 MiB", "1 KiB" (binary: never "0.0 GiB",
    nor "0 KiB"); "18.0 GB", "2 MB", "1 KB", "1 byte" (decimal); "2.0 MB", "5.0 kB", "0 B"
    (si)."""
    ladder = LADDERS[units]
    rung = next((r for r in ladder[:-1] if n >= r.since), ladder[-1])
    if rung.round_up and not digits:
        return f"{max(1, math.ceil(n / rung.scale))} {rung.unit}"
    text = f"{n / rung.scale:.{rung.decimals + digits}f}"
    return "1 byte" if (text, rung.unit) == ("1", "bytes") else f"{text} {rung.unit}"


def need_and_available(need: float, available: float) -> tuple[str, str]:
    """:func:`size_text` of both, with the decimals it takes for a need above what is available
    to read as more ("need 0.2 GiB, and 0.2 GiB is available" had refused a start)."""
    for digits in range(4):
        texts = size_text(need, digits=digits), size_text(available, digits=digits)
        if texts[0] != texts[1]:
            return texts
    return f"{need:.0f} bytes", f"{available:.0f} bytes"
