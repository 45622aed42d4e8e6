"""Llama and Mistral: convert tiny random HF models at several splits; the oracle matches HF."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import kiln
from kiln.reference import ReferenceDecoder
from tests.helpers import hf_step_logits, max_abs_diff, ref_step_logits, save_hf_model

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

VARIANTS = {
    "gqa": (LlamaConfig, LlamaForCausalLM, {}),
    "mha-headdim-bias": (LlamaConfig, LlamaForCausalLM,
                         dict(num_key_value_heads=4, head_dim=24, attention_bias=True,
                              mlp_bias=True)),
    "mqa-tied": (LlamaConfig, LlamaForCausalLM,
                 dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "rope-linear": (LlamaConfig, LlamaForCausalLM,
                    dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # max_position_embeddings below the sequence so dynamic NTK scaling takes effect.
    "rope-dynamic": (LlamaConfig, LlamaForCausalLM,
                     dict(max_position_embeddings=8,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "rope-llama3": (LlamaConfig, LlamaForCausalLM,
                    dict(rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})),
    "mistral-window": (MistralConfig, MistralForCausalLM, dict(sliding_window=4)),
}
PROMPT = [3, 17, 5, 99, 42, 8, 64, 1, 127, 33, 12]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_model_dir(request, tmp_path_factory):
    config_cls, model_cls, overrides = VARIANTS[request.param]
    config = config_cls(**{**BASE, **overrides})
    path = tmp_path_factory.mktemp(request.param)
    return save_hf_model(model_cls, config, path), model_cls


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_reference_matches_hf(hf_model_dir, tmp_path, tp, pp):
    src, model_cls = hf_model_dir
    out = kiln.convert_checkpoint(src, tmp_path / "ckpt", tp_size=tp, pp_size=pp, progress=False)
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == \
        sorted(f"rank{r}.safetensors" for r in range(tp * pp))
    model = model_cls.from_pretrained(src, dtype=torch.float32).eval()
    want, tokens = hf_step_logits(model, PROMPT, steps=8)
    got = ref_step_logits(ReferenceDecoder.from_checkpoint(out), PROMPT, tokens)
    assert max_abs_diff(got, want) <= 1e-4
