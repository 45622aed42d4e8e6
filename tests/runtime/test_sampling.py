"""Sampling: parameter validation, each filter and penalty in both implementations (torch on the
logits' device, numpy for CPU logits) and their agreement, seeded reproducibility, logprobs,
non-finite rows, and, on an emulated accelerator (meta tensors), that every tensor and generator
lives on the logits' device with one host read per step."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kiln.runtime import sampling
from kiln.runtime.errors import SamplingParamsError
from kiln.runtime.executor import GreedyHead
from kiln.runtime.sampling import (
    Generators,
    Row,
    SamplingParams,
    apply_penalties,
    filter_logits,
    filter_numpy,
    make_generator,
    penalties_numpy,
    sample,
    sample_rows,
    sample_rows_numpy,
    sample_rows_torch,
)
from tests.runtime.mocks import FakeDeviceGenerator, OnDevice


def _filter_numpy(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return torch.from_numpy(filter_numpy(logits.numpy(), params))


def _penalties_numpy(logits, params, prompt_ids, output_ids) -> torch.Tensor:
    return torch.from_numpy(penalties_numpy(logits.numpy(), params, prompt_ids, output_ids))


FILTERS = pytest.mark.parametrize("filt", [filter_logits, _filter_numpy], ids=["torch", "numpy"])
PENALTIES = pytest.mark.parametrize("penalize", [apply_penalties, _penalties_numpy],
                                    ids=["torch", "numpy"])
ROWS = pytest.mark.parametrize("rows_fn", [
    sample_rows_torch, lambda logits, rows: sample_rows_numpy(logits.numpy(), rows)],
    ids=["torch", "numpy"])


def _rows(params, n=1, seed=0, prompt=(), output=()):
    return [Row(i, params, list(prompt), list(output), Generators(seed + i).on)
            for i in range(n)]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("temperature", math.nan),
    ("top_k", -2), ("top_p", 0.0), ("top_p", 1.1), ("min_p", -0.01), ("min_p", 2),
    ("repetition_penalty", 0), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("seed", "x"), ("stop", ("",)), ("stop_token_ids", (-1,)), ("logprobs", 21),
    ("temperature", True), ("stop", ("caf\udce9",)), ("stop", ("ok", "\ud800")),
    ("stop", 5), ("stop_token_ids", 7),
])
def test_invalid_values_name_the_parameter(field, value):
    with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**{field: value})



def test_numpy_numbers_are_taken_as_python_s():
    """Retest 48: np.float32(0.9) for top_p was refused as "must be in (0, 1]", np.int64(5)
    for max_tokens as no integer. They are Python's numbers once taken; a bad one is still
    refused, and a float where an integer belongs too."""
    import numpy as np

    params = SamplingParams(top_p=np.float32(0.5), temperature=np.float16(0.25),
                            max_tokens=np.int64(5), seed=np.uint64(2**64 - 1),
                            top_k=np.int32(3), stop_token_ids=np.array([7, 8]))
    assert params == SamplingParams(top_p=0.5, temperature=0.25, max_tokens=5, seed=2**64 - 1,
                                    top_k=3, stop_token_ids=(7, 8))
    assert type(params.seed) is int and type(params.stop_token_ids[0]) is int
    for field, value in (("top_p", np.float32(1.5)), ("max_tokens", np.float32(2.0))):
        with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field} "):
            SamplingParams(**{field: value})


def test_a_refusal_carries_its_field_and_value_for_a_caller_to_show():
    """kiln serve shows the value as JSON spells it through worded(), not by editing the
    message's end; a Python caller reads Python's spelling."""
    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(top_p=math.nan)
    e = raised.value
    assert (e.field, e.name, math.isnan(e.value)) == ("top_p", "top_p", True)
    assert str(e) == "SamplingParams.top_p must be in (0, 1], found nan"
    assert e.worded(lambda v: "<v>") == "must be in (0, 1], found <v>"
    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(stop=["a", ""])
    assert (raised.value.field, raised.value.name) == ("stop[1]", "stop")
    assert raised.value.worded(lambda v: "<v>") == ("has an empty string at index 1; each stop "
                                                    "must be a non-empty string")
    for error in (e, raised.value):  # pickled as made (a process's error, sent back)
        copy = pickle.loads(pickle.dumps(error))
        assert (str(copy), copy.field) == (str(error), error.field)


def test_top_k_minus_1_is_off_as_vllm_s():
    """kiln serve took vLLM's -1 and `kiln run --top_k -1` refused it (a trial)."""
    assert SamplingParams(top_k=-1) == SamplingParams(top_k=0)


