"""Triton silu(gate) * up against its reference and torch's SiLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.plugins.gated_mlp import triton_reference as ref
from tests.gpu.support import assert_close, skip_unsupported, triton_device

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 14336), (77, 96), (300, 1536)], ids=str)
def test_silu_and_mul(dtype, shape):
    device = triton_device()
    skip_unsupported(dtype, device)
    pytest.importorskip("triton")
    from kiln.plugins.gated_mlp import triton_kernels

    t, inter = shape
    x = (torch.randn(t, 2 * inter, device=device) * 3).to(dtype)
    got = triton_kernels.silu_and_mul(x)
    assert_close(got, ref.silu_and_mul(x), dtype)
    assert_close(got, F.silu(x[:, :inter].float()) * x[:, inter:].float(), dtype)
