"""Programmatic dependent launch (PDL) of kiln's decode-path Triton kernels (Hopper and newer).

A kernel launched with PDL may start while the kernel before it on the stream is finishing:
its programs are scheduled as the previous kernel's last programs run, and wait for that
kernel's completion and memory (``griddepcontrol.wait``) before their first load. A batch-1
decode step is ~10 small kernels per layer, each a few microseconds, so the launch gap between
two kernels is a few percent of the step. Each kernel that takes part calls ``prologue``
(:mod:`.triton_kernels`) before anything else (nothing unless ``PDL``) and is launched with ``launch_pdl=PDL``; both
come from :func:`enabled`. CUDA graphs capture the dependency (programmatic edges).

On by default on CUDA devices of compute capability 9.0 and newer (``griddepcontrol`` does
not exist before sm90); ``KILN_PDL=0`` turns it off, ``KILN_PDL=1`` asks for it (on a GPU
below sm90 that is said once, and the kernels launch as usual). Measured on an H200
(benchmarks/GPU_NOTES.md, "Issue 12, third pass"): batch-1 decode of the 8B shape 224.6 ->
236.5 tok/s in bf16, 339.3 -> 361.8 in FP8; the GPU test suite passed whole with it on
(1061 tests, 2026-12-02). Kernels outside this set (cuBLAS, torch ops) launch as usual: a PDL
kernel after one of them starts when it completes, as without PDL.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV = "KILN_PDL"


def enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` use PDL: an sm90+ CUDA device, unless ``KILN_PDL=0``."""
    if device.type != "cuda":
        return False
    setting = _setting(os.environ.get(ENV))
    if setting == "0":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device(),
                      setting == "1")


@functools.cache
def _setting(value: str | None) -> str | None:
    """``KILN_PDL`` as "0", "1" or None (the default); another value is said once and ignored."""
    if value in (None, "0", "1"):
        return value
    logger.warning("%s=%r ignored: it takes 0 (off) or 1 (on); PDL stays at its default (on "
                   "for compute capability 9.0 and newer)", ENV, value)
    return None


@functools.cache
def _supported(index: int, asked: bool) -> bool:
    ok = torch.cuda.get_device_capability(index) >= (9, 0)
    if not ok and asked:
        logger.warning("%s=1 ignored on %s: programmatic dependent launch needs compute "
                       "capability 9.0 or newer", ENV, torch.cuda.get_device_name(index))
    return ok