@pytest.mark.parametrize("field,value", [("temperature", math.inf), ("temperature", math.nan),
                                         ("repetition_penalty", math.inf)])
def test_non_finite_values_are_named_as_such(field, value):
    """inf is >= 0: the message says finite (a new user read 'must be >= 0, found inf')."""
    with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field} must be a finite "):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("value,shown", [
    (10 ** 5000, "found an integer of about 5,001 digits"),
    (-(10 ** 60), "found a negative integer of about 61 digits"),
    ("9" * 100, "found '9999999999999999999...9999999' (102 characters)"),
], ids=["5000-digit", "negative-61-digit", "100-character"])
def test_a_huge_value_is_shown_cut(value, shown):
    """A request's 5,000-digit seed had been echoed whole (and str() refuses such an int)."""
    field = "seed" if isinstance(value, int) else "top_p"
    with pytest.raises(SamplingParamsError) as raised:
        SamplingParams(**{field: value})
    assert str(raised.value).endswith(shown) and len(str(raised.value)) < 200


@pytest.mark.parametrize("stop,shown", [(["a", ""], "an empty string at index 1"),
                                        (["a", "b", 5], "5 at index 2")])
def test_a_bad_stop_entry_is_named_by_its_index(stop, shown):
    """The entry at fault, not the whole tuple (a request's ``"stop": [""]`` read "found
    ('',)", Python's form of a value the user sent as JSON)."""
    with pytest.raises(SamplingParamsError, match=rf"^SamplingParams\.stop has {shown}; each "
                                                  r"stop must be a non-empty string$"):
        SamplingParams(stop=stop)


def test_none_is_no_stop_strings_or_ids_as_vllm_s_default():
    """Ported vLLM code passes ``stop=None`` (its default); it had been refused."""
    assert SamplingParams(stop=None, stop_token_ids=None) == SamplingParams()


def test_single_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="###").stop == ("###",)


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    g = make_generator(0)
    state = g.get_state()
    token, _ = sample(logits, SamplingParams(temperature=0), [], [], g)
    assert token == 1
    assert torch.equal(g.get_state(), state)


@FILTERS
def test_top_k_keeps_only_k_tokens(filt):
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    kept = torch.isfinite(filt(logits, SamplingParams(top_k=2)))
    assert kept.tolist() == [True, True, False, False, False]


@FILTERS
def test_top_p_keeps_the_smallest_prefix_reaching_p(filt):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(filt(logits, SamplingParams(top_p=0.7))).tolist() == \
        [True, True, False, False]
    assert torch.isfinite(filt(logits, SamplingParams(top_p=0.85))).tolist() == \
        [True, True, True, False]
    assert torch.isfinite(filt(logits, SamplingParams(top_p=0.1))).tolist() == \
        [True, False, False, False]


@FILTERS
def test_min_p_drops_tokens_below_a_fraction_of_the_best(filt):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = torch.isfinite(filt(logits, SamplingParams(min_p=0.5)))
    assert kept.tolist() == [True, True, False, False]


@FILTERS
def test_temperature_sharpens_the_distribution(filt):
    logits = torch.tensor([1.0, 0.0])
    hot = torch.softmax(filt(logits, SamplingParams(temperature=2.0)), -1)
    cold = torch.softmax(filt(logits, SamplingParams(temperature=0.5)), -1)
    assert cold[0] > torch.softmax(logits, -1)[0] > hot[0]


