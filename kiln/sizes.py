"""Byte sizes as users write them: ``20GB``, ``20G``, ``512MiB``, ``1.5e9`` or plain bytes.

The one parser of the CLI's size flags (``--max_build_memory``, ``--max_cache_size``,
``--max_body_bytes``: :class:`kiln.cli.context.MemorySize`) and of the Python API's size
keywords, which take the same strings and a number of bytes: ``kiln.build(...,
max_build_memory="18GB")`` had been refused while ``kiln build --max_build_memory 18GB`` built.
Decimal units are powers of 1000 (``GB``, ``G``), binary ones of 1024 (``GiB``), any case.

And the one formatter of memory figures in messages (:func:`size_text`), binary units: what
``kiln build`` warns an engine's KV cache needs and what ``kiln run`` refuses it for read alike
(a trial's build had said "9437183999.9 GB" and its run "8583068.8 TiB" of one cache).
"""

from __future__ import annotations

import math
import re
from typing import Any

from kiln.errors import ConfigError, option, shown

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
         "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}
MAX_SIZE = 10**18  # bytes: one exabyte
NOT_A_SIZE = "is not a size like 20GB, 512MiB or 2000000000"
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: Any) -> int:
    """Bytes of ``value``: an int (bytes), or a number, or a string of a number and a unit
    (:data:`UNITS`), fractions of a byte dropped. ValueError otherwise, whose message follows
    the value in a refusal: "is not a size like ...", "is more than any machine holds ...",
    "must be at least 1 byte"."""
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
    if size > MAX_SIZE:  # 1e400GB is infinite as a float, and no machine's anyway
        raise ValueError("is more than any machine holds (at most 1 EB)")
    if int(size) < 1:
        raise ValueError("must be at least 1 byte")
    return int(size)


def size_option(name: str, value: Any) -> int | None:
    """The bytes of the size option ``name`` (None stays None: the default), or a
    :class:`~kiln.errors.ConfigError` naming it as its user gave it."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        forms = " (a string, or a number of bytes)" if str(e) == NOT_A_SIZE else ""
        raise ConfigError(f"{option(name)} {shown(value)} {e}{forms}") from None


def size_text(n: float, digits: int = 0) -> str:
    """Bytes for a message: EiB, PiB or TiB (one decimal) from 1 of each, GiB (one decimal)
    from 0.1 GiB, else MiB, else KiB (never "0.0"); ``digits`` more decimals."""
    for unit, power in (("EiB", 60), ("PiB", 50), ("TiB", 40)):
        if n >= 2**power:
            return f"{n / 2**power:.{1 + digits}f} {unit}"
    if n >= 2**30 / 10:
        return f"{n / 2**30:.{1 + digits}f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.{digits}f} MiB"
    return f"{max(1, math.ceil(n / 2**10))} KiB" if not digits else f"{n / 2**10:.{digits}f} KiB"


def need_and_available(need: float, available: float) -> tuple[str, str]:
    """:func:`size_text` of both, with the decimals it takes for a need above what is available
    to read as more ("need 0.2 GiB, and 0.2 GiB is available" had refused a start)."""
    for digits in range(4):
        texts = size_text(need, digits), size_text(available, digits)
        if texts[0] != texts[1]:
            return texts
    return f"{need:.0f} bytes", f"{available:.0f} bytes"
