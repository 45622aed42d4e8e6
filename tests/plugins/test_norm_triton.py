"""Triton fused residual-add + RMSNorm / LayerNorm against its reference and torch's norms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.plugins.norm import triton_reference as ref
from tests.gpu.support import assert_close, skip_unsupported, triton_device

pytestmark = pytest.mark.gpu


def _kernels():
    pytest.importorskip("triton")
    from kiln.plugins.norm import triton_kernels
    return triton_kernels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hidden", [64, 576, 4096, 20000])
@pytest.mark.parametrize("kind", ["rms", "layer", "layer-bias"])
@pytest.mark.parametrize("residual", [True, False])
def test_add_norm_matches_reference(dtype, hidden, kind, residual):
    device = triton_device()
    skip_unsupported(dtype, device)
    t = 5
    x = torch.randn(t, hidden, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    b = (0.1 * torch.randn(hidden, device=device)).to(dtype) if kind == "layer-bias" else None
    res = torch.randn(t, hidden, device=device).to(dtype) if residual else None
    outs = []
    for impl in (_kernels(), ref):
        r = res.clone() if residual else None
        normed, r_out = impl.add_norm(x, r, w, b, 1e-5, rms=kind == "rms")
        outs.append((normed, r_out))
    (n1, r1), (n2, r2) = outs
    assert_close(n1, n2, dtype)
    assert torch.equal(r1, r2), "the residual sum must round exactly as the unfused add"
    if not residual:
        assert r1 is x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norms_match_torch(dtype):
    device = triton_device()
    skip_unsupported(dtype, device)
    x = torch.randn(64, 4096, device=device).to(dtype)
    w = torch.randn(4096, device=device).to(dtype)
    bias = torch.randn(4096, device=device).to(dtype)
    got, _ = _kernels().add_norm(x, None, w, None, 1e-6, rms=True)
    want = F.rms_norm(x.float(), (4096,), w.float(), 1e-6)
    assert_close(got, want, dtype)
    got, _ = _kernels().add_norm(x, None, w, bias, 1e-5, rms=False)
    assert_close(got, F.layer_norm(x.float(), (4096,), w.float(), bias.float(), 1e-5), dtype)


def test_in_place_norm_of_a_strided_slice():
    """q/k norms normalize a column slice of the fused QKV rows in place."""
    device = triton_device()
    qkv = torch.randn(7, 96, device=device)
    w = torch.randn(32, device=device)
    want, _ = ref.add_norm(qkv[:, 32:64].clone(), None, w, None, 1e-5, rms=False)
    before = qkv.clone()
    view = qkv[:, 32:64]
    _kernels().add_norm(view, None, w, None, 1e-5, rms=False, out=view)
    assert_close(qkv[:, 32:64], want, torch.float32)
    assert torch.equal(qkv[:, :32], before[:, :32]) and torch.equal(qkv[:, 64:], before[:, 64:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hidden", [576, 4096, 8192, 14336, 16384, 20000])
@pytest.mark.parametrize("kind", ["rms", "layer-bias"])
def test_add_norm_quantized_for_fp8_equals_the_projections_own_pass(dtype, hidden, kind):
    """``quant_scale``: the normed rows as FP8, what the FP8 projection's own activation pass
    makes of the normed rows in the model dtype, up to a rounding: the kernel may sum a row's
    statistics in another order when it stores FP8 (the module docstring), so a few values
    may be one FP8 step away (at most 1 in 1000, never more than a step); the residual is the
    same bit for bit."""
    from kiln.plugins.quant_linear.triton_kernels import _ACT_FP8, _quantize_rows

    device = triton_device()
    skip_unsupported(dtype, device)
    if device.type == "cpu":
        pytest.skip("fp8 casts run on GPUs only")
    t = 70
    x = (torch.randn(t, hidden, device=device) * 2).to(dtype)
    res = torch.randn(t, hidden, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    b = (0.1 * torch.randn(hidden, device=device)).to(dtype) if kind == "layer-bias" else None
    s = torch.tensor([0.004], device=device)  # saturates the largest values
    normed, r1 = _kernels().add_norm(x, res.clone(), w, b, 1e-5, rms=kind == "rms")
    want, _ = _quantize_rows(normed, s, _ACT_FP8)
    got, r2 = _kernels().add_norm(x, res.clone(), w, b, 1e-5, rms=kind == "rms", quant_scale=s)
    assert got.dtype == torch.float8_e4m3fn
    steps = _fp8_steps(got, want)
    assert steps.max() <= 1 and (steps > 0).float().mean() <= 1e-3, \
        f"{int((steps > 0).sum())} of {steps.numel()} values differ, by up to {steps.max()} steps"
    assert torch.equal(r1, r2)
    assert (got.float().abs() == 448).any()  # the clamp was exercised
    fused_ref, _ = ref.add_norm(x, res.clone(), w, b, 1e-5, rms=kind == "rms", quant_scale=s)
    assert fused_ref.dtype == torch.float8_e4m3fn  # the reference's contract, same type
    with pytest.raises(ValueError, match="out must be None"):
        _kernels().add_norm(x, None, w, b, 1e-5, rms=True, out=normed, quant_scale=s)


def _fp8_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable e4m3 values lie between each pair (sign-magnitude codes made
    monotonic: the distance of their ranks)."""
    def rank(t):
        code = t.view(torch.uint8).to(torch.int32)
        return torch.where(code >= 128, -(code - 128), code)
    return (rank(a) - rank(b)).abs()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["rms", "layer-bias"])
@pytest.mark.parametrize("quant", [False, True], ids=["16-bit", "fp8"])
def test_a_residual_read_early_changes_nothing(dtype, kind, quant):
    """``residual_early`` moves the residual's load ahead of the PDL wait, nothing else: a
    decoder's chain of norms and GEMVs (each norm's residual written two kernels back, the
    model's order; PDL on where the GPU has it) gives the same bits with and without it."""
    from kiln.plugins.gemv.triton_kernels import gemv

    device = triton_device()
    skip_unsupported(dtype, device)
    if quant and device.type == "cpu":
        pytest.skip("fp8 casts run on GPUs only")
    hidden, layers = 4096 if device.type == "cuda" else 256, 6
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [(torch.randn(hidden, hidden, device=device, generator=gen) / hidden ** 0.5)
               .to(dtype) for _ in range(layers)]
    w = (1 + 0.1 * torch.randn(hidden, device=device, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(hidden, device=device, generator=gen)).to(dtype) \
        if kind == "layer-bias" else None
    s = torch.tensor([0.02], device=device) if quant else None
    x0 = torch.randn(1, hidden, device=device, generator=gen).to(dtype)

    def chain(early: bool) -> list[torch.Tensor]:
        h, residual = _kernels().add_norm(x0.clone(), None, w, b, 1e-5, rms=kind == "rms")
        outs = []
        for weight in weights:  # norm -> projection -> norm, as a decoder's layers
            delta = gemv(h if h.dtype == dtype else h.to(dtype), weight)
            h, residual = _kernels().add_norm(delta, residual, w, b, 1e-5, rms=kind == "rms",
                                              quant_scale=s, residual_early=early)
            outs += [h.view(torch.uint8) if quant else h, residual.clone()]
        return outs

    late, early = chain(False), chain(True)
    assert all(torch.isfinite(t.float()).all() for t in late[1::2])
    assert all(torch.equal(a, b) for a, b in zip(late, early, strict=True))