@PENALTIES
def test_repetition_penalty_divides_positive_and_multiplies_negative(penalize):
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    out = penalize(logits, SamplingParams(repetition_penalty=2.0), [0], [1])
    assert out.tolist() == [1.0, -4.0, 1.0, 1.0]


@PENALTIES
def test_presence_and_frequency_penalties_count_output_tokens_only(penalize):
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = penalize(logits, params, prompt_ids=[3], output_ids=[1, 1, 2])
    assert out.tolist() == [0.0, -1.0, -0.75, 0.0]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def draw(seed):
        g = make_generator(seed)
        return [sample(logits, params, [], [], g)[0] for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([0.75, 0.25]).log()
    g = make_generator(0)
    draws = [sample(logits, SamplingParams(), [], [], g)[0] for _ in range(4000)]
    assert abs(draws.count(0) / 4000 - 0.75) < 0.03


def test_logprobs_are_raw_model_logprobs_with_top_n():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=0, logprobs=2, repetition_penalty=5.0)
    token, lp = sample(logits, params, [0], [], make_generator(0))
    raw = torch.log_softmax(logits, -1)
    assert lp.token_id == token
    assert lp.logprob == pytest.approx(float(raw[token]))
    assert list(lp.top) == [0, 1]
    assert lp.top[0] == pytest.approx(float(raw[0]))


