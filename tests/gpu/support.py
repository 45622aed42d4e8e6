"""Shared helpers of the GPU tests: the device Triton kernels run on, tolerances, fixtures.

Triton kernels run on a CUDA GPU; with ``TRITON_INTERPRET=1`` (set before Python starts) they
also run, slowly, in Triton's CPU interpreter, which is how they are debugged without a GPU.
The interpreter has no bfloat16 scalars, so bfloat16 cases run on GPUs only.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (atol, rtol) of a 16-bit kernel against its float32-math reference on the same inputs.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3),
             torch.bfloat16: (3e-2, 3e-2)}


def triton_device() -> torch.device:
    """The device Triton kernels run on here; skips the test where there is none."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if INTERPRET:
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1 to use Triton's CPU interpreter)")


def skip_unsupported(dtype: torch.dtype, device: torch.device) -> None:
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter has no bfloat16 scalars; bfloat16 runs on GPUs")


def alibi_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """The standard geometric ALiBi slopes 2^(-8 (h+1) / H) (MPT, BLOOM for powers of two)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)],
                        device=device)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    assert torch.isfinite(got).all(), "non-finite values in the kernel output"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
