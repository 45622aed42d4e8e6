"""MPT converter: what the generic reference-vs-HF test cannot cover.

HF's MptForCausalLM is the oracle for plain MPT (tests/models.py variants ``mpt*``). MosaicML's
remote code (``MPTForCausalLM``, llm-foundry) also has biases, qk_ln, GQA/MQA, other MLP
widths and RoPE, which HF cannot run; for those, a checkpoint with MosaicML tensor names is
written by hand and the reference decoder is compared with :func:`mpt_forward_f64`, a small
float64 re-implementation of MosaicML's block written here from its formulas.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

import kiln
from kiln.checkpoint import load_config, load_merged
from kiln.config import DecoderConfig, MlpType, NormType, PositionType, ResidualType
from kiln.converters.mpt import MptConverter, mpt_alibi_slopes
from kiln.errors import ConfigError, TensorMappingError
from kiln.reference import ReferenceDecoder
from tests.helpers import max_abs_diff, ref_step_logits
from tests.models import PROMPT

# mosaicml/mpt-7b config.json (remote-code spelling; init_config abridged).
MPT_7B = {
    "architectures": ["MPTForCausalLM"],
    "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                    "attn_type": "multihead_attention", "attn_uses_sequence_id": False,
                    "clip_qkv": None, "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
    "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig",
                 "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "d_model": 4096, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
    "init_config": {"name": "kaiming_normal_", "fan_mode": "fan_in", "init_std": 0.02},
    "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 2048,
    "model_type": "mpt", "n_heads": 32, "n_layers": 32, "no_bias": True,
    "norm_type": "low_precision_layernorm", "resid_pdrop": 0,
    "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16",
    "transformers_version": "4.28.1", "use_cache": False, "verbose": 0, "vocab_size": 50432,
}


def test_mpt_7b_config():
    config = MptConverter.config_from_hf(MPT_7B)
    slopes = tuple(2.0 ** (-k / 4) for k in range(1, 33))  # 2^-(k * 8 / 32)
    assert config.alibi_slopes == pytest.approx(slopes, rel=1e-7)  # float32 math, as llm-foundry
    assert config == DecoderConfig(
        architecture="MPTForCausalLM", vocab_size=50432, hidden_size=4096, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=16384,
        max_position_embeddings=2048, norm_type=NormType.LAYERNORM, norm_eps=1e-5,
        norm_bias=False, position_type=PositionType.ALIBI, alibi_slopes=config.alibi_slopes,
        mlp_type=MlpType.GELU, residual=ResidualType.SEQUENTIAL, tie_word_embeddings=True)
    assert config.extra["tokenizer_name"] == "EleutherAI/gpt-neox-20b"


def test_hf_alias_spellings_give_the_same_config():
    hf = {**MPT_7B, "architectures": ["MptForCausalLM"]}
    aliased = {k: v for k, v in hf.items() if k not in ("d_model", "n_heads", "n_layers",
                                                        "max_seq_len", "layer_norm_epsilon")}
    aliased.update(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32,
                   max_position_embeddings=2048, norm_eps=1e-5)
    assert MptConverter.config_from_hf(aliased) == MptConverter.config_from_hf(hf)


@pytest.mark.parametrize("bias_max", [8, 16])
@pytest.mark.parametrize("heads", range(1, 25))
def test_alibi_slopes_match_hf(heads, bias_max):
    # build_mpt_alibi_tensor(..., seq 2) is [H, 1, 2] = slope * [-1, 0].
    want = -build_mpt_alibi_tensor(heads, 2, bias_max)[:, 0, 0]
    assert mpt_alibi_slopes(heads, bias_max) == tuple(float(s) for s in want)


def test_alibi_default_follows_the_writer_of_the_config():
    # HF's MptAttentionConfig defaults alibi to True, llm-foundry's attn_config_defaults to False.
    attn = {k: v for k, v in MPT_7B["attn_config"].items() if k != "alibi"}
    hf = MptConverter.config_from_hf({**MPT_7B, "architectures": ["MptForCausalLM"],
                                      "attn_config": attn})
    assert hf.position_type is PositionType.ALIBI
    with pytest.raises(ConfigError, match="learned position embeddings"):
        MptConverter.config_from_hf({**MPT_7B, "attn_config": attn})


@pytest.mark.parametrize("change, match", [
    ({"attn_config": {"alibi": False}}, "learned position embeddings"),
    ({"attn_config": {"alibi": False}, "learned_pos_emb": False}, "without position"),
    ({"attn_config": {"rope": True}}, "alibi with .rope"),
    ({"attn_config": {"prefix_lm": True}}, "prefix_lm"),
    ({"attn_config": {"attn_uses_sequence_id": True}}, "attn_uses_sequence_id"),
    ({"attn_config": {"qk_gn": True}}, "qk_gn"),
    ({"attn_config": {"fused_qkv": False}}, "fused_qkv"),
    ({"attn_config": {"sliding_window_size": 512}}, "sliding_window_size"),
    ({"attn_config": {"attn_type": "cross_attention"}}, "attn_type 'cross_attention'"),
    ({"attn_config": {"alibi": False, "rope": True, "rope_impl": "dail",
                      "rope_dail_config": {"type": "xpos"}}}, "xpos"),
    ({"attn_config": {"alibi": False, "rope": True, "rope_impl": "hf",
                      "rope_hf_config": {"type": "dynamic", "factor": 2.0}}}, "dynamic"),
    ({"logit_scale": "inv_sqrt_d_model"}, "logit_scale"),
    ({"norm_type": "rmsnorm"}, "norm_type 'rmsnorm'"),
    ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_type 'mptglu'"),
    ({"ffn_config": {"ffn_act_fn": {"name": "gelu", "approximate": "tanh"}}}, "ffn_act_fn"),
    ({"expansion_ratio": 3.3}, "expansion_ratio"),
    ({"n_heads": 30}, "not a multiple of n_heads"),
])
def test_unsupported_configs_are_refused(change, match):
    hf = {**MPT_7B, **change, "attn_config": {**MPT_7B["attn_config"],
                                              **change.get("attn_config", {})}}
    with pytest.raises(ConfigError, match=match):
        MptConverter.config_from_hf(hf)


@pytest.mark.parametrize("change, key, value", [
    ({"no_bias": "false"}, "no_bias", "false"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings", "false"),
    ({"attn_config": {"alibi": "false"}}, "attn_config.alibi", "false"),
    ({"attn_config": {"qk_ln": [True]}}, "attn_config.qk_ln", [True]),
    ({"attn_config": {"prefix_lm": "no"}}, "attn_config.prefix_lm", "no"),
])
def test_a_flag_that_is_not_true_or_false_is_refused(change, key, value):
    """A string "false" is true to Python: no_bias "false" had converted without biases."""
    hf = {**MPT_7B, **change, "attn_config": {**MPT_7B["attn_config"],
                                              **change.get("attn_config", {})}}
    with pytest.raises(ConfigError) as e:
        MptConverter.config_from_hf(hf)
    assert str(e.value) == \
        f"config.json: {key} must be true or false, found {value!r}; fix it in config.json"


@pytest.mark.parametrize("key, value", [("attn_config", "x"), ("ffn_config", [1]),
                                        ("attn_config", 3)])
def test_a_settings_section_that_is_not_an_object_is_named(key, value):
    """A trial's "attn_config": "x" got the generic 'a setting has a value of the wrong type'
    message, naming no key."""
    with pytest.raises(ConfigError) as e:
        MptConverter.config_from_hf({**MPT_7B, key: value})
    assert str(e.value) == f"config.json: {key} must be an object of settings ({{...}}), " \
        f"found {value!r}; fix it in config.json"


@pytest.mark.parametrize("attn, key, value", [
    ({"softmax_scale": "x"}, "softmax_scale", "x"), ({"softmax_scale": -1}, "softmax_scale", -1),
    ({"clip_qkv": "x"}, "clip_qkv", "x"), ({"alibi_bias_max": "16"}, "alibi_bias_max", "16"),
    ({"alibi": False, "rope": True, "rope_theta": "x"}, "rope_theta", "x"),
])
def test_attn_config_numbers_are_checked(attn, key, value):
    """A string softmax_scale had converted and then failed the build with a traceback."""
    hf = {**MPT_7B, "attn_config": {**MPT_7B["attn_config"], **attn}}
    with pytest.raises(ConfigError) as e:
        MptConverter.config_from_hf(hf)
    assert str(e.value) == (f"config.json: attn_config.{key} must be a positive number, found "
                            f"{value!r}; fix it in config.json")


def test_clip_qkv_0_is_off_as_llm_foundry_reads_it():
    hf = {**MPT_7B, "attn_config": {**MPT_7B["attn_config"], "clip_qkv": 0}}
    assert MptConverter.config_from_hf(hf).clip_qkv is None


def test_flags_of_0_1_and_null_read_as_hf_reads_them():
    ones = {**MPT_7B, "no_bias": 1, "attn_config": {**MPT_7B["attn_config"], "alibi": 1,
                                                     "qk_ln": 0, "prefix_lm": None}}
    assert MptConverter.config_from_hf(ones) == MptConverter.config_from_hf(MPT_7B)


# MosaicML (llm-foundry) checkpoints that HF's MptForCausalLM cannot run ----------------------

BASE = {"architectures": ["MPTForCausalLM"], "model_type": "mpt", "vocab_size": 128,
        "d_model": 64, "n_layers": 2, "max_seq_len": 64, "learned_pos_emb": True,
        "norm_type": "low_precision_layernorm", "init_device": "cpu", "torch_dtype": "float32"}
CASES = {
    # GQA with qk_ln (whole-projection LayerNorms, with biases), biases everywhere, clip_qkv,
    # softmax_scale, alibi_bias_max 16, expansion_ratio 3. qk_ln forces tp 1.
    "gqa-qkln-bias": ({**BASE, "n_heads": 8, "no_bias": False, "expansion_ratio": 3,
                       "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2,
                                       "qk_ln": True, "clip_qkv": 0.5, "softmax_scale": 0.3,
                                       "alibi": True, "alibi_bias_max": 16}},
                      [(1, 1), (1, 2)]),
    # MQA (one KV head, replicated across ranks), biases, clip_qkv, ffn_config width.
    "mqa-bias-clip": ({**BASE, "n_heads": 4, "no_bias": False,
                       "ffn_config": {"ffn_type": "mptmlp", "ffn_hidden_size": 80},
                       "attn_config": {"attn_type": "multiquery_attention", "clip_qkv": 0.5,
                                       "alibi": True}},
                      [(1, 1), (2, 1), (4, 1), (2, 2)]),
    # RoPE instead of ALiBi, GQA, untied lm_head.
    "gqa-rope-untied": ({**BASE, "n_heads": 4, "no_bias": True, "tie_word_embeddings": False,
                         "attn_config": {"attn_type": "grouped_query_attention",
                                         "kv_n_heads": 2, "alibi": False, "rope": True,
                                         "rope_theta": 5000, "rope_impl": "hf",
                                         "rope_hf_config": {"type": "no_scaling",
                                                            "factor": 1.0}}},
                        [(1, 1), (2, 1), (4, 1), (1, 2)]),
}


def _dims(hf: dict) -> tuple[int, int, int, int]:
    """(heads, kv heads, head_dim, ffn width) as llm-foundry derives them."""
    attn, d, heads = hf["attn_config"], hf["d_model"], hf["n_heads"]
    kv = {"multihead_attention": heads, "multiquery_attention": 1}.get(
        attn["attn_type"], attn.get("kv_n_heads"))
    ffn = (hf.get("ffn_config") or {}).get("ffn_hidden_size") or d * hf.get("expansion_ratio", 4)
    return heads, kv, d // heads, ffn


def mosaicml_weights(hf: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under MosaicML's names (biases and qk_ln as the config asks)."""
    gen = torch.Generator().manual_seed(seed)
    d, bias, attn = hf["d_model"], not hf["no_bias"], hf["attn_config"]
    heads, kv, hd, ffn = _dims(hf)

    def linear(name, out, inp):
        w = {f"{name}.weight": torch.randn(out, inp, generator=gen) / math.sqrt(inp)}
        return w | ({f"{name}.bias": 0.1 * torch.randn(out, generator=gen)} if bias else {})

    def norm(name, size):
        w = {f"{name}.weight": 1 + 0.1 * torch.randn(size, generator=gen)}
        return w | ({f"{name}.bias": 0.1 * torch.randn(size, generator=gen)} if bias else {})

    out = {"transformer.wte.weight": 0.5 * torch.randn(hf["vocab_size"], d, generator=gen)}
    for i in range(hf["n_layers"]):
        b = f"transformer.blocks.{i}"
        out |= norm(f"{b}.norm_1", d) | linear(f"{b}.attn.Wqkv", (heads + 2 * kv) * hd, d)
        if attn.get("qk_ln"):
            out |= norm(f"{b}.attn.q_ln", d) | norm(f"{b}.attn.k_ln", kv * hd)
        out |= linear(f"{b}.attn.out_proj", d, d) | norm(f"{b}.norm_2", d)
        out |= linear(f"{b}.ffn.up_proj", ffn, d) | linear(f"{b}.ffn.down_proj", d, ffn)
    out |= norm("transformer.norm_f", d)
    if not hf.get("tie_word_embeddings", True):
        out["lm_head.weight"] = 0.5 * torch.randn(hf["vocab_size"], d, generator=gen)
    return out


