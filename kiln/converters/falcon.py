"""Falcon (TII) and its RefinedWeb remote-code predecessor: LayerNorm with bias, RoPE or ALiBi,
MHA/MQA/GQA in one fused query_key_value projection, GELU MLP, parallel or sequential blocks.

Layouts covered (HF ``FalconConfig`` keys; the RW remote-code spellings ``n_embed``, ``n_head``,
``n_head_kv``, ``n_layer`` resolve to the same settings):

- Falcon-7B: ``multi_query`` (one KV head), ``parallel_attn`` with one shared norm
  (``input_layernorm``): ``x + attn(ln(x)) + mlp(ln(x))``.
- Falcon-40B/180B (``new_decoder_architecture``): GQA with ``num_kv_heads``, always parallel,
  two norms ``ln_attn``/``ln_mlp``; Falcon-11B sets ``num_ln_in_parallel_attn`` 1 and shares
  ``input_layernorm``. An RW config with ``n_head_kv`` is this architecture (as in HF's
  ``convert_custom_code_checkpoint.py``).
- Falcon-RW: ``parallel_attn`` false: sequential with ``post_attention_layernorm``; MHA.
- ALiBi (``alibi``): BLOOM slopes. HF computes ``((q.k) + alibi) / sqrt(head_dim)``, so the
  stored slopes already carry the ``1/sqrt(head_dim)`` factor. HF (and the RW code Falcon was
  trained with) rounds each slope to bfloat16 before use; kiln stores those rounded values.

Contract: ``config_from_hf`` -> :class:`~kiln.config.DecoderConfig`; ``tensor_rules`` maps
``transformer.h.{i}...`` onto canonical roles, regrouping the fused QKV rows at conversion
time (:func:`regroup_qkv`, a pure function that also runs on meta tensors for shape planning).
The LM head is tied to ``word_embeddings`` unless ``tie_word_embeddings`` is false.

Non-goals (refused with ConfigError): ``apply_residual_connection_post_layernorm``, activations
other than exact GELU, two norms in the old (non-new_decoder_architecture) parallel block
(HF builds ``ln_attn``/``ln_mlp`` there but runs ``input_layernorm``, so no such checkpoint
works in HF either).
"""

from __future__ import annotations

import functools
import math
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
    refuse_a_decode_only_window,
    register,
    rope_from_hf,
    unknown_keys,
)
from kiln.errors import ConfigError, TensorMappingError
from kiln.roles import Role

_KNOWN = {"vocab_size", "hidden_size", "n_embed", "num_hidden_layers", "n_layer",
          "num_attention_heads", "n_head", "num_kv_heads", "n_head_kv", "layer_norm_epsilon",
          "alibi", "new_decoder_architecture", "multi_query", "parallel_attn", "bias",
          "num_ln_in_parallel_attn", "max_position_embeddings", "rope_theta", "rope_scaling",
          "rope_parameters", "ffn_hidden_size", "activation", "tie_word_embeddings",
          "apply_residual_connection_post_layernorm", "hidden_dropout", "attention_dropout"}


