"""Byte sizes as users write them: ``20GB``, ``20G``, ``512MiB``, ``1.5e9`` or plain bytes.

The one parser of the CLI's size flags (``--max_build_memory``, ``--max_cache_size``,
``--max_body_bytes``: :class:`kiln.cli.context.MemorySize`) and of the Python API's size
keywords, which take the same strings and a number of bytes: ``kiln.build(...,
max_build_memory="18GB")`` had been refused while ``kiln build --max_build_memory 18GB`` built.
Decimal units are powers of 1000 (``GB``, ``G``), binary ones of 1024 (``GiB``), any case.
"""

from __future__ import annotations

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
