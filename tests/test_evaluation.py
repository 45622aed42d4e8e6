"""kiln.evaluation: HF's sliding windows, and the refusals that need no real model."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from kiln.errors import ConfigError, DatasetError, options_as_flags
from kiln.evaluation import Window, evaluate, sliding_windows
from kiln.runtime.options import ExecutorOptions

ON_CPU = ExecutorOptions(device="cpu")  # the torch engines' PyTorch reference kernels


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
    ((1, 4, 2), DatasetError, "the text is 1 token long, so 0 tokens to score (the first is "
                              "context only); perplexity needs at least 2 to score: give a text "
                              "of at least 3 tokens"),
    # one token scored: its probability alone, not a text's perplexity (a trial's "Hi.")
    ((2, 4, 2), DatasetError, "the text is 2 tokens long, so 1 token to score"),
    ((10, 4, 5), ConfigError, "stride 5 must be in [1, max_length 4]; lower stride"),
    # a stride below 1 is raised, not lowered (a trial's stride 0 had been told "lower stride")
    ((10, 4, 0), ConfigError, "stride 0 must be in [1, max_length 4]; raise stride"),
    ((10, 4, -1), ConfigError, "stride -1 must be in [1, max_length 4]; raise stride"),
    # max_length first: no stride fits it (stride 2 had been told to be lowered, to 1)
    ((10, 1, 1), ConfigError, "max_length 1 must be at least 2; raise max_length"),
    ((10, 1, 2), ConfigError, "max_length 1 must be at least 2; raise max_length"),
])
def test_bad_windows(args, error, expected):
    with pytest.raises(error) as info:
        sliding_windows(*args)
    assert expected in str(info.value)


@pytest.mark.parametrize("options, expected", [
    (dict(max_length="64"), "max_length must be an integer, found '64'"),
    (dict(stride=2.0), "stride must be an integer, found 2.0"),
    (dict(max_length=64, stride=True), "stride must be an integer, found True"),
])
def test_a_window_option_that_is_no_integer_is_named(tmp_path, options, expected):
    """A trial's evaluate(E, "english.txt", max_length="64") was a TypeError ("'>' not
    supported between instances of 'str' and 'int'"); refused before anything is read."""
    with pytest.raises(ConfigError) as info:
        evaluate(tmp_path / "no-engine", tmp_path / "no-text.txt", **options)
    assert str(info.value) == expected


def test_every_window_entry_checks_the_types():
    from kiln.evaluation import resolve_window

    with pytest.raises(ConfigError, match="^max_length must be an integer, found '4'$"):
        sliding_windows(10, "4", 2)
    with pytest.raises(ConfigError, match="^stride must be an integer, found '2'$"):
        resolve_window(128, None, "2")


class _BosTokenizer:
    """One token per word, after the BOS (id 1) the model adds."""

    def encode(self, text, add_special_tokens=True):
        return [1] * add_special_tokens + [7] * len(text.split())


def test_a_text_too_short_to_score_says_what_the_tokenizer_added(tmp_path):
    from kiln.datasets import load_texts
    from kiln.evaluation import text_tokens

    text = tmp_path / "hi.txt"
    text.write_text("Hi")
    with pytest.raises(DatasetError) as info:
        text_tokens(_BosTokenizer(), load_texts(text))
    assert str(info.value) == (f"{text}: the text is 2 tokens long with the 1 special token the "
                               f"tokenizer adds, so 1 token to score (the first is context "
                               f"only); perplexity needs at least 2 to score: give a text of at "
                               f"least 3 tokens")
    text.write_text("Hi there")
    assert text_tokens(_BosTokenizer(), load_texts(text)) == [1, 7, 7]


@pytest.fixture(scope="module")
def gathering_engine(tiny_hf, tmp_path_factory):
    """A torch engine of tiny_hf that gathers context logits (vocab 128)."""
    from kiln.builder import build
    from tests.models import kiln_checkpoint

    root = tmp_path_factory.mktemp("gathering")
    return build(kiln_checkpoint(tiny_hf, root / "ckpt"), root / "engine", backend="torch",
                 max_seq_len=32, gather_context_logits=True).output_dir


