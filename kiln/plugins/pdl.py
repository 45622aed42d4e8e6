"""Programmatic dependent launch (PDL) of kiln's decode-path Triton kernels (Hopper and newer).

A kernel launched with PDL may start while the kernel before it on the stream is finishing:
its programs are scheduled as the previous kernel's last programs run, and wait for that
kernel's completion and memory (``griddepcontrol.wait``) before their first load. A batch-1
decode step is ~10 small kernels per layer, each a few microseconds, so the launch gap between
two kernels is a few percent of the step. Each kernel that takes part calls :func:`prologue`
before anything else (nothing unless ``PDL``) and is launched with ``launch_pdl=PDL``; both
come from :func:`enabled`. CUDA graphs capture the dependency (programmatic edges).

Off by default: ``KILN_PDL=1`` turns it on for CUDA devices of compute capability 9.0 and
newer (``griddepcontrol`` does not exist before sm90; elsewhere the flag is ignored, and said
so once). Measured on an H200 (benchmarks/GPU_NOTES.md, "Issue 12, third pass"): batch-1
decode of the 8B shape 224.6 -> 236.5 tok/s in bf16, 339.3 -> 361.8 in FP8. It stays opt-in
until the GPU test suite has run green with it on (the one run so far was cut short by its
time limit with a failure it did not name). Kernels outside this set (cuBLAS, torch ops)
launch as usual: a PDL kernel after one of them starts when it completes, as without PDL.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

logger = logging.getLogger(__name__)

ENV = "KILN_PDL"


def enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` use PDL: ``KILN_PDL=1`` and an sm90+ CUDA device."""
    if os.environ.get(ENV, "0") != "1" or device.type != "cuda":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _supported(index: int) -> bool:
    ok = torch.cuda.get_device_capability(index) >= (9, 0)
    if not ok:
        logger.warning("%s=1 ignored on %s: programmatic dependent launch needs compute "
                       "capability 9.0 or newer", ENV, torch.cuda.get_device_name(index))
    return ok


@triton.jit
def prologue(PDL: tl.constexpr):
    """First statement of a PDL kernel: wait for the kernel before it (its writes are visible
    after this), then let the next kernel's programs be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
