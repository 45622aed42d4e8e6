"""Tiny random HF models of every supported architecture variant, for tests of every stage.

``VARIANTS[name] = (config_cls, model_cls, config_kwargs)``. Use :func:`hf_model` to save
one (cached per test session by the caller's fixture) and :func:`kiln_checkpoint` to convert
it. Every variant has vocab 128 and at least 2 layers, so tp 1/2/4 and pp 1/2 apply where the
head counts allow (see ``tp_sizes``).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MptConfig,
    MptForCausalLM,
)

import kiln
from tests.helpers import save_hf_model

LLAMA_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# HF's MptForCausalLM: MHA, no biases, 4x MLP, ALiBi; max_seq_len covers the test sequences.
MPT_BASE = dict(vocab_size=128, d_model=64, n_heads=4, n_layers=2, max_seq_len=64)
FALCON_BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64)

VARIANTS = {
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, {}),
    "llama-mha-headdim-bias": (LlamaConfig, LlamaForCausalLM,
                               dict(num_key_value_heads=4, head_dim=24, attention_bias=True,
                                    mlp_bias=True)),
    "llama-mqa-tied": (LlamaConfig, LlamaForCausalLM,
                       dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-rope-linear": (LlamaConfig, LlamaForCausalLM,
                          dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # max_position_embeddings below the test sequences so dynamic NTK scaling takes effect.
    "llama-rope-dynamic": (LlamaConfig, LlamaForCausalLM,
                           dict(max_position_embeddings=8,
                                rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama-rope-llama3": (LlamaConfig, LlamaForCausalLM,
                          dict(rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16})),
    "mistral-window": (MistralConfig, MistralForCausalLM, dict(sliding_window=4)),
    "mpt": (MptConfig, MptForCausalLM, MPT_BASE),
    # clip 0.1 clamps a good share of the qkv activations of this random model.
    "mpt-clip-scale": (MptConfig, MptForCausalLM,
                       {**MPT_BASE, "n_heads": 8,
                        "attn_config": {"clip_qkv": 0.1, "softmax_scale": 0.2}}),
    # 6 heads: ALiBi slopes of a non-power-of-2 head count.
    "mpt-heads6": (MptConfig, MptForCausalLM, {**MPT_BASE, "d_model": 48, "n_heads": 6}),
    # Falcon-7B: multi-query, parallel attention + MLP sharing input_layernorm.
    "falcon-7b-mqa": (FalconConfig, FalconForCausalLM,
                      {**FALCON_BASE, "multi_query": True, "rope_theta": 5000.0}),
    # Falcon-40B/180B: new decoder architecture, GQA, ln_attn + ln_mlp.
    "falcon-40b-gqa": (FalconConfig, FalconForCausalLM,
                       {**FALCON_BASE, "num_attention_heads": 8, "new_decoder_architecture": True,
                        "num_kv_heads": 2, "ffn_hidden_size": 96}),
    # Falcon-11B: new decoder architecture with one shared norm; linear RoPE scaling.
    "falcon-11b-gqa-1ln": (FalconConfig, FalconForCausalLM,
                           {**FALCON_BASE, "num_attention_heads": 8,
                            "new_decoder_architecture": True, "num_kv_heads": 4,
                            "num_ln_in_parallel_attn": 1,
                            "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                "rope_theta": 10000.0}}),
    # Falcon-RW: sequential block, MHA (per-head interleaved qkv), biases, ALiBi.
    "falcon-rw-alibi": (FalconConfig, FalconForCausalLM,
                        {**FALCON_BASE, "parallel_attn": False, "multi_query": False,
                         "alibi": True, "bias": True}),
    # MHA with a parallel block, biases, dynamic NTK RoPE past max_position_embeddings.
    "falcon-mha-parallel-dynamic": (FalconConfig, FalconForCausalLM,
                                    {**FALCON_BASE, "multi_query": False, "bias": True,
                                     "max_position_embeddings": 8,
                                     "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                         "rope_theta": 10000.0}}),
    # Multi-query + ALiBi, 8 heads.
    "falcon-mqa-alibi": (FalconConfig, FalconForCausalLM,
                         {**FALCON_BASE, "num_attention_heads": 8, "alibi": True}),
}
# Tensor-parallel sizes a variant's head counts allow, where not all of (1, 2, 4).
TP_SIZES = {"mpt-heads6": (1, 2)}
# Variants whose HF forward is the oracle's oracle (all, unless a variant says otherwise).
PROMPT = [3, 17, 5, 99, 42, 8, 64, 1, 127, 33, 12]


def hf_model(name: str, path: Path) -> Path:
    """Save variant ``name`` as an HF checkpoint (float32, random weights) at ``path``."""
    config_cls, model_cls, overrides = VARIANTS[name]
    base = LLAMA_BASE if config_cls in (LlamaConfig, MistralConfig) else {}
    return save_hf_model(model_cls, config_cls(**{**base, **overrides}), path)


def hf_llama(path: Path, **overrides) -> Path:
    """An HF Llama of ``LLAMA_BASE`` with ``overrides`` (not a variant: for a test that needs
    one shape, e.g. every input dim a multiple of 64 for INT4's fragment layout)."""
    return save_hf_model(LlamaForCausalLM, LlamaConfig(**{**LLAMA_BASE, **overrides}), path)


def hf_model_with_tokenizer(name: str, path: Path) -> Path:
    """:func:`hf_model` with a tokenizer beside it, so text prompts run: one token per
    printable ASCII character (ids 1-95; 0 is ``<unk>``) and a ``tokenizer_config.json``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    hf_model(name, path)
    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return path


def tp_sizes(name: str) -> tuple[int, ...]:
    return TP_SIZES.get(name, (1, 2, 4))


def model_class(name: str):
    return VARIANTS[name][1]


def kiln_checkpoint(hf_dir: Path, out: Path, tp: int = 1, pp: int = 1, dtype: str = "auto") -> Path:
    return kiln.convert_checkpoint(hf_dir, out, tp_size=tp, pp_size=pp, dtype=dtype,
                                   progress=False)