@pytest.fixture
def not_loaded(monkeypatch):
    """The engine must not load: a refusal comes first."""
    import kiln.runtime

    def not_loaded(*args, **kwargs):
        raise AssertionError("the engine was loaded before the refusal")

    monkeypatch.setattr(kiln.runtime, "LLM", not_loaded)


def test_a_text_of_two_tokens_is_refused_before_the_engine_loads(gathering_engine, tmp_path,
                                                                  not_loaded):
    """A trial's two-token text gave "perplexity 80.209628" (one token's probability) and
    exit 0."""
    text = tmp_path / "two.txt"
    text.write_text("Hi")  # a token a character
    with pytest.raises(DatasetError) as info:
        evaluate(gathering_engine, text)
    assert str(info.value).startswith(f"{text}: the text is 2 tokens long, so 1 token to score")


FLAT = "token_ids must be one flat (1-D) list of ids (one text's: flatten them), found "


@pytest.mark.parametrize("token_ids, error, expected", [
    ([1, 2, 128, 4], ConfigError, "token_ids[2]: token id 128 is outside the vocabulary "
                                  "[0, 128); pass ids of the model's tokenizer"),
    ([1, -2, 3], ConfigError, "token_ids[1]: token id -2 is outside the vocabulary [0, 128); "
                              "pass ids of the model's tokenizer"),
    ([1, 10 ** 5000], ConfigError, "token_ids[1]: a token id, an integer of about 5,001 digits, "
                                   "is outside the vocabulary [0, 128); pass ids of the model's "
                                   "tokenizer"),
    ([1, 2.0, 3], ConfigError, "token_ids[1] must be an integer, found 2.0"),
    ([1, True, 3], ConfigError, "token_ids[1] must be an integer, found True"),
    ([1, np.True_, 3], ConfigError, "token_ids[1] must be an integer, found True"),
    ([1, np.float64(2.0)], ConfigError, "token_ids[1] must be an integer, found 2.0"),
    ([1, [2, 3]], ConfigError, FLAT + "a list at [1]"),
    ([[504, 2365], [3, 4]], ConfigError, FLAT + "a list at [0]"),
    ([(1, 2)], ConfigError, FLAT + "a tuple at [0]"),
    (np.array([1.0, 2.0, 3.0]), ConfigError, "token_ids[0] must be an integer, found 1.0"),
    (torch.tensor([True, False, True]), ConfigError,
     "token_ids[0] must be an integer, found True"),
    (np.array([[1, 2, 3]]), ConfigError, FLAT + "a 2-D array of shape (1, 3)"),
    (torch.ones(2, 3, dtype=torch.long), ConfigError, FLAT + "a 2-D tensor of shape (2, 3)"),
    # tensors whose values tolist() cannot read: torch's own error had escaped
    (torch.tensor([1, 2, 3], device="meta"), ConfigError,
     "token_ids: a meta tensor holds no values; pass a tensor that holds the ids (on the CPU or a "
     "GPU) or a list of ints"),
    ([1, torch.tensor(2, device="meta")], ConfigError,
     "token_ids[1]: a meta tensor holds no values; pass a tensor that holds the ids (on the CPU "
     "or a GPU) or a list of ints"),
    (torch.tensor([1, 2, 3]).to_sparse(), ConfigError,
     "token_ids: the values of a sparse_coo tensor cannot be read as a list; pass a dense one "
     "(.to_dense()) or a list of ints"),
    (torch.tensor([1, 2, 3], dtype=torch.complex64), ConfigError,
     "token_ids[0] must be an integer, found (1+0j)"),
    (np.array([1, 128, 3]), ConfigError, "token_ids[1]: token id 128 is outside the vocabulary "
                                         "[0, 128); pass ids of the model's tokenizer"),
    # a str had been scored as the text of its characters
    ("abc", ConfigError, "token_ids must be a list of int token ids, found str 'abc'"),
    # ids, not a text's tokens (it had said "the text is 0 tokens long")
    ([], DatasetError, "token_ids holds 0 ids; every id but the first is scored and perplexity "
                       "needs at least 2: give at least 3"),
    (np.array([1, 2]), DatasetError, "token_ids holds 2 ids; every id but the first is scored "
                                     "and perplexity needs at least 2: give at least 3"),
])
def test_token_ids_the_engine_cannot_take_are_refused_before_it_loads(
        gathering_engine, tmp_path, not_loaded, token_ids, error, expected):
    """A caller's token_ids outside the vocabulary had failed in the engine, once loaded, as
    "prompt #0: token ids [128] are outside the vocabulary" (a float as "a prompt must be a
    string")."""
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.")
    with pytest.raises(error) as info:
        evaluate(gathering_engine, text, token_ids=token_ids)
    assert str(info.value) == expected


