"""The HF baseline shares the packed weights and computes the oracle's logits."""

from __future__ import annotations

import pytest
import torch

from kiln.checkpoint import load_config, load_rank
from kiln.errors import ConfigError
from kiln.reference import ReferenceDecoder
from kiln.runtime.torch_backend.hf_baseline import hf_generate, hf_model
from tests.models import PROMPT, kiln_checkpoint
from tests.models import hf_model as make_hf


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa-tied", "llama-rope-llama3",
                                  "mistral-window", "llama-mha-headdim-bias"])
def test_hf_model_on_shared_weights_matches_oracle(tmp_path, name):
    ckpt = kiln_checkpoint(make_hf(name, tmp_path / "hf"), tmp_path / "ckpt")
    config = load_config(ckpt)
    tensors = load_rank(ckpt, 0, config)
    model = hf_model(config.decoder, tensors)
    qkv = tensors["layers.0.attn.qkv.weight"]
    assert model.model.layers[0].self_attn.k_proj.weight.data_ptr() > qkv.data_ptr()  # a view
    with torch.no_grad():
        got = model(torch.tensor([PROMPT])).logits[0, -1]
    want = ReferenceDecoder.from_checkpoint(ckpt).forward(torch.tensor([PROMPT]))[0, -1]
    assert float((got - want).abs().max()) <= 1e-4
    outputs, run = hf_generate(model, [PROMPT, PROMPT[::-1]], 4, batch_size=2)
    assert [len(o) for o in outputs] == [4, 4] and run.output_tokens == 8
    assert outputs[0][0] == int(want.argmax())


def test_hf_baseline_refuses_other_architectures(tmp_path):
    ckpt = kiln_checkpoint(make_hf("falcon-rw-alibi", tmp_path / "hf"), tmp_path / "ckpt")
    config = load_config(ckpt)
    with pytest.raises(ConfigError, match="Llama/Mistral-style"):
        hf_model(config.decoder, load_rank(ckpt, 0, config))


def test_hf_baseline_for_a_torch_engine(tmp_path):
    from kiln.builder.api import build
    from kiln.runtime.torch_backend.hf_baseline import hf_baseline_for_engine

    ckpt = kiln_checkpoint(make_hf("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    build(ckpt, tmp_path / "engine", backend="torch", max_seq_len=32, dtype="float32")
    outputs, run = hf_baseline_for_engine(tmp_path / "engine", [PROMPT, PROMPT[::-1]], 5, 2,
                                          device="cpu")
    ref = ReferenceDecoder.from_checkpoint(ckpt)
    assert outputs == [ref.generate(PROMPT, 5), ref.generate(PROMPT[::-1], 5)]
    assert run.output_tokens == 10 and run.tokens_per_second > 0
