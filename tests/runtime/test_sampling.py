"""Sampling: parameter validation, each filter and penalty, seeded reproducibility, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.runtime.errors import SamplingParamsError
from kiln.runtime.sampling import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    make_generator,
    sample,
)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("temperature", math.nan),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.1), ("min_p", -0.01), ("min_p", 2),
    ("repetition_penalty", 0), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("seed", "x"), ("stop", ("",)), ("stop_token_ids", (-1,)), ("logprobs", 21),
    ("temperature", True),
])
def test_invalid_values_name_the_parameter(field, value):
    with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**{field: value})


def test_single_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="###").stop == ("###",)


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    g = make_generator(0)
    state = g.get_state()
    token, _ = sample(logits, SamplingParams(temperature=0), [], [], g)
    assert token == 1
    assert torch.equal(g.get_state(), state)


def test_top_k_keeps_only_k_tokens():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_k=2)))
    assert kept.tolist() == [True, True, False, False, False]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.7))).tolist() == \
        [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.85))).tolist() == \
        [True, True, True, False]
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.1))).tolist() == \
        [True, False, False, False]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = torch.isfinite(filter_logits(logits, SamplingParams(min_p=0.5)))
    assert kept.tolist() == [True, True, False, False]


def test_temperature_sharpens_the_distribution():
    logits = torch.tensor([1.0, 0.0])
    hot = torch.softmax(filter_logits(logits, SamplingParams(temperature=2.0)), -1)
    cold = torch.softmax(filter_logits(logits, SamplingParams(temperature=0.5)), -1)
    assert cold[0] > torch.softmax(logits, -1)[0] > hot[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), [0], [1])
    assert out.tolist() == [1.0, -4.0, 1.0, 1.0]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, prompt_ids=[3], output_ids=[1, 1, 2])
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
