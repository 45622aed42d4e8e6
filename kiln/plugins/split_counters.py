"""Arrival counters for kernels whose last program finishes the work of a tile split across
programs (the INT4 GEMV's split-K sum, split decode attention's merge).

Each program of a split tile stores its part, then adds one to its tile's counter (acq_rel, GPU
scope); the program that reads ``count - 1`` arrived last, sees every part, finishes the tile in
a fixed order (so the result does not depend on which program was last) and sets the counter
back to zero for the next call. A buffer is zero between calls, so one buffer per kernel family
and device serves every call: kernels on one device's stream run one after another (under PDL a
kernel waits for the one before it to finish before its first load). Calls on two streams of
one device at once would share counters; kiln launches these kernels on one stream per device.
"""

from __future__ import annotations

import functools

import torch

# Tiles a buffer counts at most (int32 each: 256 KiB per kernel family and device).
CAPACITY = 1 << 16


def split_counters(device: torch.device, family: str) -> torch.Tensor:
    """The zeroed counters of ``family`` (a kernel family's name) on ``device``, allocated on
    the first call. That call must not be inside a CUDA graph capture: the buffer's zeroing
    would run only when the graph replays."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _counters(device, family)


@functools.cache
def _counters(device: torch.device, family: str) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{family}: run it once on {device} before capturing a CUDA graph "
                           f"(its split counters are allocated on the first call)")
    return torch.zeros(CAPACITY, dtype=torch.int32, device=device)