@pytest.fixture(scope="module")
def hf_processors():
    """HF generate's own logits processors for a GenerationConfig (the reference: its order and
    rules), from a tiny model (``_get_logits_processor`` is a method of the model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1))

    def processors(generation_config, prompt_ids):
        return model._get_logits_processor(generation_config=generation_config,
                                           input_ids_seq_length=len(prompt_ids), device="cpu")
    return processors


def _hf_reads(processors, logits, ids) -> torch.Tensor:
    return processors(torch.tensor([list(ids)], dtype=torch.long), logits[None].clone())[0]


def _same_distribution(kiln_logits: torch.Tensor, hf_logits: torch.Tensor) -> None:
    """The same tokens kept (finite) and the same probabilities to float32 rounding."""
    kept = torch.isfinite(hf_logits)
    assert torch.equal(torch.isfinite(kiln_logits), kept), \
        f"{int((torch.isfinite(kiln_logits) != kept).sum())} tokens kept by one side only"
    torch.testing.assert_close(torch.softmax(kiln_logits, -1), torch.softmax(hf_logits, -1),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")  # (HF, about an empty prompt)
@pytest.mark.parametrize("case", range(300))
def test_penalties_and_filters_keep_what_hf_generate_keeps(case, hf_processors):
    """Against HF's processors (transformers' RepetitionPenalty, Temperature, TopK, TopP and
    MinP in the order generate() builds them): random logits of three spreads, prompts and
    outputs, every combination of the parameters both have."""
    import random

    from transformers import GenerationConfig

    rng = random.Random(case)
    params = SamplingParams(temperature=rng.choice([0.3, 0.7, 1.0, 1.6]),
                            top_k=rng.choice([0, 1, 5, 40, 255]),
                            top_p=rng.choice([1.0, 0.95, 0.8, 0.3, 0.05]),
                            min_p=rng.choice([0.0, 0.02, 0.2]),
                            repetition_penalty=rng.choice([1.0, 1.2, 0.8]))
    logits = torch.randn(256, generator=torch.Generator().manual_seed(case)) \
        * rng.choice([0.5, 3.0, 10.0])
    prompt = [rng.randrange(256) for _ in range(rng.randrange(1, 20))]
    output = [rng.randrange(256) for _ in range(rng.randrange(0, 10))]
    config = GenerationConfig(do_sample=True, temperature=params.temperature, top_k=params.top_k,
                              top_p=params.top_p, min_p=params.min_p or None,
                              repetition_penalty=params.repetition_penalty)
    want = _hf_reads(hf_processors(config, prompt), logits, prompt + output)
    assert torch.isfinite(want).sum() >= 1
    _same_distribution(filter_logits(apply_penalties(logits, params, prompt, output), params),
                       want)
    _same_distribution(_filter_numpy(_penalties_numpy(logits, params, prompt, output), params),
                       want)


@pytest.mark.parametrize("file", [
    {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20},
    {"do_sample": True, "top_k": 0, "min_p": 0.1, "repetition_penalty": 1.1},
    {"do_sample": True, "temperature": 1.3, "top_k": 7, "repetition_penalty": 0.9},
])
def test_a_generation_config_samples_as_hf_generate_reads_it(file, hf_processors):
    """A model's generation_config.json, read by kiln and by HF generate (its own merge of the
    file with its defaults), gives the same distribution."""
    from transformers import GenerationConfig

    from kiln.runtime.params import SamplingParams as Params

    params = Params.from_generation_config(file)
    hf_config = GenerationConfig(**{**GenerationConfig._get_default_generation_params(), **file})
    prompt, output = [3, 17, 17, 200], [5, 3]
    logits = torch.randn(256, generator=torch.Generator().manual_seed(1)) * 3
    _same_distribution(filter_logits(apply_penalties(logits, params, prompt, output), params),
                       _hf_reads(hf_processors(hf_config, prompt), logits, prompt + output))


def test_a_sampling_config_without_top_k_has_none_as_vllm_reads_it(hf_processors):
    """HF generate fills a top_k the file leaves out with its default, 50; kiln (as vLLM) takes
    the fields the file sets (the documented difference)."""
    from transformers import GenerationConfig

    file = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    assert SamplingParams.from_generation_config(file).top_k == 0
    merged = GenerationConfig(**{**GenerationConfig._get_default_generation_params(), **file})
    assert merged.top_k == 50


@pytest.mark.parametrize("file,skipped", [
    ({"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "min_p": 0.1,
      "repetition_penalty": 1.1, "max_new_tokens": 9, "max_length": 4096, "eos_token_id": 2,
      "num_beams": 1, "typical_p": 1.0, "no_repeat_ngram_size": 0, "suppress_tokens": None,
      "bad_words_ids": [], "guidance_scale": 1.0, "min_length": 0}, {}),
    ({"no_repeat_ngram_size": 3, "num_beams": 4, "min_new_tokens": 2, "typical_p": 0.5},
     {"no_repeat_ngram_size": 3, "num_beams": 4, "min_new_tokens": 2}),  # greedy: no warpers
    ({"do_sample": True, "typical_p": 0.5, "eta_cutoff": 3e-4, "suppress_tokens": [5]},
     {"typical_p": 0.5, "eta_cutoff": 3e-4, "suppress_tokens": [5]}),
])
def test_not_applied_names_what_hf_generate_would_apply_and_kiln_does_not(file, skipped):
    from kiln.runtime.params import not_applied

    assert not_applied(file) == skipped


@pytest.mark.parametrize("penalty", [1e300, 1e-300, 5e-324])
def test_a_repetition_penalty_past_float32_penalizes_without_overflow(penalty):
    """A retest's --repetition_penalty 1e300 printed numpy's overflow warnings; a zero logit
    times a penalty cast to float32's inf would be NaN."""
    import warnings

    logits = torch.tensor([0.0, 2.0, -3.0, 1.0])
    params = SamplingParams(temperature=0, repetition_penalty=penalty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [apply_penalties(logits, params, [0, 1, 2], []),
               _penalties_numpy(logits, params, [0, 1, 2], [])]
    for penalized in got:
        assert penalized[0] == 0 and penalized[3] == 1 and torch.isfinite(penalized).all()
        assert (penalized[1] < 1e-29, penalized[2] < -1e30) if penalty > 1 else \
            (penalized[1] > 1e30, -1e-29 < penalized[2] < 0)


def test_a_generation_config_without_do_sample_keeps_its_filters_for_a_temperature_asked():
    """As HF's update(do_sample=True) and vLLM: the file's top_k/top_p/min_p apply once a
    request samples (they had been dropped whenever do_sample was off)."""
    file = {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05}
    default = SamplingParams.from_generation_config(file)
    assert default.greedy
    asked = SamplingParams.from_generation_config(file, temperature=0.8)
    assert (asked.temperature, asked.top_k, asked.top_p, asked.min_p) == (0.8, 20, 0.9, 0.05)


@pytest.mark.parametrize("value", ["false", "no", 1, 0])
def test_a_do_sample_that_is_no_boolean_is_refused(value):
    with pytest.raises(SamplingParamsError, match="do_sample must be true or false"):
        SamplingParams.from_generation_config({"do_sample": value})


def test_from_generation_config():
    assert SamplingParams.from_generation_config({"eos_token_id": 2}).greedy
    p = SamplingParams.from_generation_config(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 9}, seed=3)
    assert (p.temperature, p.top_p, p.max_tokens, p.seed) == (0.6, 0.9, 9, 3)