def _layer_norm(x, w, name, eps=1e-5):
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    bias = w.get(f"{name}.bias")
    return y * w[f"{name}.weight"] + (0 if bias is None else bias)


def _linear(x, w, name):
    bias = w.get(f"{name}.bias")
    return x @ w[f"{name}.weight"].T + (0 if bias is None else bias)


def _rotate(x, theta):
    """Rotate-half RoPE over the whole head dim (llm-foundry dail/hf impls). x [H, T, D]."""
    d = x.shape[-1]
    inv_freq = theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attention_f64(hf: dict, w: dict, b: str, h: torch.Tensor) -> torch.Tensor:
    """One MosaicML attention block on h [T, d] (see mpt_forward_f64)."""
    attn, t = hf["attn_config"], h.shape[0]
    heads, kv, hd, _ = _dims(hf)
    scale = attn.get("softmax_scale") or 1 / math.sqrt(hd)
    n2 = 2 ** math.ceil(math.log2(heads))  # llm-foundry gen_slopes
    slopes = [2.0 ** -(k * attn.get("alibi_bias_max", 8) / n2) for k in range(1, n2 + 1)]
    slopes = (slopes[1::2] + slopes[::2])[:heads] if n2 != heads else slopes
    pos = torch.arange(t, dtype=torch.float64)
    causal = torch.where(pos[None, :] <= pos[:, None], 0.0, -math.inf)
    qkv = _linear(h, w, f"{b}.attn.Wqkv")
    if attn.get("clip_qkv"):
        qkv = qkv.clamp(-attn["clip_qkv"], attn["clip_qkv"])
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
    if attn.get("qk_ln"):
        q, k = _layer_norm(q, w, f"{b}.attn.q_ln"), _layer_norm(k, w, f"{b}.attn.k_ln")
    q, k, v = (z.reshape(t, -1, hd).transpose(0, 1) for z in (q, k, v))  # [H or KV, T, D]
    if attn.get("rope"):
        q, k = _rotate(q, attn["rope_theta"]), _rotate(k, attn["rope_theta"])
    ctx = []
    for head in range(heads):
        s = scale * q[head] @ k[head // (heads // kv)].T + causal
        if attn.get("alibi"):
            s = s + slopes[head] * (pos[None, :] - (t - 1))
        ctx.append(torch.softmax(s, -1) @ v[head // (heads // kv)])
    return _linear(torch.cat(ctx, dim=-1), w, f"{b}.attn.out_proj")  # heads in order


def mpt_forward_f64(hf: dict, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of MosaicML's MPT (llm-foundry ``MPTBlock`` + ``GroupedQueryAttention``):

        h = norm_1(x);  qkv = Wqkv(h), clamped to +-clip_qkv;  q, k, v = split(qkv, [d, kv, kv])
        q, k = q_ln(q), k_ln(k)                                  (qk_ln: whole projections)
        q, k = rope(q), rope(k)                                  (rope only)
        s[h,i,j] = softmax_scale * q_h,i . k_{h // (H/KV)},j + slope_h * (j - (T-1))  (alibi)
        x = x + out_proj(softmax(s, causal) @ v);  x = x + down_proj(gelu(up_proj(norm_2(x))))
        logits = norm_f(x) @ wte.T  (or lm_head.T if untied)
    """
    w = {k: v.double() for k, v in w.items()}
    x = w["transformer.wte.weight"][ids]
    for i in range(hf["n_layers"]):
        b = f"transformer.blocks.{i}"
        x = x + _attention_f64(hf, w, b, _layer_norm(x, w, f"{b}.norm_1"))
        up = _linear(_layer_norm(x, w, f"{b}.norm_2"), w, f"{b}.ffn.up_proj")
        x = x + _linear(0.5 * up * (1 + torch.erf(up / math.sqrt(2))), w, f"{b}.ffn.down_proj")
    x = _layer_norm(x, w, "transformer.norm_f")
    return x @ w.get("lm_head.weight", w["transformer.wte.weight"]).T


@pytest.fixture(scope="module", params=sorted(CASES))
def mosaicml_case(request, tmp_path_factory):
    """(name, HF config, source dir, float64 logits over prompt + 8 greedy tokens, tokens)."""
    name = request.param
    hf = CASES[name][0]
    src = tmp_path_factory.mktemp(name)
    weights = mosaicml_weights(hf)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(hf))
    tokens: list[int] = []
    for _ in range(8):
        tokens.append(int(mpt_forward_f64(hf, weights, PROMPT + tokens)[-1].argmax()))
    return name, hf, src, mpt_forward_f64(hf, weights, PROMPT + tokens), tokens


def test_mosaicml_checkpoint_matches_float64_formula(mosaicml_case, tmp_path):
    name, hf, src, want, tokens = mosaicml_case
    n = len(PROMPT)
    for tp, pp in CASES[name][1]:
        out = kiln.convert_checkpoint(src, tmp_path / f"tp{tp}pp{pp}", tp_size=tp, pp_size=pp,
                                      progress=False)
        got = ref_step_logits(ReferenceDecoder.from_checkpoint(out), PROMPT, tokens)
        assert max_abs_diff(got, [want[:n], *want[n:]]) <= 1e-4, (tp, pp)


def test_clip_qkv_is_exercised(mosaicml_case, tmp_path):
    """The cases clamp enough activations that dropping clip_qkv changes the logits."""
    name, hf, src, want, tokens = mosaicml_case
    if not hf["attn_config"].get("clip_qkv"):
        pytest.skip(f"{name} has no clip_qkv")
    out = kiln.convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    ckpt = load_config(out)
    unclipped = ReferenceDecoder(dataclasses.replace(ckpt.decoder, clip_qkv=None),
                                 load_merged(out, ckpt))
    got = ref_step_logits(unclipped, PROMPT, tokens)
    assert max_abs_diff(got, [want[:len(PROMPT)], *want[len(PROMPT):]]) > 1e-2


def test_qk_ln_needs_tp_1(tmp_path_factory):
    hf = CASES["gqa-qkln-bias"][0]
    src = tmp_path_factory.mktemp("qkln")
    save_file(mosaicml_weights(hf), src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="qk_norm"):
        kiln.convert_checkpoint(src, src.parent / "out", tp_size=2, progress=False)


# HF's MptForCausalLM ignores expansion_ratio: its MLP is 4 x d_model -----------------------

def test_hf_mpt_with_another_expansion_ratio_follows_the_weights(tmp_path, caplog):
    from transformers import MptConfig, MptForCausalLM

    from tests.helpers import hf_step_logits, save_hf_model
    from tests.models import MPT_BASE

    src = save_hf_model(MptForCausalLM, MptConfig(**MPT_BASE, expansion_ratio=2), tmp_path / "hf")
    assert json.loads((src / "config.json").read_text())["expansion_ratio"] == 2
    with caplog.at_level("WARNING", logger="kiln.converters.mpt"):
        out = kiln.convert_checkpoint(src, tmp_path / "ckpt", tp_size=2, progress=False)
    warning, = (r.getMessage() for r in caplog.records if r.name == "kiln.converters.mpt")
    assert "expansion_ratio 2 (d_model 64 * 2 = 128)" in warning
    assert "up_proj.weight has 256 rows" in warning and "MLP width of 256" in warning
    assert load_config(out).decoder.intermediate_size == 256
    model = MptForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert model.transformer.blocks[0].ffn.up_proj.out_features == 256  # what HF runs
    want, tokens = hf_step_logits(model, PROMPT, steps=8)
    got = ref_step_logits(ReferenceDecoder.from_checkpoint(out), PROMPT, tokens)
    assert max_abs_diff(got, want) <= 1e-4


def test_ffn_hidden_size_disagreeing_with_4x_weights_follows_them(caplog):
    hf = {**MPT_7B, "ffn_config": {"ffn_type": "mptmlp", "ffn_hidden_size": 11008}}
    shapes = {"transformer.blocks.0.ffn.up_proj.weight": (16384, 4096)}
    assert MptConverter.config_from_hf(hf).intermediate_size == 11008
    with caplog.at_level("WARNING", logger="kiln.converters.mpt"):
        assert MptConverter.config_from_source(hf, shapes).intermediate_size == 16384
    assert "ffn_config.ffn_hidden_size 11008 disagrees" in caplog.text
    # A non-integer expansion_ratio is refused from the config alone, followed given 4x weights.
    odd = {**MPT_7B, "architectures": ["MptForCausalLM"], "expansion_ratio": 3.3}
    assert MptConverter.config_from_source(odd, shapes).intermediate_size == 16384


def test_weights_neither_config_nor_4x_are_refused(tmp_path, caplog):
    """No MPT code runs an MLP of 3 x d_model under a config that says 2: still refused."""
    hf = {**BASE, "n_heads": 4, "no_bias": True, "expansion_ratio": 3,
          "attn_config": {"attn_type": "multihead_attention", "alibi": True}}
    src = tmp_path / "src"
    src.mkdir()
    save_file(mosaicml_weights(hf), src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({**hf, "expansion_ratio": 2}))
    with pytest.raises(TensorMappingError, match=r"model.safetensors: transformer.blocks.0.ffn."
                                                 r"up_proj.weight has shape \[192, 64\], the "
                                                 r"config implies \[128, 64\]; the weights and "
                                                 r"config.json are of different models"):
        kiln.convert_checkpoint(src, tmp_path / "out", progress=False)
    assert not [r for r in caplog.records if r.name == "kiln.converters.mpt"]
    assert MptConverter.config_from_source(hf, {}).intermediate_size == 192  # no weights: config


def test_hf_mpt_converts_as_hf_runs_it_whatever_its_config_says(tmp_path, caplog):
    """HF's MptForCausalLM runs ALiBi with bias max 8, no biases and no q/k LayerNorm,
    whatever the config says; a trial's alibi_bias_max 16 gave other tokens than HF's, and its
    no_bias false or qk_ln were refused as missing tensors HF never has."""
    from transformers import MptConfig, MptForCausalLM

    from tests.helpers import hf_step_logits, save_hf_model
    from tests.models import MPT_BASE

    config = MptConfig(**{**MPT_BASE, "no_bias": False, "attn_config": {
        **MPT_BASE.get("attn_config", {}), "alibi": True, "alibi_bias_max": 16, "qk_ln": True}})
    src = save_hf_model(MptForCausalLM, config, tmp_path / "hf")
    with caplog.at_level("WARNING", logger="kiln.converters.mpt"):
        out = kiln.convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    warning, = (r.getMessage() for r in caplog.records if r.name == "kiln.converters.mpt")
    for ignored in ("alibi_bias_max 16 (it runs 8)", "no_bias false", "attn_config.qk_ln"):
        assert ignored in warning, warning
    decoder = load_config(out).decoder
    assert decoder.alibi_slopes == mpt_alibi_slopes(decoder.num_heads, 8)
    model = MptForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want, tokens = hf_step_logits(model, PROMPT, steps=8)
    got = ref_step_logits(ReferenceDecoder.from_checkpoint(out), PROMPT, tokens)
    assert max_abs_diff(got, want) <= 1e-4
