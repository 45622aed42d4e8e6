"""Falcon converter: what the generic reference-vs-HF test cannot cover.

The ``falcon*`` variants of tests/models.py check logits against HF at every split. Here: the
QKV regroup against HF's own ``_split_heads`` for the three fused layouts, ALiBi slopes against
HF's ``build_alibi_tensor``, real Falcon config.json files in both the HF and the RefinedWeb
(RW remote code) spellings, and refusals.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import FalconConfig
from transformers.models.falcon.modeling_falcon import FalconAttention, build_alibi_tensor

import kiln
from kiln.checkpoint import load_config
from kiln.config import DecoderConfig, MlpType, NormType, PositionType, ResidualType
from kiln.converters.falcon import FalconConverter, falcon_alibi_slopes, regroup_qkv
from kiln.errors import ConfigError, TensorMappingError
from tests.models import hf_model

# tiiuae/falcon-7b config.json, before (RW remote code) and after HF's in-library port.
FALCON_7B_RW = {
    "alibi": False, "apply_residual_connection_post_layernorm": False,
    "architectures": ["RWForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_RW.RWConfig",
                 "AutoModelForCausalLM": "modelling_RW.RWForCausalLM"},
    "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
    "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "RefinedWebModel", "multi_query": True, "n_head": 71, "n_layer": 32,
    "parallel_attn": True, "torch_dtype": "bfloat16", "transformers_version": "4.27.4",
    "use_cache": True, "vocab_size": 65024,
}
FALCON_7B = {
    "alibi": False, "apply_residual_connection_post_layernorm": False,
    "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": False,
    "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 4544,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
    "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71,
    "num_hidden_layers": 32, "parallel_attn": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.33.0.dev0", "use_cache": True, "vocab_size": 65024,
}
# tiiuae/falcon-40b: the RW config has no new_decoder_architecture; n_head_kv implies it.
FALCON_40B_RW = {
    "alibi": False, "apply_residual_connection_post_layernorm": False,
    "architectures": ["RWForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_RW.RWConfig",
                 "AutoModelForCausalLM": "modelling_RW.RWForCausalLM"},
    "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
    "hidden_size": 8192, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "RefinedWeb", "n_head": 128, "n_head_kv": 8, "n_layer": 60,
    "parallel_attn": True, "torch_dtype": "bfloat16", "transformers_version": "4.27.4",
    "use_cache": True, "vocab_size": 65024,
}
FALCON_40B = {
    "alibi": False, "apply_residual_connection_post_layernorm": False,
    "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": False,
    "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 8192,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
    "multi_query": True, "new_decoder_architecture": True, "num_attention_heads": 128,
    "num_hidden_layers": 60, "num_kv_heads": 8, "parallel_attn": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.27.4", "use_cache": True,
    "vocab_size": 65024,
}
# tiiuae/falcon-rw-1b: sequential blocks, MHA, biases, ALiBi.
FALCON_RW_1B = {
    "alibi": True, "apply_residual_connection_post_layernorm": False,
    "architectures": ["RWForCausalLM"], "attention_dropout": 0.0, "bias": True,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 2048,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "RefinedWebModel",
    "multi_query": False, "n_head": 32, "n_layer": 24, "parallel_attn": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.27.4", "use_cache": True,
    "vocab_size": 50304,
}
# tiiuae/falcon-11B (transformers v4 rope_theta spelling, one norm in the parallel block).
FALCON_11B = {
    "activation": "gelu", "alibi": False, "architectures": ["FalconForCausalLM"],
    "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11,
    "ffn_hidden_size": 16384, "hidden_dropout": 0.0, "hidden_size": 4096,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 8192,
    "model_type": "falcon", "multi_query": True, "new_decoder_architecture": True,
    "num_attention_heads": 32, "num_hidden_layers": 60, "num_kv_heads": 8,
    "num_ln_in_parallel_attn": 1, "parallel_attn": True, "rope_scaling": None,
    "rope_theta": 500042, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0", "use_cache": True, "vocab_size": 65024,
}

_FALCON = dict(norm_type=NormType.LAYERNORM, norm_eps=1e-5, norm_bias=True,
               mlp_type=MlpType.GELU, tie_word_embeddings=True)
EXPECTED = {
    "7b": DecoderConfig(architecture="FalconForCausalLM", vocab_size=65024, hidden_size=4544,
                        num_layers=32, num_heads=71, num_kv_heads=1, head_dim=64,
                        intermediate_size=18176, max_position_embeddings=2048,
                        residual=ResidualType.PARALLEL, parallel_norms=1, **_FALCON),
    "40b": DecoderConfig(architecture="FalconForCausalLM", vocab_size=65024, hidden_size=8192,
                         num_layers=60, num_heads=128, num_kv_heads=8, head_dim=64,
                         intermediate_size=32768, max_position_embeddings=2048,
                         residual=ResidualType.PARALLEL, parallel_norms=2, **_FALCON),
    "11b": DecoderConfig(architecture="FalconForCausalLM", vocab_size=65024, hidden_size=4096,
                         num_layers=60, num_heads=32, num_kv_heads=8, head_dim=128,
                         intermediate_size=16384, max_position_embeddings=8192,
                         rope_theta=500042.0, residual=ResidualType.PARALLEL,
                         parallel_norms=1, **{**_FALCON, "tie_word_embeddings": False}),
}


@pytest.mark.parametrize("hf, expected", [
    (FALCON_7B, "7b"), (FALCON_7B_RW, "7b"), (FALCON_40B, "40b"), (FALCON_40B_RW, "40b"),
    (FALCON_11B, "11b"),
])
def test_real_configs(hf, expected):
    want = dataclasses.replace(EXPECTED[expected], architecture=hf["architectures"][0])
    assert FalconConverter.config_from_hf(hf) == want


def test_falcon_rw_1b_config():
    config = FalconConverter.config_from_hf(FALCON_RW_1B)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (32, 32, 64)
    assert config.residual is ResidualType.SEQUENTIAL
    assert (config.qkv_bias, config.o_bias, config.mlp_bias, config.norm_bias) == (True,) * 4
    assert config.position_type is PositionType.ALIBI and config.rope_scaling is None
    # 32 heads: 2^(-k/4) rounded to bfloat16, then divided by sqrt(head_dim) = 8.
    want = [float(torch.tensor(2.0 ** (-k / 4)).bfloat16()) / 8 for k in range(1, 33)]
    assert config.alibi_slopes == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("heads", range(1, 41))
def test_alibi_slopes_match_hf(heads):
    head_dim = 64
    # build_alibi_tensor(ones [1, 2]) is [H, 1, 2] = bf16(slope) * [0, 1] (before HF's 1/sqrt(d)).
    hf = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)[:, 0, 1]
    ours = [s * math.sqrt(head_dim) for s in falcon_alibi_slopes(heads, head_dim)]
    assert ours == pytest.approx(hf.tolist(), rel=1e-12)


@pytest.mark.parametrize("layout", [
    dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2),
    dict(new_decoder_architecture=True, num_attention_heads=4, num_kv_heads=4),
    dict(new_decoder_architecture=False, multi_query=True, num_attention_heads=4),
    dict(new_decoder_architecture=False, multi_query=False, num_attention_heads=4),
])
def test_regroup_matches_hf_split_heads(layout):
    hf = FalconConfig(hidden_size=32, num_hidden_layers=1, vocab_size=16, **layout)
    attn = FalconAttention(hf, layer_idx=0)
    heads, head_dim = hf.num_attention_heads, hf.head_dim
    kv = attn.num_kv_heads if not hf.new_decoder_architecture else hf.num_kv_heads
    rows = attn.query_key_value.weight.shape[0]
    # Row r of the fused output holds the value r: HF's split shows where each row goes.
    q, k, v = attn._split_heads(torch.arange(rows, dtype=torch.float32)[None, None, :])
    group = heads // kv
    want_k = k[0, 0, ::group] if k.shape[2] == heads else k[0, 0]  # new arch broadcasts k/v
    want_v = v[0, 0, ::group] if v.shape[2] == heads else v[0, 0]
    want = torch.cat([q[0, 0].flatten(), want_k.flatten(), want_v.flatten()])
    ours = regroup_qkv(torch.arange(rows, dtype=torch.float32), num_heads=heads,
                       num_kv_heads=kv, head_dim=head_dim)
    assert torch.equal(ours, want)
    weight = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    regrouped = regroup_qkv(weight, num_heads=heads, num_kv_heads=kv, head_dim=head_dim)
    assert torch.equal(regrouped, weight[want.long()])  # rows move whole
    meta = regroup_qkv(torch.empty(rows, 32, device="meta"), num_heads=heads,
                       num_kv_heads=kv, head_dim=head_dim)
    assert meta.shape == (rows, 32) and meta.device.type == "meta"  # shape planning


def test_regroup_refuses_a_wrong_row_count():
    with pytest.raises(TensorMappingError, match="query_key_value has 40 rows"):
        regroup_qkv(torch.empty(40, 8, device="meta"), num_heads=4, num_kv_heads=1, head_dim=8)


@pytest.mark.parametrize("change, match", [
    ({"apply_residual_connection_post_layernorm": True}, "post_layernorm"),
    ({"activation": "relu"}, "activation 'relu'"),
    ({"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn 2 needs new_decoder"),
    ({"n_head": 70}, "not a multiple"),
    ({"vocab_size": None}, "missing vocab_size"),
])
def test_unsupported_configs_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        FalconConverter.config_from_hf({**FALCON_7B_RW, **change})


@pytest.mark.parametrize("key, value", [
    ("alibi", "false"), ("multi_query", "true"), ("parallel_attn", [1]), ("bias", 2),
    ("new_decoder_architecture", "yes"), ("tie_word_embeddings", "false"),
    ("apply_residual_connection_post_layernorm", "false"),
])
def test_a_flag_that_is_not_true_or_false_is_refused(key, value):
    """"alibi": "false" is true to Python (HF's Falcon runs ALiBi for it): it had converted
    as ALiBi."""
    with pytest.raises(ConfigError) as e:
        FalconConverter.config_from_hf({**FALCON_7B_RW, key: value})
    assert str(e.value) == \
        f"config.json: {key} must be true or false, found {value!r}; fix it in config.json"


def test_flags_of_0_1_and_null_read_as_hf_reads_them():
    assert FalconConverter.config_from_hf({**FALCON_RW_1B, "alibi": 1, "bias": 1}) == \
        FalconConverter.config_from_hf(FALCON_RW_1B)
    assert FalconConverter.config_from_hf({**FALCON_7B_RW, "alibi": 0, "parallel_attn": 1}) == \
        FalconConverter.config_from_hf(FALCON_7B_RW)
    # null is None to HF's code, so false: not multi-query
    config = FalconConverter.config_from_hf({**FALCON_7B_RW, "multi_query": None})
    assert (config.num_kv_heads, config.num_heads) == (71, 71)


# RW (remote code) spelling end to end -------------------------------------------------------

def _rw_config(hf: dict, model_type: str) -> dict:
    """What the RW remote code's config.json says for the same model (HF's port reversed)."""
    rw = {k: v for k, v in hf.items()
          if k not in ("new_decoder_architecture", "num_kv_heads", "num_attention_heads",
                       "num_hidden_layers", "num_ln_in_parallel_attn")}
    rw.update(architectures=["RWForCausalLM"], model_type=model_type,
              n_head=hf["num_attention_heads"], n_layer=hf["num_hidden_layers"])
    if hf["new_decoder_architecture"]:
        rw["n_head_kv"] = hf["num_kv_heads"]
    return rw


@pytest.mark.parametrize("variant, model_type", [("falcon-40b-gqa", "RefinedWeb"),
                                                 ("falcon-7b-mqa", "RefinedWebModel"),
                                                 ("falcon-rw-alibi", "RefinedWebModel")])
def test_rw_spelling_converts_identically(variant, model_type, tmp_path):
    hf_dir = hf_model(variant, tmp_path / "hf")
    rw_dir = tmp_path / "rw"
    shutil.copytree(hf_dir, rw_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    (rw_dir / "config.json").write_text(json.dumps(_rw_config(hf, model_type)))
    a = kiln.convert_checkpoint(hf_dir, tmp_path / "a", tp_size=2, progress=False)
    b = kiln.convert_checkpoint(rw_dir, tmp_path / "b", tp_size=2, progress=False)
    config_a, config_b = load_config(a).decoder, load_config(b).decoder
    assert dataclasses.replace(config_b, architecture=config_a.architecture) == config_a
    for rank in range(2):
        ta, tb = load_file(a / f"rank{rank}.safetensors"), load_file(b / f"rank{rank}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)


def test_wrong_multi_query_flag_names_the_fused_tensor(tmp_path):
    hf_dir = hf_model("falcon-7b-mqa", tmp_path / "hf")
    hf = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**hf, "multi_query": False}))
    with pytest.raises(TensorMappingError, match="query_key_value has 96 rows"):
        kiln.convert_checkpoint(hf_dir, tmp_path / "out", progress=False)


@pytest.mark.parametrize("window, refused", [(4, True), (2048, False), (None, False)])
def test_a_window_transformers_applies_only_when_decoding_is_refused(window, refused):
    """A trial: Falcon with "sliding_window": 4 converted without a window, where transformers'
    cache keeps only 4 positions when decoding; the tokens left HF's at the second."""
    hf = {**FALCON_7B, "sliding_window": window}
    if refused:
        with pytest.raises(ConfigError, match=r"^config.json: sliding_window 4 on "
                                              r"FalconForCausalLM: .*null for full attention$"):
            FalconConverter.config_from_hf(hf)
    else:
        assert FalconConverter.config_from_hf(hf).sliding_window is None
