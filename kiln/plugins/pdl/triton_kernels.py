"""The device side of programmatic dependent launch: the first statement of every kernel that
takes part (the policy, without Triton: :mod:`kiln.plugins.pdl`)."""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def prologue(PDL: tl.constexpr):
    """First statement of a PDL kernel: wait for the kernel before it (its writes are visible
    after this), then let the next kernel's programs be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
