"""Incremental detokenization (real byte-level BPE) and stop strings across token boundaries."""

from __future__ import annotations

import pytest

from kiln.runtime.detokenize import IncrementalDetokenizer, StopStringMatcher

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "Emoji: 🦙🔥 and CJK: 東京は日本の首都です。 Ünïcödé ✓",
    "  leading spaces\nnew lines\n\ttabs",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_and_are_whole_characters(tokenizer, text):
    prompt = tokenizer.encode("Say something:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_a_character_split_over_tokens_is_held_until_complete(tokenizer):
    ids = tokenizer.encode("🦙", add_special_tokens=False)
    assert len(ids) > 1, "the llama emoji should span several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🦙"


@pytest.mark.parametrize("cut", [1, 2])
def test_an_incomplete_character_at_the_end_is_dropped_not_flushed_as_replacement(tokenizer,
                                                                                  cut):
    """Generation stopped (length) mid-emoji: the text ends before it, never in U+FFFD."""
    ids = tokenizer.encode("ok 🦙", add_special_tokens=False)
    emoji = len(tokenizer.encode("🦙", add_special_tokens=False))
    assert emoji > cut, "the llama emoji should span several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.push(t) for t in ids[:-cut]] + [detok.flush()]
    assert "".join(deltas) == "ok "


def test_a_real_replacement_character_at_the_end_stays(tokenizer):
    ids = tokenizer.encode("ok \ufffd", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join([detok.push(t) for t in ids] + [detok.flush()]) == "ok \ufffd"


def test_special_tokens_are_skipped_unless_asked(tokenizer):
    eos = tokenizer.eos_token_ids[0]
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert skip.push(eos) + skip.flush() == ""
    assert keep.push(eos) + keep.flush() == "<|im_end|>"


def stream(matcher, pieces):
    out = [matcher.push(p) for p in pieces]
    if matcher.matched is None:
        out.append(matcher.flush())
    return out


def test_stop_string_across_pieces_is_never_emitted():
    m = StopStringMatcher(["STOP"])
    out = stream(m, ["Hello S", "T", "OP and more"])
    assert "".join(out) == "Hello "
    assert m.matched == "STOP" and m.text == "Hello "
    assert all("S" not in piece for piece in out)


def test_stop_string_included_when_asked():
    m = StopStringMatcher(["</s>"], include_stop=True)
    assert "".join(stream(m, ["a</", "s>b"])) == "a</s>"


def test_partial_match_that_does_not_complete_is_released():
    m = StopStringMatcher(["STOP"])
    out = stream(m, ["ST", "ep", " by step"])
    assert "".join(out) == "STep by step" and m.matched is None


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(["world", "lo w"])
    assert "".join(stream(m, ["hello world"])) == "hel" and m.matched == "lo w"


def test_no_stops_releases_everything_at_once():
    m = StopStringMatcher([])
    assert m.push("abc") == "abc"