@pytest.mark.parametrize("kwargs,plain", [
    ({"temperature": 0}, True),
    ({"temperature": 0, "repetition_penalty": 1.2}, False),
    ({"temperature": 0, "presence_penalty": 0.5}, False),
    ({"temperature": 0, "logprobs": 2}, False),
    ({"temperature": 0.7}, False),
])
def test_plain_greedy_rows_share_one_argmax_only_when_nothing_else_applies(kwargs, plain):
    from kiln.runtime.sampling import is_plain_greedy

    assert is_plain_greedy(SamplingParams(**kwargs)) is plain


# -- the two implementations agree ---------------------------------------------------------
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=40),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.0, top_p=0.3, min_p=0.02),
    SamplingParams(temperature=0.6, top_k=100, top_p=0.95, min_p=0.1),
], ids=repr)
def test_numpy_and_torch_filters_keep_the_same_tokens_with_the_same_probabilities(params):
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        logits = torch.randn(3000, generator=g) * 4
        want, got = filter_logits(logits, params), _filter_numpy(logits, params)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(want, -1))


def test_numpy_and_torch_penalties_agree():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(500, generator=g) * 3
    prompt = torch.randint(0, 500, (40,), generator=g).tolist()
    output = torch.randint(0, 500, (30,), generator=g).tolist()
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3)
    want = apply_penalties(logits, params, prompt, output)
    torch.testing.assert_close(_penalties_numpy(logits, params, prompt, output), want)
    assert not torch.equal(want, logits)


def test_numpy_and_torch_rows_pick_the_same_greedy_tokens_and_logprobs():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 300, generator=g) * 3
    greedy = SamplingParams(temperature=0)
    rows = [Row(0, greedy, [1], [2], None), Row(1, greedy.replace(repetition_penalty=3.0),
                                                  [int(logits[1].argmax())], [], None),
            Row(2, greedy.replace(logprobs=3, presence_penalty=2.0), [],
                [int(logits[2].argmax())], None), Row(3, greedy.replace(logprobs=0), [], [], None)]
    want = sample_rows_torch(logits, rows)
    got = sample_rows_numpy(logits.numpy(), rows)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert got[1][0] != int(logits[1].argmax()) and got[2][0] != int(logits[2].argmax())
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert list(a.top) == list(b.top)
            assert list(a.top.values()) == pytest.approx(list(b.top.values()), abs=1e-5)


# -- rows: reproducible, distributed as asked, non-finite rows refused ---------------------
@ROWS
def test_a_seeded_row_gives_the_same_tokens_alone_or_in_a_batch(rows_fn):
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.2)
    others = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=0),
              SamplingParams(temperature=2.0, min_p=0.01)]

    def draws(seed, batched):
        mine, theirs = Generators(seed), [Generators(100 + i) for i in range(3)]
        out = []
        for _ in range(12):
            if batched:  # this request is row 2 of 4, between others
                rows = [Row(i, p, [1, 2], [], g.on) for i, (p, g) in enumerate(
                    zip(others, theirs, strict=True))]
                rows.insert(2, Row(3, params, [1, 2], out[:], mine.on))
                out.append(rows_fn(logits, rows)[2][0])
            else:
                out.append(rows_fn(logits[3:], [Row(0, params, [1, 2], out[:], mine.on)])[0][0])
        return out

    alone = draws(7, batched=False)
    assert draws(7, batched=True) == alone
    assert draws(8, batched=False) != alone
    assert len(set(alone)) > 1


