"""Quantized KV cache (float8_e4m3fn, int8) in the torch backend's references, on the CPU.

The rotary reference stores ``formats.quantize_values`` of the rotated keys and of the values
(both rounded to q's dtype first); attention over that cache equals attention over the float
cache the reference decoder fake-quantizes; both sides refuse missing or extra scales alike.
"""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.attention import triton_reference as attn_ref
from kiln.plugins.rotary import triton_reference as rope_ref
from kiln.quantization.formats import fake_quant, quantize_values

CACHES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.int8: "int8"}
HQ, HKV, D, PAGE = 4, 2, 16, 16


def _table(positions: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(positions).float()[:, None] * inv_freq
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _write(qkv, cache_dtype, **scales):
    """(q, k_cache, v_cache) of the rotary reference writing qkv's tokens to slots 0..T-1."""
    t = qkv.shape[0]
    k = torch.zeros(2, HKV, PAGE, D, dtype=cache_dtype)
    v = torch.zeros_like(k)
    q = rope_ref.rope_qkv_to_cache(qkv, _table(64), torch.arange(t, dtype=torch.int32) * 3, k, v,
                                   torch.arange(t, dtype=torch.int32), num_heads=HQ,
                                   num_kv_heads=HKV, head_dim=D, **scales)
    return q, k, v


@pytest.mark.parametrize("cache_dtype", list(CACHES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_rotary_reference_stores_quantize_values_of_the_rotated_keys(cache_dtype, dtype):
    torch.manual_seed(0)
    qkv = (torch.randn(11, (HQ + 2 * HKV) * D) * 3).to(dtype)
    k_scale, v_scale = torch.tensor(0.011), torch.tensor(0.02)  # some saturate, some are tiny
    q, k, v = _write(qkv, cache_dtype, k_scale=k_scale, v_scale=v_scale)
    q_float, k_float, v_float = _write(qkv, dtype)  # the float cache: rotated keys in q's dtype
    assert torch.equal(q, q_float)
    name = CACHES[cache_dtype]
    for got, want, scale in ((k, k_float, k_scale), (v, v_float, v_scale)):
        expected = quantize_values(want, scale, name)
        assert got.dtype == cache_dtype
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    if cache_dtype == torch.int8:
        assert k.min() == -128 and k.max() == 127, "the case should saturate"


def _fake_quant_cache(cache, scale, dtype):
    return (cache.float() * scale).to(dtype)


@pytest.mark.parametrize("cache_dtype", list(CACHES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 5])
def test_attention_over_a_quantized_cache_is_attention_over_the_fake_quantized_one(
        cache_dtype, dtype, window):
    torch.manual_seed(1)
    name = CACHES[cache_dtype]
    k_scale, v_scale = torch.tensor(0.015), torch.tensor(0.03)
    keys = torch.randn(4, HKV, PAGE, D).to(dtype)
    values = torch.randn(4, HKV, PAGE, D).to(dtype)
    kq, vq = quantize_values(keys, k_scale, name), quantize_values(values, v_scale, name)
    # the decoder's fake-quantized cache holds exactly what the reference reads from kq, vq
    k_fake, v_fake = fake_quant(keys, k_scale, name), fake_quant(values, v_scale, name)
    assert torch.equal(k_fake, _fake_quant_cache(kq, k_scale, dtype))
    table = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    ctx = torch.tensor([20, 9], dtype=torch.int32)
    q = torch.randn(7, HQ, D).to(dtype)
    kw = dict(scale=D ** -0.5, sliding_window=window)
    got, want = torch.zeros_like(q), torch.zeros_like(q)
    rows = torch.tensor([6, 2], dtype=torch.int32)
    attn_ref.paged_decode_attention(q, kq, vq, table, ctx, rows, got, k_scale=k_scale,
                                    v_scale=v_scale, **kw)
    attn_ref.paged_decode_attention(q, k_fake, v_fake, table, ctx, rows, want, **kw)
    assert torch.equal(got, want)
    starts, lens = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([4, 3], dtype=torch.int32)
    attn_ref.paged_prefill_attention(q, kq, vq, table, ctx, starts, lens, got, k_scale=k_scale,
                                     v_scale=v_scale, **kw)
    attn_ref.paged_prefill_attention(q, k_fake, v_fake, table, ctx, starts, lens, want, **kw)
    assert torch.equal(got, want)


def _implementations(module: str):
    """The reference and, where Triton imports, the kernel wrapper (they refuse before launch)."""
    impls = [pytest.param(module, id="reference")]
    return impls + [pytest.param(module.replace("reference", "kernels"), id="triton")]


def _load(name: str):
    if "kernels" in name:
        pytest.importorskip("triton")
    import importlib
    return importlib.import_module(name)


SCALE = torch.tensor(0.1)
# (cache dtype, k_scale, v_scale) that both sides refuse
BAD_SCALES = [(torch.float8_e4m3fn, None, None), (torch.int8, SCALE, None),
              (torch.int8, None, SCALE), (torch.float16, SCALE, SCALE),
              (torch.bfloat16, SCALE, None)]


@pytest.mark.parametrize("name", _implementations("kiln.plugins.rotary.triton_reference"))
@pytest.mark.parametrize("cache_dtype,k_scale,v_scale", BAD_SCALES)
def test_rotary_refuses_missing_or_extra_scales(name, cache_dtype, k_scale, v_scale):
    impl = _load(name)
    k = torch.zeros(1, 1, PAGE, D, dtype=cache_dtype)
    with pytest.raises(ValueError, match="needs k_scale and v_scale exactly when"):
        impl.rope_qkv_to_cache(torch.zeros(1, 3 * D), None, torch.zeros(1, dtype=torch.int32),
                               k, k.clone(), torch.zeros(1, dtype=torch.int32), num_heads=1,
                               num_kv_heads=1, head_dim=D, k_scale=k_scale, v_scale=v_scale)


@pytest.mark.parametrize("name", _implementations("kiln.plugins.attention.triton_reference"))
@pytest.mark.parametrize("cache_dtype,k_scale,v_scale", BAD_SCALES)
def test_attention_refuses_missing_or_extra_scales(name, cache_dtype, k_scale, v_scale):
    impl = _load(name)
    k = torch.zeros(1, 1, PAGE, D, dtype=cache_dtype)
    q, one = torch.zeros(1, 1, D), torch.ones(1, dtype=torch.int32)
    zero, table = torch.zeros(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32)
    scales = dict(scale=1.0, k_scale=k_scale, v_scale=v_scale)
    with pytest.raises(ValueError, match="needs k_scale and v_scale exactly when"):
        impl.paged_decode_attention(q, k, k.clone(), table, one, zero, q.clone(), **scales)
    with pytest.raises(ValueError, match="needs k_scale and v_scale exactly when"):
        impl.paged_prefill_attention(q, k, k.clone(), table, one, zero, one, q.clone(), **scales)


def test_triton_kernels_refuse_a_scale_that_is_not_one_value_on_the_cache_device():
    pytest.importorskip("triton")
    from kiln.plugins.rotary.triton_kernels import scale_arg
    assert scale_arg(torch.tensor([0.5]), torch.device("cpu")).shape == ()
    with pytest.raises(ValueError, match="must be one value"):
        scale_arg(torch.tensor([0.5, 0.25]), torch.device("cpu"))
