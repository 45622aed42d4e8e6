"""The real model: SmolLM2-135M-Instruct converts (tp 3 x pp 2, its 9 heads / 3 KV heads), and
the reference decoder's greedy tokens for a chat prompt equal HF transformers'."""

from __future__ import annotations

import json

import pytest
import torch

import kiln
from kiln.reference import ReferenceDecoder
from kiln.testing.smollm2 import smollm2_hf_dir
from tests.helpers import hf_step_logits

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hf_dir():
    return smollm2_hf_dir()


@pytest.fixture(scope="module")
def chat_prompt(hf_dir) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def reference(hf_dir, tmp_path_factory) -> ReferenceDecoder:
    out = kiln.convert_checkpoint(hf_dir, tmp_path_factory.mktemp("smollm2") / "ckpt",
                                  tp_size=3, pp_size=2, progress=False)
    return ReferenceDecoder.from_checkpoint(out)


def test_32_greedy_tokens_equal_hf(hf_dir, chat_prompt, reference):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    _, hf_tokens = hf_step_logits(model, chat_prompt, steps=32)  # greedy, EOS not honoured
    assert reference.generate(chat_prompt, max_new_tokens=32) == hf_tokens


def test_answer_mentions_paris(hf_dir, chat_prompt, reference):
    from tokenizers import Tokenizer

    eos = json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"]
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    answer = reference.generate(chat_prompt, max_new_tokens=32, eos_token_ids=eos)
    text = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).decode(answer)
    assert "Paris" in text, text