@ROWS
def test_rows_sample_from_the_distribution_and_the_filters(rows_fn):
    n = 4000
    logits = torch.tensor([0.75, 0.25]).log().expand(n, 2)
    picks = rows_fn(logits, _rows(SamplingParams(), n))
    assert abs([t for t, _ in picks].count(0) / n - 0.75) < 0.03
    wide = torch.randn(64, 500, generator=torch.Generator().manual_seed(2))
    best = wide.argmax(-1).tolist()
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(
            temperature=5.0, min_p=1.0)):
        assert [t for t, _ in rows_fn(wide, _rows(params, 64))] == best
    top5 = wide.topk(5).indices
    picks = [t for t, _ in rows_fn(wide, _rows(SamplingParams(temperature=3.0, top_k=5), 64))]
    assert all(t in top5[i].tolist() for i, t in enumerate(picks))
    assert len(set(picks) - set(best)) > 0  # not just the argmax


@ROWS
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0),
                                    SamplingParams(temperature=0.8, top_p=0.9),
                                    SamplingParams(temperature=0, logprobs=2,
                                                   repetition_penalty=1.5)],
                         ids=["plain-greedy", "sampled", "greedy-logprobs-penalty"])
def test_a_row_with_non_finite_logits_gets_no_token_and_the_others_do(rows_fn, bad, params):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    logits[1, 7] = bad
    rows = [Row(0, SamplingParams(temperature=0), [], [], None),
            Row(1, params, [1], [2], Generators(0).on),
            Row(2, SamplingParams(temperature=0.8, logprobs=1), [], [], Generators(1).on)]
    picks = rows_fn(logits, rows)
    assert picks[1] is None
    assert picks[0] == (int(logits[0].argmax()), None)
    assert 0 <= picks[2][0] < 50 and picks[2][1].token_id == picks[2][0]


class _Done:
    """A completed event (a CPU stand-in for the CUDA event of a step's greedy head)."""

    def __init__(self):
        self.waits = 0

    def synchronize(self):
        self.waits += 1


def test_a_steps_own_greedy_pass_gives_what_the_sampler_computes_itself():
    """A CUDA-graph decode step hands the sampler its greedy head (flags and argmax of every
    row, padding rows included) and its logits in the model's dtype: the same picks, logprobs
    and ids as the sampler's own pass over float32 logits, rows that draw included."""
    logits = (torch.randn(6, 300, generator=torch.Generator().manual_seed(7)) * 3).bfloat16()
    logits[2, 11] = math.nan
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9),
              SamplingParams(temperature=0.7, logprobs=2), SamplingParams(temperature=0),
              SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=1)]

    def rows():
        return [Row(i, p, [1, 2], [3], Generators(10 + i).on) for i, p in enumerate(params)]

    want = sampling.launch_rows_torch(logits[:5].float(), rows())
    packed, ids = sampling.finite_argmax(logits)  # a graph of 6 rows, 5 of them the step's
    done = _Done()
    head = GreedyHead(packed, done, ids.clone())
    got = sampling.launch_rows_torch(logits[:5], rows(), head)
    assert got.collect() == want.collect()
    assert done.waits == 1 and got.ids is head.ids  # drawn tokens written into it in place
    assert got.ids[:5].tolist() == want.ids.tolist()
    assert got.collect()[2] is None and got.collect()[0][0] == int(logits[0].float().argmax())


def test_sample_refuses_non_finite_logits_and_a_generator_on_another_device():
    with pytest.raises(ValueError, match="not finite"):
        sample(torch.tensor([0.0, math.nan]), SamplingParams(), [], [], make_generator(0))
    with pytest.raises(ValueError, match="generator is on meta but the logits are on cpu"):
        sample(torch.zeros(4), SamplingParams(), [], [], FakeDeviceGenerator("meta"))


