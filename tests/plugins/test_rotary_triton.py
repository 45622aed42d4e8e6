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
