"""The quantized projections' PyTorch references against an independent float64 computation
from :mod:`kiln.quantization.formats` (quantize/dequantize weights, fake-quantize activations),
and the int4 engine layout's round trips. CPU, fast.

Tolerance: the references compute in float32 (K <= 256 terms of O(1)), the oracle in float64:
1e-5 relative + absolute on float32 inputs; bfloat16 outputs are one rounding of the same
float32 value, so 1 bf16 ulp (2^-8 relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.plugins.quant_linear import layout
from kiln.plugins.quant_linear import triton_reference as ref
from kiln.quantization.config import QuantConfig
from kiln.quantization.formats import (
    dequantize_weight,
    fake_quant,
    pack_int4,
    quantize_weight,
    scale_from_amax,
    unpack_int4,
)

N, K = 48, 256


def _inputs(m=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    x = (torch.randn(m, K, generator=g) * torch.linspace(0.2, 3, K)).to(dtype)
    x[1 % m, :7] = 0  # exact zeros and one all-zero row (per-token scale 1)
    if m > 3:
        x[3] = 0
    bias = torch.randn(N, generator=g).to(dtype)
    return w, x, bias


def _oracle(x_q: torch.Tensor, w_dq: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = F.linear(x_q.double(), w_dq.double())
    return y if bias is None else y + bias.double()


def _assert(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(got.double(), want.to(dtype).double(), atol=tol, rtol=tol)


def _act_scale(x: torch.Tensor, dtype: str, static: bool) -> torch.Tensor:
    """A static scale that clips the largest activations, or per-token amax scales [M, 1]."""
    if static:
        return scale_from_amax(x.float().abs().amax() * 0.6, dtype)
    return scale_from_amax(x.float().abs().amax(dim=1, keepdim=True), dtype)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("static", [True, False], ids=["static", "per_token"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_fp8_reference(granularity, static, with_bias):
    w, x, bias = _inputs()
    quant = QuantConfig("fp8", weight_scales=granularity)
    q, scale = quantize_weight(w, quant)
    s = _act_scale(x, "float8_e4m3fn", static)
    b = bias if with_bias else None
    got = ref.fp8_linear(x, q, scale, s if static else None, b)
    want = _oracle(fake_quant(x, s, "float8_e4m3fn"), dequantize_weight(q, scale, quant), b)
    _assert(got, want, torch.float32)


@pytest.mark.parametrize("static", [True, False], ids=["static", "per_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_w8a8_reference(static, dtype):
    w, x, bias = _inputs(dtype=dtype)
    quant = QuantConfig("int8_sq")
    q, scale = quantize_weight(w, quant)
    s = _act_scale(x, "int8", static)
    got = ref.int8_w8a8_linear(x, q, scale, s if static else None, bias)
    x_q = fake_quant(x.float(), s, "int8")  # the reference quantizes from float32 values
    _assert(got, _oracle(x_q, dequantize_weight(q, scale, quant), bias), dtype)


def test_int8_w8a8_reference_rounds_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 300.0, -300.0, 0.0]])
    weight = torch.eye(8, dtype=torch.int8)
    got = ref.int8_w8a8_linear(x, weight, torch.ones(8), torch.tensor(1.0))
    assert got.tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -128.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_int8_weight_only_reference(dtype, with_bias):
    w, x, bias = _inputs(dtype=dtype)
    quant = QuantConfig("int8_wo")
    q, scale = quantize_weight(w, quant)
    b = bias if with_bias else None
    got = ref.int8_weight_only_linear(x, q, scale, b)
    _assert(got, _oracle(x, dequantize_weight(q, scale, quant), b), dtype)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int4_weight_only_reference(group_size, dtype):
    w, x, bias = _inputs(dtype=dtype)
    quant = QuantConfig("int4_wo", group_size=group_size)
    packed, scale = quantize_weight(w, quant)  # checkpoint (ONNX) order
    engine = layout.repack_int4(packed, group_size)
    got = ref.int4_weight_only_linear(x, engine, scale, group_size, bias)
    _assert(got, _oracle(x, dequantize_weight(packed, scale, quant), bias), dtype)
    if group_size in layout.FRAGMENT_GROUP_SIZES:  # the other engine layout: the same output
        words = layout.engine_int4(packed, group_size, torch.bfloat16)
        assert words.dtype == torch.int32
        assert torch.equal(ref.int4_weight_only_linear(x, words, scale, group_size, bias), got)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_layout_round_trip_and_order(group_size):
    g = torch.Generator().manual_seed(1)
    values = torch.randint(-8, 8, (6, 2 * group_size), generator=g, dtype=torch.int8)
    packed = pack_int4(values)
    engine = layout.repack_int4(packed, group_size)
    assert engine.dtype == torch.uint8 and engine.shape == packed.shape
    assert torch.equal(layout.unpack_split_int4(engine, group_size), values)
    # the documented order: byte j of a group = feature j (low nibble), j + G/2 (high nibble)
    half = group_size // 2
    for grp in range(2):
        byte = engine[:, grp * half:(grp + 1) * half]
        feats = values[:, grp * group_size:(grp + 1) * group_size]
        low = unpack_int4(byte)[:, 0::2]
        high = unpack_int4(byte)[:, 1::2]
        assert torch.equal(low, feats[:, :half]) and torch.equal(high, feats[:, half:])


def test_int4_layout_rejects_group_sizes():
    packed = torch.zeros(2, 48, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group_size"):
        layout.repack_int4(packed, 16)
    with pytest.raises(ValueError, match="group_size"):
        layout.repack_int4(packed, 64)  # 96 features: not a multiple of 64


def test_int4_fragments_hold_each_value_where_the_mma_reads_it():
    """Nibble b = 4p + 2h + r of word [i, c, lane, j] is row 16i + 8r + g, feature
    64c + 16t + 4j + 2h + p ((g, t) = divmod(lane, 4)): the m16n8k16 A fragment of lane (g, t)
    for k-tile j, pair register 2h + r, whose k slots 2t + 8h + p the kernel fills from features
    16t + 4j + 2h + p of the chunk (layout's docstring), checked value by value."""
    g = torch.Generator().manual_seed(2)
    values = torch.randint(-8, 8, (32, 128), generator=g, dtype=torch.int8)
    words = layout.pack_fragments(values)
    assert words.dtype == torch.int32 and tuple(words.shape) == (2, 2, 32, 4)
    for i in range(2):
        for c in range(2):
            for lane in range(32):
                gr, t = divmod(lane, 4)
                for j in range(4):
                    word = int(words[i, c, lane, j]) & 0xFFFFFFFF
                    for b in range(8):
                        p, h, r = b // 4, (b // 2) % 2, b % 2
                        nibble = (word >> (4 * b)) & 0xF
                        want = values[16 * i + 8 * r + gr, 64 * c + 16 * t + 4 * j + 2 * h + p]
                        assert nibble - 16 * (nibble >= 8) == want
    assert torch.equal(layout.unpack_fragments(words), values)
    assert layout.int4_shape(words) == (32, 128)


@pytest.mark.parametrize("n,k,group_size,dtype,fragments", [
    (32, 128, 128, torch.bfloat16, True), (48, 128, 64, torch.float16, True),
    (32, 128, 128, torch.float32, False),  # float32 engines: no 16-bit MMA operands
    (32, 128, 32, torch.bfloat16, False),  # a group of 32 splits a 64-feature chunk
    (24, 128, 64, torch.bfloat16, False)])  # rows not whole 16-row tiles
def test_engine_int4_picks_the_layout(n, k, group_size, dtype, fragments):
    g = torch.Generator().manual_seed(3)
    values = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    engine = layout.engine_int4(pack_int4(values), group_size, dtype)
    assert engine.dtype == (torch.int32 if fragments else torch.uint8)
    assert layout.int4_shape(engine) == (n, k)
    assert torch.equal(layout.unpack_engine_int4(engine, group_size), values)
