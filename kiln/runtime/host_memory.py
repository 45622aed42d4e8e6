"""The host memory this machine has free, for checks made before large allocations: on Linux
the kernel's OOM killer ends an overcommitted process before any allocation fails, so an engine
whose limits cannot fit is refused in one line instead (torch-free: the onnx path uses it)."""

from __future__ import annotations


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