def test_generators_are_made_per_device_on_first_use_from_the_request_seed(monkeypatch):
    made = []

    def fake(seed, device):
        made.append((seed, torch.device(device)))
        return FakeDeviceGenerator(device, seed)

    monkeypatch.setattr(sampling, "make_generator", fake)
    generators = Generators(11)
    assert generators.on("meta") is generators.on(torch.device("meta"))
    generators.on("cpu")
    assert made == [(11, torch.device("meta")), (11, torch.device("cpu"))]
    assert Generators(None).seed != Generators(None).seed  # unseeded: from OS entropy


def test_greedy_rows_never_ask_for_a_generator():
    def refuse(device):
        raise AssertionError("a greedy row asked for a generator")

    logits = torch.randn(2, 10)
    rows = [Row(0, SamplingParams(temperature=0), [], [], refuse),
            Row(1, SamplingParams(temperature=0, repetition_penalty=2.0), [3], [], refuse)]
    assert sample_rows(logits, rows) == sample_rows_torch(logits, rows)


# -- on an accelerator (emulated with meta tensors) ----------------------------------------
EVERY_FEATURE = [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.5),
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=0.9, top_p=0.8, logprobs=3),
]


@pytest.mark.parametrize("params", EVERY_FEATURE, ids=repr)
def test_on_an_accelerator_a_row_stays_on_the_device_and_reads_the_host_once(params):
    with OnDevice() as device:
        sample(torch.zeros(64, device="meta"), params, [1, 2, 3, 2], [5, 5, 9],
               FakeDeviceGenerator("meta"))
    assert len(device.reads) == 1, device.reads


def test_on_an_accelerator_a_whole_step_reads_the_host_once():
    rows = [Row(i, p, [1, 2, 3], [4, 4], lambda d: FakeDeviceGenerator(d))
            for i, p in enumerate([*EVERY_FEATURE, SamplingParams(temperature=0)])]
    with OnDevice() as device:
        picks = sample_rows(torch.zeros(len(rows), 64, device="meta"), rows)
    assert device.reads == ["tolist"]
    assert len(picks) == len(rows) and all(p is not None for p in picks)


def test_the_emulated_accelerator_catches_what_breaks_on_a_gpu():
    """OnDevice itself: the two bugs a CUDA GPU hit (a CPU generator, CPU index tensors)."""
    logits = torch.zeros(8, device="meta")
    with pytest.raises(AssertionError, match="generator on cpu"), OnDevice():
        torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator())
    with pytest.raises(AssertionError, match=r"tensor \(2,\) on cpu"), OnDevice():
        logits[torch.tensor([1, 2])] -= 1.0


class _TorchCalls(TorchFunctionMode):
    """Names of the torch calls that compute on a tensor of more than one element."""

    VIEWS = {"__get__", "__getitem__", "numpy"}  # metadata and views: no compute

    def __init__(self):
        super().__init__()
        self.computed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        if name not in self.VIEWS and any(t.numel() > 1 for t in tensors):
            self.computed.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("params", EVERY_FEATURE, ids=repr)
def test_cpu_sampling_runs_no_torch_op_on_the_vocabulary(params):
    """CPU rows run in numpy: a vocabulary-sized torch op would wake torch's thread pool, whose
    spinning workers steal the executor's cores (ONNX Runtime's) on small machines."""
    logits = torch.randn(49152)
    with _TorchCalls() as calls:
        sample(logits, params, [1, 2, 3], [4, 4], make_generator(0))
    assert calls.computed == []


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**20, 2**70])
def test_a_seed_out_of_the_generators_64_bit_range_is_refused_up_front(seed):
    with pytest.raises(SamplingParamsError, match=r"SamplingParams\.seed must be an integer in "
                                                  r"\[-9223372036854775808, "
                                                  r"18446744073709551615\], found " + str(seed)):
        SamplingParams(seed=seed)


@pytest.mark.parametrize("seed", [-2**63, -1, 0, 2**64 - 1])
def test_every_seed_in_range_seeds_a_generator(seed):
    assert Generators(SamplingParams(seed=seed).seed).on("cpu").initial_seed() == seed % 2**64


