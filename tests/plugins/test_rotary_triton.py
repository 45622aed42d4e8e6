"""Triton rotary + paged-cache write against its PyTorch reference and the oracle's apply_rope."""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.rotary import triton_reference as ref
from kiln.reference import apply_rope
from tests.gpu.support import assert_close, skip_unsupported, triton_device

pytestmark = pytest.mark.gpu


def _kernels():
    pytest.importorskip("triton")
    from kiln.plugins.rotary import triton_kernels
    return triton_kernels


def _table(d: int, positions: int, device) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(positions).float()[:, None] * inv_freq
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (4, 1, 64), (6, 6, 24)], ids=str)
@pytest.mark.parametrize("variant", ["rope", "rope-clip", "no-rope"])
def test_rope_qkv_to_cache_matches_reference(dtype, heads, variant):
    device = triton_device()
    skip_unsupported(dtype, device)
    hq, hkv, d = heads
    t, page, blocks = 37, 16, 8
    width = (hq + 2 * hkv) * d
    qkv = (torch.randn(t, width + 8, device=device) * 2).to(dtype)[:, :width]  # strided rows
    table = _table(d, 512, device) if variant != "no-rope" else None
    index = torch.randint(0, 512, (t,), device=device, dtype=torch.int32)
    slots = torch.randperm(blocks * page, device=device)[:t].to(torch.int32)
    clip = 1.5 if variant == "rope-clip" else None
    caches = []
    for impl in (_kernels(), ref):
        k = torch.full((blocks, hkv, page, d), float("nan"), device=device, dtype=dtype)
        v = torch.full_like(k, float("nan"))
        q = impl.rope_qkv_to_cache(qkv, table, index, k, v, slots, num_heads=hq,
                                   num_kv_heads=hkv, head_dim=d, clip=clip)
        caches.append((q, k, v))
    (q1, k1, v1), (q2, k2, v2) = caches
    assert_close(q1, q2, dtype)
    written = torch.zeros(blocks * page, dtype=torch.bool, device=device)
    written[slots.long()] = True
    written = written.view(blocks, 1, page, 1).expand_as(k1)
    assert torch.isnan(k1[~written]).all() and torch.isnan(v1[~written]).all()
    assert_close(k1[written], k2[written], dtype)
    assert_close(v1[written], v2[written], dtype)


def test_rotation_matches_oracle_apply_rope():
    """The kernel's float32 rotation is the oracle's rotate-half RoPE (HF Llama convention)."""
    device = triton_device()
    hq, hkv, d, t = 4, 2, 64, 11
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device)
    positions = torch.arange(100, 100 + t, device=device)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = positions.cpu().float()[:, None] * inv_freq
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
    k = torch.zeros(4, hkv, 16, d, device=device)
    q = _kernels().rope_qkv_to_cache(qkv, table, torch.arange(t, device=device, dtype=torch.int32),
                                     k, torch.zeros_like(k), torch.arange(t, device=device),
                                     num_heads=hq, num_kv_heads=hkv, head_dim=d)
    want = apply_rope(qkv[:, : hq * d].view(1, t, hq, d).transpose(1, 2).cpu(),
                      positions.cpu()[None], inv_freq)[0].transpose(0, 1)
    torch.testing.assert_close(q.cpu(), want, atol=2e-5, rtol=2e-5)


# Quantized caches: scales that saturate the largest values and push small ones into fp8
# subnormals (qkv ~ 2 * randn, rotated keys and values up to ~9).
QUANT_SCALES = {torch.float8_e4m3fn: (0.012, 0.009), torch.int8: (0.035, 0.05)}


def _assert_codes_match(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    """Equal cache bytes; with ``exact=False`` a few codes may be one quantization step apart.

    Rotated keys on a GPU: the kernel's float32 rotation contracts into FMAs, so it may differ
    from the reference's by 1 float32 ulp; rounding to q's dtype then rarely lands 1 ulp apart,
    and the stored code then at most one step (fp8: one mantissa step, 1/8 relative; int8: 1).
    Values are never rotated and are stored bit-exactly; in the interpreter (no FMA) so are keys.
    """
    diff = got.view(torch.uint8) != want.view(torch.uint8)
    if exact:
        assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} cache bytes differ"
        return
    assert int(diff.sum()) <= max(2, diff.numel() // 1000), f"{int(diff.sum())} codes differ"
    atol, rtol = (1.0, 0.0) if got.dtype == torch.int8 else (2.0 ** -9, 0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("cache_dtype", list(QUANT_SCALES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (6, 6, 24)], ids=str)
@pytest.mark.parametrize("variant", ["rope", "rope-clip", "no-rope"])
def test_rope_qkv_to_quantized_cache_matches_reference(cache_dtype, dtype, heads, variant):
    device = triton_device()
    skip_unsupported(dtype, device)
    hq, hkv, d = heads
    t, page, blocks = 37, 16, 8
    width = (hq + 2 * hkv) * d
    g = torch.Generator().manual_seed(hq * d + len(variant))
    qkv = (torch.randn(t, width + 8, generator=g) * 2).to(device, dtype)[:, :width]
    qkv[0, :4] = torch.tensor([0.0, -0.0, 1e-4, -1e-4])  # signed zeros and fp8 underflow
    qkv[1, -1] = 100.0  # a value beyond both caches' range (clipped to 7.5 or not): saturates
    table = _table(d, 512, device) if variant != "no-rope" else None
    index = torch.randint(0, 512, (t,), generator=g, dtype=torch.int32).to(device)
    slots = torch.randperm(blocks * page, generator=g)[:t].to(device, torch.int32)
    clip = 7.5 if variant == "rope-clip" else None
    k_scale, v_scale = (torch.tensor(s, device=device) for s in QUANT_SCALES[cache_dtype])
    caches = []
    for impl in (_kernels(), ref):
        # the same non-zero bytes everywhere first: untouched rows must stay as they were
        k = torch.full((blocks, hkv, page, d), 0x55, device=device, dtype=torch.uint8)
        k, v = k.view(cache_dtype), k.clone().view(cache_dtype)
        q = impl.rope_qkv_to_cache(qkv, table, index, k, v, slots, num_heads=hq,
                                   num_kv_heads=hkv, head_dim=d, clip=clip, k_scale=k_scale,
                                   v_scale=v_scale)
        caches.append((q, k, v))
    (q1, k1, v1), (q2, k2, v2) = caches
    assert_close(q1, q2, dtype)
    _assert_codes_match(v1, v2, exact=True)
    _assert_codes_match(k1, k2, exact=table is None or device.type == "cpu")
    saturated = 127 if cache_dtype == torch.int8 else 448.0
    assert (v2.float().abs() == saturated).any(), "the case should saturate"
