"""kiln.evaluation: HF's sliding windows, and the refusals that need no real model."""

from __future__ import annotations

import pytest

from kiln.errors import ConfigError, DatasetError
from kiln.evaluation import Window, evaluate, sliding_windows


def test_windows_are_hugging_faces():
    # N=10, max_length 4, stride 2: begins 0, 2, 4, 6; the window ending at 10 is the last.
    assert sliding_windows(10, 4, 2) == [Window(0, 4, 4), Window(2, 6, 2), Window(4, 8, 2),
                                         Window(6, 10, 2)]
    assert sliding_windows(10, 4, 4) == [Window(0, 4, 4), Window(4, 8, 4), Window(8, 10, 2)]
    assert sliding_windows(3, 8, 4) == [Window(0, 3, 3)]
    # every token after the first is scored exactly once
    for n, length, stride in [(100, 16, 5), (37, 8, 8), (64, 64, 1)]:
        windows = sliding_windows(n, length, stride)
        assert sum(w.targets for w in windows) == n and windows[-1].end == n
        assert all(w.end - w.begin <= length and w.targets <= w.end - w.begin for w in windows)


@pytest.mark.parametrize(("args", "error", "expected"), [
    ((1, 4, 2), DatasetError, "the text is 1 token long; perplexity needs at least 2"),
    ((10, 4, 5), ConfigError, "stride 5 must be in [1, max_length 4]"),
    ((10, 1, 1), ConfigError, "max_length 1 must be at least 2"),
])
def test_bad_windows(args, error, expected):
    with pytest.raises(error) as info:
        sliding_windows(*args)
    assert expected in str(info.value)


def test_engine_without_gather_context_logits_is_refused(tiny_engine_no_gather, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.")
    with pytest.raises(ConfigError) as info:
        evaluate(tiny_engine_no_gather, text)
    assert "rebuild it with kiln build --gather_context_logits" in str(info.value)


@pytest.fixture
def tiny_engine_no_gather(tmp_path):
    from kiln.builder import build
    from tests.models import hf_model, kiln_checkpoint

    checkpoint = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    return build(checkpoint, tmp_path / "engine", backend="torch", max_seq_len=32).output_dir
