"""Triton single-row projection against its reference (F.linear) and with fused silu*up."""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.gemv import triton_reference as ref
from tests.gpu.support import assert_close, skip_unsupported, triton_device

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 14336), (20000, 64), (100, 24)],
                         ids=str)
@pytest.mark.parametrize("variant", ["plain", "bias", "silu"])
def test_gemv_matches_reference(dtype, shape, variant):
    device = triton_device()
    skip_unsupported(dtype, device)
    pytest.importorskip("triton")
    from kiln.plugins.gemv import triton_kernels

    n, k = shape
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    x = torch.randn(1, 2 * k if variant == "silu" else k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if variant == "bias" else None
    got = triton_kernels.gemv(x, w, b, silu_input=variant == "silu")
    assert got.shape == (1, n) and got.dtype == dtype
    assert_close(got, ref.gemv(x, w, b, silu_input=variant == "silu"), dtype)
