"""ModelTokenizer on the real SmolLM2 tokenizer: what a server needs of its encoding."""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time

import pytest

from kiln.errors import options_as_flags
from kiln.runtime.errors import RequestError, TokenizerError
from kiln.runtime.tokenizer import load_tokenizer
from tests.helpers import with_bom


class _Counting:
    """A tokenizers.Tokenizer that records the length of each text it encodes."""

    def __init__(self, tokenizer, lengths: list[int]):
        self._tokenizer, self._lengths = tokenizer, lengths

    def encode_batch(self, texts, **kwargs):
        self._lengths.extend(len(t) for t in texts)
        return self._tokenizer.encode_batch(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_encoding_a_long_text_lets_other_threads_run(tokenizer):
    """A server encodes a long prompt in a worker thread so that its event loop goes on; that
    helps only if the encoding lets go of the GIL (the tokenizers library's ``encode`` holds it:
    a 3.6 MB text stopped every other thread for 2.3 s)."""
    text = "The quick brown fox jumps over the lazy dog. " * 20_000  # 900 KB, about 0.5 s
    ids: list[int] = []
    worker = threading.Thread(target=lambda: ids.extend(tokenizer.encode(text)))
    ticks = [time.perf_counter()]
    worker.start()
    while worker.is_alive():  # this thread needs the GIL for every tick
        time.sleep(0.001)
        ticks.append(time.perf_counter())
    took = ticks[-1] - ticks[0]
    longest = max(b - a for a, b in itertools.pairwise(ticks))
    assert longest < took / 2, f"this thread stood still {longest:.3f} s of the {took:.3f} s"
    assert ids == tokenizer.tokenizer.encode(text).ids  # the same ids as encode's


def test_a_text_far_over_the_limit_is_refused_from_its_head(tokenizer, monkeypatch):
    """Trial 36: a 3.5 MB prompt to an engine of max_input_len 1000 was encoded whole (2 s,
    0.4 GB a server kept) to be refused; its first 8 x 1,016 characters decide it."""
    text = "The quick brown fox jumps over the lazy dog. " * 78_000
    encoded: list[int] = []
    monkeypatch.setattr(tokenizer, "tokenizer", _Counting(tokenizer.tokenizer, encoded))
    with pytest.raises(RequestError) as e:
        tokenizer.encode(text, most=1000)
    assert str(e.value) == (
        "prompt of more than 1000 tokens exceeds the engine's max_input_len 1000 (its first "
        "8125 characters alone are 1805 tokens); shorten it, or build with a larger "
        "max_input_len (kiln.build, or beside LLM(model=...))")
    assert encoded == [8125]  # the head alone
    with options_as_flags(), pytest.raises(RequestError) as e:  # a kiln command's words
        tokenizer.encode(text, most=1000)
    assert str(e.value).endswith("with a larger --max_input_len (kiln build, or beside "
                                 "--model_dir)")


@pytest.mark.parametrize("text", [
    "The quick brown fox. " * 40,  # under the head's length: encoded whole
    ("x" + " " * 200) * 100,  # 20,100 characters, 500 tokens: over the head, under the limit
    # a head of few tokens, then 3,000 more: the head cannot tell, so the whole is encoded
    # (and the engine refuses it by its count)
    ("x" + " " * 200) * 50 + "The quick brown fox. " * 600,
])
def test_a_text_the_head_cannot_refuse_is_encoded_whole(tokenizer, text):
    assert tokenizer.encode(text, most=1000) == tokenizer.encode(text)


@pytest.mark.parametrize("template_file", ["chat_template.jinja", "chat_template.json",
                                           "tokenizer_config.json"])
def test_files_with_a_utf8_bom_read_as_without(smollm2_dir, tmp_path, template_file):
    """Windows editors save UTF-8 with a byte-order mark: tokenizer.json had been "unreadable
    (expected value at line 1 column 1)", the JSON files "invalid JSON", and a template's BOM
    would have begun every rendered prompt."""
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    for directory in (plain, marked):
        directory.mkdir()
        for name in ("tokenizer.json", "generation_config.json"):
            shutil.copy(smollm2_dir / name, directory / name)
        written = {**config, "chat_template": template} \
            if template_file == "tokenizer_config.json" else config
        (directory / "tokenizer_config.json").write_text(json.dumps(written))
        if template_file == "chat_template.jinja":
            (directory / template_file).write_text(template)
        elif template_file == "chat_template.json":
            (directory / template_file).write_text(json.dumps({"chat_template": template}))
    for path in marked.iterdir():
        with_bom(path)
    want, got = load_tokenizer(plain), load_tokenizer(marked)
    messages = [{"role": "user", "content": "Hi"}]
    assert got.apply_chat_template(messages) == want.apply_chat_template(messages)
    assert not got.apply_chat_template(messages).startswith("\ufeff")
    assert got.encode("Hello world") == want.encode("Hello world")
    assert (got.special_tokens, got.generation_config, got.eos_token_ids) == \
        (want.special_tokens, want.generation_config, want.eos_token_ids)


@pytest.mark.parametrize("content, said", [
    ({"do_sample": True, "top_p": 1.5},
     "top_p must be in (0, 1], found a number 1.5 (a default of the model's sampling); correct "
     "or remove the field"),
    ({"do_sample": True, "top_k": "x"}, "top_k must be an integer >= 1, or 0 or -1 (off), found "
                                        "a string \"x\""),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, found a number 0 (a "),
    ({"eos_token_id": 2.0}, "eos_token_id must be a token id (an integer >= 0) or a list of "
                            "them, found a number 2.0; correct or remove the field"),
    ({"eos_token_id": "abc"}, "found a string \"abc\""),
    ({"eos_token_id": [2, True]}, "found an array [2, true]"),
    ([], "not a JSON object (found an array []); re-copy it from the checkpoint"),
    ("hello", "not a JSON object (found a string \"hello\")"),
])
def test_a_generation_config_with_a_bad_value_is_named_with_its_file(
        smollm2_dir, tmp_path, content, said):
    """A retest: top_p 1.5 in the file was refused as the request's "SamplingParams.top_p" (no
    flag could override it), a float EOS id ended in a TypeError, "abc" was read as three ids,
    and a file that is no JSON object was read as empty."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(TokenizerError) as refused:
        load_tokenizer(tmp_path)
    assert str(refused.value).startswith(f"{path}: ") and said in str(refused.value)


def test_a_generation_config_that_samples_greedily_may_hold_any_temperature(smollm2_dir,
                                                                            tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": -1, "eos_token_id": [2, 0]}))  # (HF ignores it too: no do_sample)
    assert load_tokenizer(tmp_path).eos_token_ids == (2, 0)