def _draws(seed: int) -> list[int]:
    """Eight tokens of a request seeded ``seed``, sampled at temperature 1 from flat logits."""
    generators, params = Generators(seed), SamplingParams(temperature=1.0, seed=seed)
    return [sample(torch.zeros(1000), params, [], [], generators.on("cpu"))[0]
            for _ in range(8)]


@pytest.mark.parametrize("a, b", [(0, 2**63), (0, 2**32), (-1, 2**63 - 1), (2**32 - 1, -1),
                                  (2**63 - 1, 2**64 - 1), (5, 5 + 2**40)])
def test_distinct_seeds_give_distinct_samples(a, b):
    """A trial's seeds 0 and 2**63 gave the same samples, and -1, 2**63 - 1 and 2**64 - 1 too:
    torch's CPU generator seeds from the low 32 bits only."""
    assert _draws(a) != _draws(b)
    assert _draws(a) == _draws(a) and _draws(b) == _draws(b)


@pytest.mark.parametrize("seed", [-1, -2**63, -12345])
def test_a_negative_seed_is_its_twos_complement(seed):
    """As torch reads it (documented): -1 is 2**64 - 1."""
    assert _draws(seed) == _draws(seed + 2**64)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1])
def test_a_seed_below_2_32_draws_as_before(seed):
    """torch's own seeding, so a 32-bit seed's samples are those of earlier kilns."""
    reference = torch.Generator().manual_seed(seed)
    assert torch.equal(make_generator(seed).get_state(), reference.get_state())


@pytest.mark.parametrize("seed", [2**32, 2**63, 2**64 - 1, 0x1234_5678_9ABC_DEF0])
def test_a_64_bit_seed_sets_mt19937_as_init_by_array_of_its_halves(seed):
    """The words kiln writes into torch's CPU state are the reference MT19937's seeding from
    the key (low half, high half), as numpy's legacy RandomState makes them; the seed is kept."""
    import numpy as np

    generator = make_generator(seed)
    state = generator.get_state().numpy()
    key = np.array([seed % 2**32, seed >> 32], dtype=np.int64)
    want = np.random.RandomState(key).get_state()[1]
    assert (state[24:24 + 8 * 624].view(np.uint64) == want).all()
    assert generator.initial_seed() == seed
    # and torch draws from them as numpy's generator does (its outputs, less the top bit)
    rs = np.random.RandomState(key)
    assert torch.empty(3, dtype=torch.int32).random_(generator=generator).tolist() == \
        [int(rs.randint(0, 2**32, dtype=np.uint32)) % 2**31 for _ in range(3)]


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 9.9e-6])
def test_a_temperature_below_1e_5_is_greedy(temperature):
    """Float32 logits divided by less overflow to inf and the draw read NaN: a trial's server
    sampled token id == vocab and its engine failed for good (vLLM's rule: greedy)."""
    params = SamplingParams(temperature=temperature, seed=3)
    assert params.greedy and not SamplingParams(temperature=1e-5).greedy
    logits = torch.randn(1000) * 5
    want = int(logits.argmax())
    assert sample(logits, params, [], [], make_generator(3))[0] == want
    rows = [Row(0, params.replace(logprobs=1), [], [], lambda device: make_generator(3))]
    assert sample_rows_numpy(logits[None].numpy(), rows)[0][0] == want


@pytest.mark.parametrize("temperature", [1e-5, 1.0, 1e30, 1e308])
def test_every_finite_temperature_draws_a_token_of_the_vocabulary(temperature):
    import warnings

    logits = torch.randn(1000) * 5
    rows = [Row(0, SamplingParams(temperature=temperature), [], [],
                lambda device: make_generator(3))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warnings went to the server log
        picks = [sample_rows_numpy(logits[None].numpy(), rows)[0][0],
                 sample_rows_torch(logits[None], rows)[0][0]]
    assert all(0 <= p < 1000 for p in picks)
    if temperature == 1e-5:
        assert picks == [int(logits.argmax())] * 2
