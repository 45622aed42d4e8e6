"""The numerics of each qformat against float64 arithmetic written out by hand, and the
sharding of quantized tensors (every companion splits with its channels)."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.config import DecoderConfig, Mapping
from kiln.errors import ConfigError
from kiln.quantization.config import FORMATS, Granularity, QuantConfig
from kiln.quantization.formats import (
    dequantize_weight,
    fake_quant,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from kiln.roles import (
    QUANTIZED_ROLES,
    Role,
    companion,
    expected_shape,
    parse_tensor,
    scale_shape,
    tensor_names,
)
from kiln.sharding import shard_named, unshard_named


def test_int4_packing_order():
    # feature 2j in the low nibble, 2j+1 in the high nibble, two's complement
    assert pack_int4(torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)).tolist() == [[0xF1, 0x78]]
    q = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    every_byte = torch.arange(256, dtype=torch.int32)
    want = torch.stack([every_byte & 0xF, every_byte >> 4], dim=-1)
    want = torch.where(want > 7, want - 16, want).to(torch.int8).flatten()
    assert torch.equal(unpack_int4(every_byte.to(torch.uint8)), want)
    assert torch.equal(unpack_int4(every_byte.to(torch.uint8).view(16, 16)[:, ::3]),
                       want.view(16, 32).view(16, 16, 2)[:, ::3].flatten(-2))  # a strided view


@pytest.mark.parametrize("qformat", sorted(FORMATS))
def test_weight_roundtrip_error_is_half_a_step(qformat):
    torch.manual_seed(0)
    quant = QuantConfig(qformat, group_size=32 if qformat.startswith("int4") else None)
    w = torch.randn(48, 128) * torch.rand(48, 1)
    stored, scale = quantize_weight(w, quant)
    assert stored.dtype == {"float8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8,
                            "int4": torch.uint8}[quant.info.weight_dtype]
    assert scale.dtype == torch.float32 and torch.isfinite(scale).all()
    back = dequantize_weight(stored, scale, quant)
    w64 = w.double()
    if quant.info.weight_dtype == "int8":
        step = w64.abs().amax(1, keepdim=True) / 127
        assert ((back.double() - w64).abs() <= step / 2 + 1e-6).all()
    elif quant.info.weight_dtype == "int4":
        # s = the group's extreme / -8: the extreme exact at -8, steps of amax / 8, and only
        # values beyond 7 steps on the other side (rare) clipped, by at most one step
        groups, got = w64.view(48, 4, 32), back.double().view(48, 4, 32)
        extreme = groups.gather(2, groups.abs().argmax(2, keepdim=True))
        assert torch.allclose(got.gather(2, groups.abs().argmax(2, keepdim=True)), extreme)
        assert torch.allclose(scale.double(), extreme.squeeze(2) / -8)
        step = groups.abs().amax(2, keepdim=True) / 8
        assert ((got - groups).abs() <= step + 1e-6).all()
        assert ((got - groups).abs() <= step / 2 + 1e-6).double().mean() > 0.99
    else:  # e4m3 has 3 mantissa bits: relative error <= 2^-4 above the subnormals
        rel = ((back.double() - w64).abs() / w64.abs().clamp_min(1e-2)).max()
        assert rel <= 2 ** -4 + 1e-6


def test_fake_quant_saturates_and_rounds_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -300.0, 300.0])
    assert fake_quant(x, torch.tensor(1.0), "int8").tolist() == [0.0, 2.0, 2.0, -128.0, 127.0]
    y = fake_quant(torch.tensor([1000.0, -1000.0]), torch.tensor(1.0), "float8_e4m3fn")
    assert y.tolist() == [448.0, -448.0]


def test_config_validation():
    assert QuantConfig("int4_awq").group_size == 128
    assert QuantConfig("fp8").weight_scales is Granularity.PER_TENSOR
    for bad, match in [(dict(qformat="int3"), "qformat must be one of"),
                       (dict(qformat="int4_wo", group_size=100), "group_size must be one of"),
                       (dict(qformat="int8_wo", group_size=128), "int4 formats only"),
                       (dict(qformat="int8_wo", kv_cache_dtype="fp4"), "kv_cache_dtype"),
                       (dict(qformat="int8_wo", smoothquant_alpha=0.5), "int8_sq only")]:
        with pytest.raises(ConfigError, match=match):
            QuantConfig(**bad)
    quant = QuantConfig("int8_sq", kv_cache_dtype="fp8", smoothquant_alpha=0.8,
                        pre_quant_scales=("layers.{layer}.attn.o.weight",))
    assert QuantConfig.from_dict(quant.to_dict()) == quant
    assert QuantConfig.from_dict(None) is None and QuantConfig.from_dict({"scheme": None}) is None
    with pytest.raises(ConfigError, match=r"unknown keys \['zero_points'\]"):
        QuantConfig.from_dict({**quant.to_dict(), "zero_points": True})


def test_companion_names_parse_back():
    names = {companion(Role.DOWN, 2, k) for k in ("weight_scale", "input_scale", "pre_quant_scale")}
    assert names == {"layers.2.mlp.down.weight_scale", "layers.2.mlp.down.input_scale",
                     "layers.2.mlp.down.pre_quant_scale"}
    assert parse_tensor("layers.2.mlp.down.pre_quant_scale") == (Role.DOWN, 2, "pre_quant_scale")
    assert parse_tensor("layers.0.attn.v_scale") == (Role.QKV, 0, "v_scale")
    assert parse_tensor("layers.0.attn.qkv.weight") == (Role.QKV, 0, None)


def _whole_model(decoder, quant):
    """Random quantized whole-model tensors of every name a checkpoint of ``decoder`` holds."""
    torch.manual_seed(1)
    out = {}
    for name in tensor_names(decoder, quant=quant):
        role, _, kind = parse_tensor(name)
        if kind is None and role in QUANTIZED_ROLES:
            out[name] = quantize_weight(torch.randn(expected_shape(role, decoder)), quant)[0]
        elif kind is None:
            out[name] = torch.randn(expected_shape(role, decoder))
        else:
            out[name] = torch.rand(scale_shape(role, kind, decoder, quant)) + 0.5
    return out


@pytest.mark.parametrize("qformat", ["int4_awq", "int8_sq", "fp8"])
@pytest.mark.parametrize("tp", [2, 4])
def test_quantized_tensors_shard_and_unshard(qformat, tp):
    decoder = DecoderConfig(architecture="LlamaForCausalLM", vocab_size=130, hidden_size=128,
                            num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                            intermediate_size=256, max_position_embeddings=64)
    quant = QuantConfig(qformat, group_size=32 if qformat == "int4_awq" else None,
                        kv_cache_dtype="fp8",
                        pre_quant_scales=(Role.OUT.value, Role.DOWN.value))
    mapping = Mapping(tp_size=tp)
    for name, full in _whole_model(decoder, quant).items():
        shards = [shard_named(name, full, decoder, mapping, r) for r in range(tp)]
        back = unshard_named(name, shards, decoder, mapping)
        assert torch.equal(back.view(torch.uint8) if back.dtype == torch.float8_e4m3fn else back,
                           full.view(torch.uint8) if full.dtype == torch.float8_e4m3fn else full), name


def test_a_qformat_left_out_of_the_python_api_is_said_to_be_required(tmp_path):
    """A retest's kiln.quantize(ckpt, out) without qformat was told "found ''"."""
    with pytest.raises(ConfigError, match=r"^qformat is required: one of fp8, int8_sq, int8_wo, "
                                          r"int4_wo, int4_awq$"):
        kiln.quantize(tmp_path / "ckpt", tmp_path / "out")
