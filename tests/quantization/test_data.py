"""Calibration and evaluation tokens (kiln.quantization.data) against kiln eval's tokens."""

from __future__ import annotations

import pytest

from kiln.datasets import load_texts
from kiln.quantization.data import SEPARATOR, encode_stream
from kiln.runtime.tokenizer import load_tokenizer
from kiln.testing.english import english_file
from kiln.testing.smollm2 import smollm2_hf_dir


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_hf_dir())


@pytest.mark.parametrize("limit", [1, 100, 5000, None])
def test_the_stream_is_the_joined_texts_encoded_as_one_string(tokenizer, limit):
    """kiln eval encodes TextDataset.joined() whole. Each text encoded alone, with the
    separator's tokens between them, had made the gate's perplexity of a file 21% off kiln
    eval's on it: SmolLM2's tokenizer gives a blank line alone one token, and two between
    paragraphs."""
    assert tokenizer.encode(SEPARATOR, add_special_tokens=False) != \
        tokenizer.encode(f"a.{SEPARATOR}B", add_special_tokens=False)[2:-1]  # why it matters
    dataset = load_texts(english_file("evaluation"))
    whole = tokenizer.encode(dataset.joined(), add_special_tokens=False)
    ids = encode_stream(dataset, tokenizer, limit)
    if limit is None:
        assert ids == whole
    else:
        assert len(ids) >= limit and ids[:limit] == whole[:limit]
        assert len(ids) < len(whole) or limit > len(whole) // 2  # no more text than needed
