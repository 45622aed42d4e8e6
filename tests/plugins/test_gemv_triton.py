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


@pytest.mark.parametrize("n,k", [(200, 512), (96, 768), (64, 96)], ids=str)
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_early_tiles_change_no_output(n, k, silu):
    """Weight tiles loaded before the PDL wait (the config's fifth item): the same outputs,
    bit for bit, as the loop alone. 256-column tiles: two whole (512), a third after them
    (768), one partial and one past K (96)."""
    device = triton_device()
    if device.type != "cuda" or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("early tiles are loaded under PDL only: an sm90+ GPU")
    from kiln.plugins.gemv import triton_kernels
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(torch.bfloat16)
    x = torch.randn(1, 2 * k if silu else k, device=device).to(torch.bfloat16)
    b = torch.randn(n, device=device).to(torch.bfloat16)
    outs = [triton_kernels.gemv(x, w, b, silu_input=silu, config=(8, 256, 4, 3, early))
            for early in (0, 1, 2)]
    assert_close(outs[0], ref.gemv(x, w, b, silu_input=silu), torch.bfloat16)
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    with pytest.raises(ValueError, match="early tiles are 0 to 2, found 3"):
        triton_kernels.gemv(x, w, b, silu_input=silu, config=(8, 256, 4, 3, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_a_float32_result_is_the_unrounded_sum(dtype, silu):
    """``out_dtype=torch.float32`` (a tensor-parallel partial sum): the float32 accumulator,
    within 1e-5 of the largest output from the float64 sum (float32 accumulation over 2,048
    terms; cuBLAS came to 2.3e-6 on an H200), where the 16-bit result is ten times further
    (half a rounding step); silu*up is still rounded to the input's dtype first, as the
    unfused kernel stores it. The reference (one row by the GEMV's contract, and 16 rows as
    prefill's projections: cuBLAS's float32 output on a GPU) is held to the same bound."""
    device = triton_device()
    skip_unsupported(dtype, device)
    pytest.importorskip("triton")
    from kiln.plugins.gated_mlp.triton_reference import silu_and_mul
    from kiln.plugins.gemv import triton_kernels

    n, k = 4096, 2048
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
    x = torch.randn(16, 2 * k if silu else k, generator=g).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device)
    inputs = silu_and_mul(x) if silu else x
    want = torch.nn.functional.linear(inputs.double(), w.double(), b.double())
    tolerance = 1e-5 * float(want.abs().max())
    got = triton_kernels.gemv(x[:1], w, b, silu_input=silu, out_dtype=torch.float32)
    rounded = triton_kernels.gemv(x[:1], w, b, silu_input=silu)
    assert got.dtype == torch.float32 and rounded.dtype == dtype
    assert float((got.double() - want[:1]).abs().max()) <= tolerance
    assert float((rounded.double() - want[:1]).abs().max()) > 10 * tolerance
    for rows in (1, 16):
        wide = ref.gemv(x[:rows], w, b, silu_input=silu, out_dtype=torch.float32) \
            if rows == 1 else ref.wide_linear(inputs, w, b, torch.float32)
        assert wide.dtype == torch.float32
        assert float((wide.double() - want[:rows]).abs().max()) <= tolerance, rows
    with pytest.raises(ValueError, match="an epilogue takes the result in x's dtype"):
        from kiln.plugins.gemv.epilogue import SiluMul
        triton_kernels.gemv(x[:1, :k], w, out_dtype=torch.float32,
                            epilogue=SiluMul(silu_and_mul))