def test_a_nested_tensor_is_refused_as_not_flat(gathering_engine, tmp_path, not_loaded):
    """Its shape cannot be read: torch's "NestedTensorImpl doesn't support sizes" had escaped."""
    with warnings.catch_warnings():  # (nested tensors are a prototype, torch warns)
        warnings.simplefilter("ignore")
        nested = torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])])
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.")
    with pytest.raises(ConfigError) as info:
        evaluate(gathering_engine, text, token_ids=nested)
    assert str(info.value) == FLAT + "a 2-D tensor"


@pytest.mark.parametrize("token_ids", [
    [1, 5, 9, 12], (1, 5, 9, 12), [np.int64(1), np.int32(5), np.uint8(9), torch.tensor(12)],
    np.array([1, 5, 9, 12]), torch.tensor([1, 5, 9, 12]),
])
def test_token_ids_are_integers_of_any_type(gathering_engine, tmp_path, caplog, token_ids):
    """A retest's np.int64(1) had been told it "must be an integer" and a 1-D numpy array "must
    be a list"; the warning had named the dataset's file, which was not scored."""
    text = tmp_path / "ds.txt"
    text.write_text("Some text to score.")
    expected = evaluate(gathering_engine, text, options=ON_CPU, token_ids=[1, 5, 9, 12])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kiln.evaluation"):
        result = evaluate(gathering_engine, text, options=ON_CPU, token_ids=token_ids)
    assert (result.tokens, result.perplexity) == (3, expected.perplexity)
    assert _warned(caplog) == ("token_ids: the perplexity rests on 3 tokens, too few to "
                                  "compare with another figure; give a longer text")


def test_kiln_evals_token_ids_are_its_datasets(gathering_engine, tmp_path, caplog):
    """kiln eval --model_dir passes the dataset's own tokens: its warning names the file."""
    text = tmp_path / "ds.txt"
    text.write_text("Some text to score.")
    with caplog.at_level(logging.WARNING, logger="kiln.evaluation"), options_as_flags():
        evaluate(gathering_engine, text, options=ON_CPU, token_ids=[1, 5, 9, 12])
    assert _warned(caplog).startswith(f"{text}: the perplexity rests on 3 tokens")


def _warned(caplog) -> str:
    """The one warning kiln.evaluation logged (the CPU's slow-path warning aside)."""
    [message] = [r.getMessage() for r in caplog.records if r.name == "kiln.evaluation"]
    return message


def test_engine_without_gather_context_logits_is_refused(tiny_engine_no_gather, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.")
    with pytest.raises(ConfigError) as info:
        evaluate(tiny_engine_no_gather, text)
    assert str(info.value).endswith(  # a retest: kiln build's flag, from Python
        "rebuild it with kiln.build(..., gather_context_logits=True)")
    with options_as_flags(), pytest.raises(ConfigError) as info:
        evaluate(tiny_engine_no_gather, text)
    assert str(info.value).endswith("rebuild it with kiln build --gather_context_logits")


@pytest.fixture
def tiny_engine_no_gather(tmp_path):
    from kiln.builder import build
    from tests.models import hf_model, kiln_checkpoint

    checkpoint = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    return build(checkpoint, tmp_path / "engine", backend="torch", max_seq_len=32).output_dir
