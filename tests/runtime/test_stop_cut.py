"""A stop string cuts a request's token ids and logprobs with its text (kiln.runtime.core's
module docstring), on an onnx engine of the tiny random Llama (one token per character, and
ids past 95 decode to nothing) through the LLM API: result and stream alike."""

from __future__ import annotations

import pytest

from kiln.runtime import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def llm(tiny_hf, tmp_path_factory):
    with LLM(model=tiny_hf, cache_dir=tmp_path_factory.mktemp("kiln-cache")) as llm:
        yield llm


@pytest.fixture(scope="module")
def full(llm):
    """The greedy answer without a stop string, and a 3-character stop string from inside it."""
    (result,) = llm.generate("Hello", PARAMS)
    text = result.text
    stop = text[2:5]
    assert len(stop) == 3 and text.find(stop) > 0, f"pick another stop string in {text!r}"
    return result, stop


def _check(llm, result, full) -> None:
    """The result's tokens are the answer's first ones, their text its text exactly."""
    n = len(result.token_ids)
    assert result.token_ids == full.token_ids[:n]
    assert llm.tokenizer.decode(list(result.token_ids)) == result.text
    assert [e.token_id for e in result.logprobs] == list(result.token_ids)
    assert result.logprobs == full.logprobs[:n]
    assert len(result.timings.token_times) == n


def test_tokens_and_logprobs_end_where_the_text_does(llm, full):
    """A trial's logprobs went on past the returned text, over the stop string's tokens."""
    full, stop = full
    cut = full.text.find(stop)
    (result,) = llm.generate("Hello", PARAMS.replace(stop=(stop,)))
    assert (result.text, result.finish_reason, result.stop_reason) == (full.text[:cut], "stop",
                                                                       stop)
    _check(llm, result, full)
    (kept,) = llm.generate("Hello", PARAMS.replace(stop=(stop,), include_stop_str_in_output=True))
    assert kept.text == full.text[:cut + len(stop)]
    _check(llm, kept, full)
    assert len(kept.token_ids) > len(result.token_ids)


def test_the_stream_carries_the_result_s_tokens_only(llm, full):
    full, stop = full
    deltas = list(llm.generate_stream("Hello", PARAMS.replace(stop=(stop,))))
    result = deltas[-1].result
    assert "".join(d.text for d in deltas) == result.text
    assert tuple(t for d in deltas for t in d.token_ids) == result.token_ids
    assert tuple(e for d in deltas for e in d.logprobs) == result.logprobs
    _check(llm, result, full)
