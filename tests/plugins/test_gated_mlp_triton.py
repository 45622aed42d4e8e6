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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "pre_quant_scale"])
def test_silu_and_mul_quantized_for_fp8_equals_the_projections_own_pass(dtype, smooth):
    """``quant_scale`` (and the down projection's ``pre_quant_scale``): the product as FP8, bit
    for bit what the projection makes of the product in the model dtype (smoothed as it
    smooths, then its activation pass)."""
    device = triton_device()
    skip_unsupported(dtype, device)
    if device.type == "cpu":
        pytest.skip("fp8 casts run on GPUs only")
    pytest.importorskip("triton")
    from kiln.plugins.gated_mlp import triton_kernels
    from kiln.plugins.quant_linear.triton_kernels import _ACT_FP8, _quantize_rows

    t, inter = 300, 1536
    x = (torch.randn(t, 2 * inter, device=device) * 3).to(dtype)
    s = torch.tensor([0.01], device=device)
    pqs = (0.5 + torch.rand(inter, device=device)) if smooth else None
    y = triton_kernels.silu_and_mul(x)
    if smooth:
        y = (y.float() * pqs).to(dtype)
    want, _ = _quantize_rows(y, s, _ACT_FP8)
    got = triton_kernels.silu_and_mul(x, quant_scale=s, pre_quant_scale=pqs)
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert (got.float().abs() == 448).any()
    assert ref.silu_and_mul(x, quant_scale=s, pre_quant_scale=pqs).dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="comes with quant_scale"):
        triton_kernels.silu_and_mul(x, pre_quant_scale=pqs if smooth else s)
