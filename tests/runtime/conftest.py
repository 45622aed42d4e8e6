"""Shared runtime fixtures: the real SmolLM2 tokenizer and a tiny random Llama checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.engine import BuildLimits
from kiln.runtime.tokenizer import ModelTokenizer, load_tokenizer
from tests.models import hf_model, kiln_checkpoint


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from kiln.testing.smollm2 import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path) -> ModelTokenizer:
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return kiln_checkpoint(hf_model("llama-gqa", root / "hf"), root / "ckpt")


@pytest.fixture
def limits() -> BuildLimits:
    return BuildLimits(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=24)
