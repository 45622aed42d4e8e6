"""The host memory this machine has free, for checks made before large allocations: on Linux
the kernel's OOM killer ends an overcommitted process before any allocation fails, so an engine
whose limits cannot fit is refused in one line instead (torch-free: the onnx path uses it)."""

from __future__ import annotations

import math


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None



def size_text(n: float, digits: int = 0) -> str:
    """Bytes for a message: TiB (one decimal) from 1 TiB, GiB (one decimal) from 0.1 GiB, else
    MiB, else KiB (never "0.0"); ``digits`` more decimals."""
    if n >= 2**40:
        return f"{n / 2**40:.{1 + digits}f} TiB"
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
