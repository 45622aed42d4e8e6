"""MPT (MosaicML): LayerNorm (optionally without bias), ALiBi or RoPE, MHA/GQA/MQA, GELU MLP.

Two families of checkpoints share these tensor names (``transformer.blocks.{i}.attn.Wqkv`` ...):

- ``MptForCausalLM``, HF transformers' port. It implements only MHA, no biases, a 4x MLP
  (it ignores ``expansion_ratio``: HF-saved checkpoints whose config says otherwise hold
  ``4 * d_model`` weights), ALiBi with ``alibi_bias_max`` 8 (it ignores the config's value),
  clip_qkv and softmax_scale.
- ``MPTForCausalLM``, MosaicML's remote code (llm-foundry). It adds biases (``no_bias``
  false: every linear and every norm), ``qk_ln`` (a LayerNorm over the whole q projection and
  the whole k projection), GQA/MQA (``attn_type``, ``kv_n_heads``), ``expansion_ratio`` /
  ``ffn_config.ffn_hidden_size``, and unscaled RoPE instead of ALiBi.

An ``MptForCausalLM`` checkpoint converts as HF runs it: bias max 8, no biases, no q/k norm,
with a warning naming each config setting HF ignores.

Contract: ``config_from_hf`` reads both spellings (``attn_config`` is a nested dict in
config.json; ``d_model``/``n_heads``/``n_layers``/``max_seq_len`` or their HF aliases) and
raises :class:`~kiln.errors.ConfigError` for anything this decoder cannot reproduce exactly.
``config_from_source`` follows the weights where the MLP width from the config disagrees
with them and they are ``4 * d_model`` wide (what HF runs), with a warning naming both.
Wqkv is already ``[q | k | v]`` rows (llm-foundry splits it as ``[d_model, kv, kv]``), so
every tensor is a plain copy. The LM head is tied to ``wte`` unless ``tie_word_embeddings``
is false.

ALiBi: MPT adds ``slope[h] * (j - (T - 1))`` to the *scaled* scores (the bias is not
multiplied by ``softmax_scale``); shifting by a per-row constant does not change a softmax,
so the canonical ``slope[h] * j`` is the same attention. Slopes follow llm-foundry's
``gen_slopes`` / HF's ``build_mpt_alibi_tensor``, including non-power-of-2 head counts.

Non-goals (refused): learned absolute position embeddings (``transformer.wpe``), no positions
at all, prefix LM, ``attn_uses_sequence_id``, sliding windows, ``qk_gn``, logit soft-capping
and ``logit_scale``, unfused Wq/Wk/Wv, GLU/TE/MoE FFNs, non-GELU activations, RMSNorm, and
RoPE scaling (xpos, linear, dynamic).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from kiln.config import DecoderConfig, MlpType, NormType, PositionType, ResidualType
from kiln.converters.base import (
    Converter,
    TensorRule,
    architecture_name,
    config_name,
    hf_flag,
    hf_get,
    hf_section,
    register,
    unknown_keys,
)
from kiln.errors import ConfigError
from kiln.roles import Role

log = logging.getLogger(__name__)

_KNOWN = {"d_model", "hidden_size", "n_heads", "num_attention_heads", "n_layers",
          "num_hidden_layers", "expansion_ratio", "max_seq_len", "max_position_embeddings",
          "vocab_size", "layer_norm_epsilon", "norm_eps", "learned_pos_emb", "attn_config",
          "ffn_config", "no_bias", "norm_type", "logit_scale", "tie_word_embeddings",
          "resid_pdrop", "emb_pdrop", "embedding_fraction", "init_device", "init_config"}
_LAYERNORMS = ("layernorm", "low_precision_layernorm")
# attn_type -> how many KV heads (None: read kv_n_heads).
_ATTN_TYPES = {"multihead_attention": "all", "multiquery_attention": 1,
               "grouped_query_attention": None}


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> tuple[float, ...]:
    """Per-head ALiBi slopes exactly as llm-foundry's ``gen_slopes`` (float32 math).

    Slopes are computed for the next power of two ``n`` as ``2 ** -(k * max / n)``, k = 1..n;
    for other head counts the odd-indexed slopes come first, then the even ones, truncated.
    """
    padded = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, padded + 1, dtype=torch.float32) * (alibi_bias_max / padded)
    slopes = 1.0 / torch.pow(2, exponents)
    if padded != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return tuple(float(s) for s in slopes)


_UP = "transformer.blocks.0.ffn.up_proj.weight"


@register("MPTForCausalLM", "MptForCausalLM", model_types={"mpt": "MptForCausalLM"})
class MptConverter(Converter):
    @classmethod
    def max_positions(cls, hf: dict[str, Any]) -> int:
        return hf_get(hf, "max_seq_len", "max_position_embeddings")

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> DecoderConfig:
        return cls._config(hf, weights_width=None, warn=False)

    @classmethod
    def config_from_source(cls, hf: dict[str, Any],
                           shapes: Mapping[str, tuple[int, ...]]) -> DecoderConfig:
        up = shapes.get(_UP)
        return cls._config(hf, weights_width=up[0] if up is not None and len(up) == 2 else None,
                           warn=True)

    @classmethod
    def _config(cls, hf: dict[str, Any], weights_width: int | None, warn: bool) -> DecoderConfig:
        attn = hf_section(hf, "attn_config")
        ffn = hf_section(hf, "ffn_config")
        _refuse_unsupported(hf, attn, ffn)
        arch = architecture_name(hf)
        hidden = hf_get(hf, "d_model", "hidden_size")
        heads = hf_get(hf, "n_heads", "num_attention_heads")
        if hidden % heads:
            raise ConfigError(f"{config_name()}: d_model {hidden} is not a multiple of n_heads "
                              f"{heads}")
        for key in ("softmax_scale", "alibi_bias_max", "rope_theta") + \
                (("clip_qkv",) if attn.get("clip_qkv") else ()):  # 0: off (`if clip_qkv:`)
            hf_get(hf, ("attn_config", key), default=None)  # a positive number, or refused
        bias = not hf_flag(hf, "no_bias", True)
        qk_norm = hf_flag(attn, "qk_ln", False, section="attn_config.")
        if arch == "MptForCausalLM":  # HF's port: what it runs, whatever the config says
            attn = _as_hf_port_runs(attn, bias, qk_norm, warn)
            bias = qk_norm = False
        return DecoderConfig(
            architecture=arch,
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            num_layers=hf_get(hf, "n_layers", "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_kv_heads(attn, heads),
            head_dim=hidden // heads,
            intermediate_size=_ffn_size(hf, ffn, hidden, weights_width),
            max_position_embeddings=cls.max_positions(hf),
            norm_type=NormType.LAYERNORM,
            norm_eps=float(hf_get(hf, "layer_norm_epsilon", "norm_eps", default=1e-5)),
            norm_bias=bias,
            **_positions(hf, attn, heads, arch),
            attention_scale=attn.get("softmax_scale"),
            clip_qkv=attn.get("clip_qkv") or None,  # llm-foundry tests `if clip_qkv:`
            qk_norm=qk_norm,
            qkv_bias=bias,
            o_bias=bias,
            mlp_type=MlpType.GELU,
            mlp_bias=bias,
            residual=ResidualType.SEQUENTIAL,
            tie_word_embeddings=hf_flag(hf, "tie_word_embeddings", True),
            extra=unknown_keys(hf, _KNOWN),
        )

    @classmethod
    def tensor_rules(cls, config: DecoderConfig) -> list[TensorRule]:
        block = "transformer.blocks.{layer}"
        lm_head = "transformer.wte.weight" if config.tie_word_embeddings else "lm_head.weight"
        plain = {
            Role.EMBED: "transformer.wte.weight",
            Role.ATTN_NORM: f"{block}.norm_1.weight", Role.ATTN_NORM_BIAS: f"{block}.norm_1.bias",
            Role.QKV: f"{block}.attn.Wqkv.weight", Role.QKV_BIAS: f"{block}.attn.Wqkv.bias",
            Role.Q_NORM: f"{block}.attn.q_ln.weight", Role.Q_NORM_BIAS: f"{block}.attn.q_ln.bias",
            Role.K_NORM: f"{block}.attn.k_ln.weight", Role.K_NORM_BIAS: f"{block}.attn.k_ln.bias",
            Role.OUT: f"{block}.attn.out_proj.weight", Role.OUT_BIAS: f"{block}.attn.out_proj.bias",
            Role.MLP_NORM: f"{block}.norm_2.weight", Role.MLP_NORM_BIAS: f"{block}.norm_2.bias",
            Role.UP: f"{block}.ffn.up_proj.weight", Role.UP_BIAS: f"{block}.ffn.up_proj.bias",
            Role.DOWN: f"{block}.ffn.down_proj.weight",
            Role.DOWN_BIAS: f"{block}.ffn.down_proj.bias",
            Role.FINAL_NORM: "transformer.norm_f.weight",
            Role.FINAL_NORM_BIAS: "transformer.norm_f.bias",
            Role.LM_HEAD: lm_head,
        }
        return [TensorRule(role, (name,)) for role, name in plain.items()]

    @classmethod
    def ignored_patterns(cls, config: DecoderConfig) -> tuple[str, ...]:
        # HF's tied MptForCausalLM may store lm_head.weight anyway (a copy of wte).
        return (r"lm_head\.weight",) if config.tie_word_embeddings else ()


def _as_hf_port_runs(attn: dict[str, Any], bias: bool, qk_norm: bool,
                     warn: bool) -> dict[str, Any]:
    """``attn_config`` as HF's ``MptForCausalLM`` runs it: ALiBi's bias max 8, no biases and no
    q/k LayerNorm whatever the config says (its ``MptAttention`` and ``build_mpt_alibi_tensor``
    call); a warning names each setting it ignores (a trial's bias max 16 gave other tokens
    than HF's)."""
    ignored = []
    if attn.get("alibi_bias_max", 8) != 8:
        ignored.append(f"attn_config.alibi_bias_max {attn['alibi_bias_max']} (it runs 8)")
    if bias:
        ignored.append("no_bias false (it has no biases)")
    if qk_norm:
        ignored.append("attn_config.qk_ln (it has no q/k LayerNorm)")
    if ignored and warn:
        log.warning("config.json: HF's MptForCausalLM ignores %s; converting as it runs the "
                    "checkpoint (MosaicML's remote code, architectures MPTForCausalLM, would "
                    "use them: set that if the checkpoint is llm-foundry's)", "; ".join(ignored))
    return {**attn, "alibi_bias_max": 8}


def _kv_heads(attn: dict[str, Any], heads: int) -> int:
    kind = attn.get("attn_type", "multihead_attention")
    if kind not in _ATTN_TYPES:
        raise ConfigError(f"{config_name()}: attn_config.attn_type {kind!r} is not supported; "
                          f"use one of {', '.join(_ATTN_TYPES)}")
    kv = _ATTN_TYPES[kind]
    if kv == "all":
        return heads
    return kv if kv is not None else hf_get(attn, "kv_n_heads")


def _ffn_size(hf: dict[str, Any], ffn: dict[str, Any], hidden: int,
              weights_width: int | None = None) -> int:
    """llm-foundry's resolve_ffn_hidden_size: ffn_config.ffn_hidden_size or d_model * ratio.

    Why the weights can win: HF's ``MptMLP`` is ``4 * hidden_size`` wide whatever
    ``expansion_ratio`` says, so an HF-saved checkpoint with another ratio holds (and HF runs)
    4x weights (``MptMLP.__init__`` in
    https://github.com/huggingface/transformers/blob/main/src/transformers/models/mpt/modeling_mpt.py).
    Given ``weights_width`` (rows of layer 0's up_proj) equal to ``4 * hidden`` and a config
    that says otherwise, the weights' width is used, with a warning. Any other disagreement
    is left for the shape check to refuse: no known MPT code runs such a checkpoint.
    """
    if ffn.get("ffn_hidden_size") is not None:
        size, said = ffn["ffn_hidden_size"], f"ffn_config.ffn_hidden_size {ffn['ffn_hidden_size']}"
    else:
        ratio = hf_get(hf, "expansion_ratio", default=4)
        size, said = hidden * ratio, f"expansion_ratio {ratio} (d_model {hidden} * {ratio} = " \
                                     f"{hidden * ratio:g})"
    if weights_width is not None and weights_width == 4 * hidden and size != weights_width:
        log.warning("config.json: MPT %s disagrees with the weights: %s has %d rows, 4 x d_model, "
                    "which is what HF's MptForCausalLM builds and runs whatever the config "
                    "says; converting with an MLP width of %d", said, _UP, weights_width,
                    weights_width)
        return weights_width
    if size != int(size):
        raise ConfigError(f"{config_name()}: d_model * expansion_ratio = {size} is not an integer; "
                          f"set ffn_config.ffn_hidden_size")
    return int(size)


def _positions(hf: dict[str, Any], attn: dict[str, Any], heads: int, arch: str) -> dict[str, Any]:
    """ALiBi slopes, or unscaled RoPE; refuses learned or absent position information."""
    # An attn_config without "alibi" means what the code that wrote it defaults to: HF's
    # MptAttentionConfig defaults to True, llm-foundry's attn_config_defaults to False.
    if hf_flag(attn, "alibi", arch == "MptForCausalLM", section="attn_config."):
        slopes = mpt_alibi_slopes(heads, float(attn.get("alibi_bias_max", 8)))
        return {"position_type": PositionType.ALIBI, "alibi_slopes": slopes}
    if hf_flag(attn, "rope", False, section="attn_config."):
        impl = attn.get("rope_impl", "dail")
        sub = attn.get(f"rope_{impl}_config") or {}
        kind = sub.get("type", "original" if impl == "dail" else "no_scaling")
        if (impl, kind) not in (("dail", "original"), ("hf", "no_scaling")):
            raise ConfigError(f"{config_name()}: MPT rope_impl {impl!r} with type {kind!r} is not "
                              f"supported; kiln converts unscaled RoPE (dail 'original', hf "
                              f"'no_scaling')")
        return {"position_type": PositionType.ROPE,
                "rope_theta": float(attn.get("rope_theta", 10000))}
    what = "learned position embeddings (transformer.wpe)" if hf_flag(hf, "learned_pos_emb", True) \
        else "a model without position information"
    raise ConfigError(f"{config_name()}: MPT with attn_config.alibi and .rope both false uses "
                      f"{what}, which kiln does not support; only ALiBi or RoPE MPT models "
                      f"convert")


def _refuse_unsupported(hf: dict[str, Any], attn: dict[str, Any], ffn: dict[str, Any]) -> None:
    """Raise ConfigError for MPT/llm-foundry options the canonical decoder cannot express."""
    def flag(key: str, default: bool = False) -> bool:
        return hf_flag(attn, key, default, section="attn_config.")

    checks = [
        (flag("alibi") and flag("rope"), "attn_config.alibi with .rope"),
        (flag("prefix_lm"), "attn_config.prefix_lm (bidirectional prefix)"),
        (flag("attn_uses_sequence_id"), "attn_config.attn_uses_sequence_id"),
        (flag("qk_gn"), "attn_config.qk_gn (per-head q/k norm)"),
        (flag("nope"), "attn_config.nope"),
        (not flag("fused_qkv", True), "attn_config.fused_qkv false (separate Wq/Wk/Wv)"),
        (attn.get("sliding_window_size", -1) not in (-1, None), "attn_config.sliding_window_size"),
        (attn.get("attn_logit_softcapping") is not None, "attn_config.attn_logit_softcapping"),
        (attn.get("reuse_kv_layer_idx") is not None, "attn_config.reuse_kv_layer_idx"),
        (attn.get("kv_dim") not in (None, hf_get(hf, "d_model", "hidden_size", default=None)),
         "attn_config.kv_dim"),
        ((attn.get("attn_temperature_tuning") or {}).get("attn_scale", 0) != 0,
         "attn_config.attn_temperature_tuning"),
        (hf.get("logit_scale") is not None, "logit_scale"),
        (bool(hf.get("block_overrides")), "block_overrides (per-layer configs)"),
        (hf.get("norm_type", "low_precision_layernorm") not in _LAYERNORMS,
         f"norm_type {hf.get('norm_type')!r} (kiln converts {', '.join(_LAYERNORMS)})"),
        (ffn.get("ffn_type", "mptmlp") != "mptmlp", f"ffn_config.ffn_type {ffn.get('ffn_type')!r}"),
        (not _exact_gelu(ffn.get("ffn_act_fn")), f"ffn_config.ffn_act_fn {ffn.get('ffn_act_fn')}"),
    ]
    for bad, what in checks:
        if bad:
            raise ConfigError(f"{config_name()}: MPT {what} is not supported by kiln; convert a "
                              f"checkpoint without it")


def _exact_gelu(act: dict[str, Any] | None) -> bool:
    return act is None or (act.get("name") == "gelu"
                           and act.get("approximate", "none") == "none")
