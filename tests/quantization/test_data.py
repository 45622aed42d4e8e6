"""Calibration and evaluation tokens (kiln.quantization.data) against kiln eval's tokens."""

from __future__ import annotations

import pytest

from kiln.datasets import TextDataset, load_texts
from kiln.quantization.data import (
    SEPARATOR,
    TooFewTokens,
    encode_stream,
    shared_lines,
    token_samples,
)
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


def test_a_text_shorter_than_a_sample_is_told_the_length_that_fits(tokenizer, tmp_path):
    """A trial's 332-token --eval_dataset with 512-token samples was told only "lower the
    sample length", then that the gate needs 65 tokens, which it had."""
    short = tmp_path / "short.txt"
    short.write_text("The cat sat on the mat, and then it went to sleep in the sun.")
    n = len(tokenizer.encode(short.read_text().strip(), add_special_tokens=False))
    with pytest.raises(TooFewTokens) as e:
        token_samples(load_texts(short), tokenizer, 512)
    assert e.value.tokens == n
    assert str(e.value) == (f"{short}: has {n} tokens, 512 needed (1 sample x 512 tokens); pass "
                            f"more text or lower the sample length (calib_max_seq_length to "
                            f"{n} or less)")


def dataset(*texts: str) -> TextDataset:
    return TextDataset(texts=texts, name="t.txt", sha256="0", kind="txt")


def test_shared_lines_ignore_whitespace_and_count_only_long_lines():
    """Short lines (headings, "Returns:") recur in unrelated texts: only lines of 32 characters
    or more count, unless a text has none; a re-indented, tab- or CRLF-separated line is the
    same line."""
    long = "the gate scores text calibration saw, which flatters"
    calibration = dataset(f"Returns:\n{long}", "Another line of calibration text, long enough.")
    assert shared_lines(dataset(f"  {long.replace(' ', chr(9))}\r\nReturns:",
                                "A line of evaluation text that is long enough."),
                        calibration.texts) == (1, 2)
    assert shared_lines(dataset("Returns:\nExamples"), calibration.texts) == (1, 2)