def falcon_alibi_slopes(num_heads: int, head_dim: int) -> tuple[float, ...]:
    """BLOOM ALiBi slopes as HF's Falcon applies them: bfloat16-rounded, times 1/sqrt(head_dim).

    ``2 ** (-8 k / n)`` for k = 1..n, n the largest power of two <= num_heads; the remaining
    heads take every other slope of the 2n sequence (``2 ** (-4 k / n)``, k = 1, 3, 5 ...).
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * k / closest) for k in range(1, closest + 1)]
    extra = min(closest, num_heads - closest)
    slopes += [2.0 ** (-4.0 * k / closest) for k in range(1, 2 * extra, 2)]
    rounded = torch.tensor(slopes, dtype=torch.float32).bfloat16().double()
    return tuple(float(s) / math.sqrt(head_dim) for s in rounded)


def regroup_qkv(fused: torch.Tensor, *, num_heads: int, num_kv_heads: int,
                head_dim: int) -> torch.Tensor:
    """Falcon's fused query_key_value rows (weight or bias) -> kiln's ``[q | k | v]`` rows.

    Why: Falcon stores the rows per KV group: ``[q_0 .. q_{g-1}, k, v]`` for each of the
    ``num_kv_heads`` groups (g = num_heads / num_kv_heads query heads per group). The three
    HF layouts are all this one: new_decoder_architecture is it literally; multi_query
    (``[all q, k, v]``) is one group; plain MHA (``[q, k, v]`` per head) is num_heads groups
    of one. Reference: ``FalconAttention._split_heads`` in
    https://github.com/huggingface/transformers/blob/main/src/transformers/models/falcon/modeling_falcon.py
    (llama.cpp's Falcon conversion regroups the same way).
    """
    per_group = num_heads // num_kv_heads
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    if fused.shape[0] != rows:
        raise TensorMappingError(
            f"query_key_value has {fused.shape[0]} rows, the config implies {rows} "
            f"(({num_heads} + 2 * {num_kv_heads}) heads * {head_dim}); check num_kv_heads, "
            f"multi_query and new_decoder_architecture in config.json")
    rest = tuple(fused.shape[1:])
    groups = fused.reshape(num_kv_heads, per_group + 2, head_dim, *rest)  # [KV, g + 2, D, ...]
    q = groups[:, :per_group].reshape(num_heads * head_dim, *rest)
    k = groups[:, per_group].reshape(num_kv_heads * head_dim, *rest)
    v = groups[:, per_group + 1].reshape(num_kv_heads * head_dim, *rest)
    return torch.cat([q, k, v], dim=0)


@register("FalconForCausalLM", "RWForCausalLM", model_types={"falcon": "FalconForCausalLM"})
class FalconConverter(Converter):
    # The RW remote code registered its rotary inv_freq as a (persistent) buffer.
    ignored = (r"transformer\.h\.\d+\.self_attention\.\w*rotary\w*\.inv_freq",)
    smoothquant_alpha = 0.6  # SmoothQuant's Falcon-7B setting (docs/quantization.md)

    @classmethod
    def max_positions(cls, hf: dict[str, Any]) -> int:
        return hf_get(hf, "max_position_embeddings", default=2048)  # FalconConfig's default

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> DecoderConfig:
        _refuse_unsupported(hf)
        refuse_a_decode_only_window(hf, architecture_name(hf), cls.max_positions(hf))
        hidden = hf_get(hf, "hidden_size", "n_embed")
        heads = hf_get(hf, "num_attention_heads", "n_head")
        if hidden % heads:
            raise ConfigError(f"{config_name()}: hidden_size {hidden} is not a multiple of "
                              f"num_attention_heads {heads}")
        head_dim = hidden // heads
        bias = hf_flag(hf, "bias", False)
        return DecoderConfig(
            architecture=architecture_name(hf),
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            num_layers=hf_get(hf, "num_hidden_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=_kv_heads(hf, heads),
            head_dim=head_dim,
            intermediate_size=hf_get(hf, "ffn_hidden_size", default=4 * hidden),
            max_position_embeddings=cls.max_positions(hf),
            norm_type=NormType.LAYERNORM,
            norm_eps=float(hf_get(hf, "layer_norm_epsilon", default=1e-5)),
            norm_bias=True,
            **_positions(hf, heads, head_dim),
            qkv_bias=bias,
            o_bias=bias,
            mlp_type=MlpType.GELU,
            mlp_bias=bias,
            **_block_layout(hf),
            tie_word_embeddings=hf_flag(hf, "tie_word_embeddings", True),
            extra=unknown_keys(hf, _KNOWN),
        )

    @classmethod
    def tensor_rules(cls, config: DecoderConfig) -> list[TensorRule]:
        layer = "transformer.h.{layer}"
        attn_norm, mlp_norm = _norm_names(config)
        regroup = functools.partial(regroup_qkv, num_heads=config.num_heads,
                                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
        qkv = f"{layer}.self_attention.query_key_value"
        lm_head = "transformer.word_embeddings.weight" if config.tie_word_embeddings \
            else "lm_head.weight"
        plain = {
            Role.EMBED: "transformer.word_embeddings.weight",
            Role.ATTN_NORM: f"{layer}.{attn_norm}.weight",
            Role.ATTN_NORM_BIAS: f"{layer}.{attn_norm}.bias",
            Role.OUT: f"{layer}.self_attention.dense.weight",
            Role.OUT_BIAS: f"{layer}.self_attention.dense.bias",
            Role.UP: f"{layer}.mlp.dense_h_to_4h.weight",
            Role.UP_BIAS: f"{layer}.mlp.dense_h_to_4h.bias",
            Role.DOWN: f"{layer}.mlp.dense_4h_to_h.weight",
            Role.DOWN_BIAS: f"{layer}.mlp.dense_4h_to_h.bias",
            Role.FINAL_NORM: "transformer.ln_f.weight",
            Role.FINAL_NORM_BIAS: "transformer.ln_f.bias",
            Role.LM_HEAD: lm_head,
        }
        if mlp_norm is not None:
            plain[Role.MLP_NORM] = f"{layer}.{mlp_norm}.weight"
            plain[Role.MLP_NORM_BIAS] = f"{layer}.{mlp_norm}.bias"
        return [TensorRule(Role.QKV, (f"{qkv}.weight",), regroup),
                TensorRule(Role.QKV_BIAS, (f"{qkv}.bias",), regroup),
                *(TensorRule(role, (name,)) for role, name in plain.items())]

    @classmethod
    def ignored_patterns(cls, config: DecoderConfig) -> tuple[str, ...]:
        # A tied checkpoint may store lm_head.weight anyway (a copy of word_embeddings).
        return cls.ignored + ((r"lm_head\.weight",) if config.tie_word_embeddings else ())


def _new_architecture(hf: dict[str, Any]) -> bool:
    # RW configs predate the flag: n_head_kv marks the new (40B) decoder, as in HF's
    # models/falcon/convert_custom_code_checkpoint.py.
    if hf.get("new_decoder_architecture") is None:
        return "n_head_kv" in hf
    return hf_flag(hf, "new_decoder_architecture", False)


def _kv_heads(hf: dict[str, Any], heads: int) -> int:
    """KV heads as HF's FalconAttention derives them (num_kv_heads counts only in the new arch)."""
    if _new_architecture(hf):
        return hf_get(hf, "num_kv_heads", "n_head_kv", default=heads)
    return 1 if hf_flag(hf, "multi_query", True) else heads


def _block_layout(hf: dict[str, Any]) -> dict[str, Any]:
    """Residual layout and norm count, following FalconDecoderLayer.__init__/forward."""
    norms = hf.get("num_ln_in_parallel_attn")
    if _new_architecture(hf):  # always parallel; parallel_attn is ignored
        return {"residual": ResidualType.PARALLEL, "parallel_norms": 2 if norms is None else norms}
    if not hf_flag(hf, "parallel_attn", True):
        return {"residual": ResidualType.SEQUENTIAL}
    if norms not in (None, 1):
        raise ConfigError(f"{config_name()}: num_ln_in_parallel_attn {norms} needs "
                          f"new_decoder_architecture true (HF's Falcon cannot run it otherwise)")
    return {"residual": ResidualType.PARALLEL, "parallel_norms": 1}


def _norm_names(config: DecoderConfig) -> tuple[str, str | None]:
    """HF module names of the (attention, MLP) norms; None: the MLP shares the attention norm."""
    if config.residual is ResidualType.SEQUENTIAL:
        return "input_layernorm", "post_attention_layernorm"
    if config.parallel_norms == 2:
        return "ln_attn", "ln_mlp"
    return "input_layernorm", None


def _positions(hf: dict[str, Any], heads: int, head_dim: int) -> dict[str, Any]:
    if hf_flag(hf, "alibi", False):
        return {"position_type": PositionType.ALIBI,
                "alibi_slopes": falcon_alibi_slopes(heads, head_dim)}
    theta, scaling = rope_from_hf(hf)
    return {"position_type": PositionType.ROPE, "rope_theta": theta, "rope_scaling": scaling}


def _refuse_unsupported(hf: dict[str, Any]) -> None:
    if hf_flag(hf, "apply_residual_connection_post_layernorm", False):
        raise ConfigError(f"{config_name()}: apply_residual_connection_post_layernorm true is not "
                          "supported (HF's Falcon ignores it too); kiln converts pre-norm Falcon")
    act = hf.get("activation", "gelu")
    if act != "gelu":
        raise ConfigError(f"{config_name()}: Falcon activation {act!r} is not supported; kiln's "
                          f"GELU MLP is exact (erf) 'gelu'")
