"""Llama (1/2/3.x) and Mistral: RMSNorm, RoPE (+ scaling), GQA, SwiGLU, optional biases.

HF's Llama checkpoints already store q/k projections in the rotate-half layout HF's
``apply_rotary_pos_emb`` expects (HF's own conversion script permuted Meta's interleaved
weights), so no permutation is needed here: kiln's rotary embedding is rotate-half
(non-interleaved) too. Mistral is Llama plus a sliding attention window.
"""

from __future__ import annotations

import logging
from typing import Any

from kiln.config import DecoderConfig, MlpType, NormType, PositionType
from kiln.converters.base import (
    Converter,
    TensorRule,
    architecture_name,
    concat_rows,
    config_name,
    hf_flag,
    hf_get,
    refuse_a_decode_only_window,
    register,
    rope_from_hf,
    unknown_keys,
)
from kiln.errors import ConfigError
from kiln.roles import Role

log = logging.getLogger(__name__)

_KNOWN = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
          "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
          "mlp_bias", "tie_word_embeddings", "hidden_act", "sliding_window", "use_sliding_window",
          "attention_dropout", "pretraining_tp"}

# transformers' MistralConfig default, for a config.json without the key.
_MISTRAL_WINDOW = 4096


def _sliding_window(hf: dict[str, Any], architecture: str) -> int | None:
    """The attention window HF's modeling code applies: Mistral's ``sliding_window`` (absent:
    4096 as in MistralConfig; null: none).

    ``use_sliding_window`` is Qwen2's switch; neither class reads it, so a ``false`` beside a
    Mistral window does not turn the window off (a trial: kiln had dropped it, and its tokens
    then differed from HF's); that is said at the default level. Llama's attention masks no
    window (:func:`~kiln.converters.base.refuse_a_decode_only_window`).
    """
    window = hf_get(hf, "sliding_window", default=None)
    use = hf_flag(hf, "use_sliding_window", True)
    if architecture != "MistralForCausalLM":
        refuse_a_decode_only_window(hf, architecture, LlamaConverter.max_positions(hf),
                                    "architectures [\"MistralForCausalLM\"] for a window "
                                    "everywhere")
        return None
    if "sliding_window" not in hf:
        log.info("config.json has no sliding_window; Mistral's default of %d tokens applies, "
                 "as in transformers", _MISTRAL_WINDOW)
        window = _MISTRAL_WINDOW
    if window is not None and not use:
        log.warning("config.json: use_sliding_window false is ignored: transformers' "
                    "MistralForCausalLM applies sliding_window %d regardless, and so does kiln "
                    "(set sliding_window to null for full attention)", window)
    return window


# transformers' names of x * sigmoid(x) (ACT2FN: "swish" is the same SiLU module)
SILU_NAMES = ("silu", "swish")


@register("LlamaForCausalLM", "MistralForCausalLM",
          model_types={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"})
class LlamaConverter(Converter):
    ignored = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    smoothquant_alpha = {"LlamaForCausalLM": 0.85, "MistralForCausalLM": 0.8}  # docs/quantization.md

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> DecoderConfig:
        act = hf.get("hidden_act", "silu")
        if act not in SILU_NAMES:
            raise ConfigError(f"{config_name()}: hidden_act {act!r} is not supported for "
                              f"Llama/Mistral (kiln's gated MLP is SwiGLU: 'silu')")
        hidden = hf_get(hf, "hidden_size")
        heads = hf_get(hf, "num_attention_heads")
        if hf.get("head_dim") is None and hidden % heads:  # transformers refuses it too
            raise ConfigError(f"{config_name()}: hidden_size {hidden} is not a multiple of "
                              f"num_attention_heads {heads}; fix it in config.json (or give "
                              f"head_dim)")
        theta, scaling = rope_from_hf(hf)
        architecture = architecture_name(hf)
        bias = hf_flag(hf, "attention_bias", False)
        return DecoderConfig(
            architecture=architecture,
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            num_layers=hf_get(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf_get(hf, "num_key_value_heads", default=heads),
            head_dim=hf_get(hf, "head_dim", default=hidden // heads),
            intermediate_size=hf_get(hf, "intermediate_size"),
            max_position_embeddings=cls.max_positions(hf),
            norm_type=NormType.RMSNORM,
            norm_eps=float(hf_get(hf, "rms_norm_eps", default=1e-6)),
            position_type=PositionType.ROPE,
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=_sliding_window(hf, architecture),
            qkv_bias=bias,
            o_bias=bias,
            mlp_type=MlpType.SWIGLU,
            mlp_bias=hf_flag(hf, "mlp_bias", False),
            tie_word_embeddings=hf_flag(hf, "tie_word_embeddings", False),
            extra=unknown_keys(hf, _KNOWN),
        )

    @classmethod
    def tensor_rules(cls, config: DecoderConfig) -> list[TensorRule]:
        attn, mlp = "model.layers.{layer}.self_attn", "model.layers.{layer}.mlp"
        qkv = tuple(f"{attn}.{p}_proj" for p in "qkv")
        gate_up = (f"{mlp}.gate_proj", f"{mlp}.up_proj")
        lm_head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        return [
            TensorRule(Role.EMBED, ("model.embed_tokens.weight",)),
            TensorRule(Role.ATTN_NORM, ("model.layers.{layer}.input_layernorm.weight",)),
            TensorRule(Role.QKV, tuple(p + ".weight" for p in qkv), concat_rows),
            TensorRule(Role.QKV_BIAS, tuple(p + ".bias" for p in qkv), concat_rows),
            TensorRule(Role.OUT, (f"{attn}.o_proj.weight",)),
            TensorRule(Role.OUT_BIAS, (f"{attn}.o_proj.bias",)),
            TensorRule(Role.MLP_NORM, ("model.layers.{layer}.post_attention_layernorm.weight",)),
            TensorRule(Role.GATE_UP, tuple(p + ".weight" for p in gate_up), concat_rows),
            TensorRule(Role.GATE_UP_BIAS, tuple(p + ".bias" for p in gate_up), concat_rows),
            TensorRule(Role.DOWN, (f"{mlp}.down_proj.weight",)),
            TensorRule(Role.DOWN_BIAS, (f"{mlp}.down_proj.bias",)),
            TensorRule(Role.FINAL_NORM, ("model.norm.weight",)),
            TensorRule(Role.LM_HEAD, (lm_head,)),
        ]

    @classmethod
    def ignored_patterns(cls, config: DecoderConfig) -> tuple[str, ...]:
        # Tied checkpoints sometimes store lm_head.weight anyway (a copy of the embedding).
        return cls.ignored + ((r"lm_head\.weight",) if config.tie_word_embeddings else ())
