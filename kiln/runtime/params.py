"""Sampling parameters and per-token log-probabilities: plain validated data, no torch.

Kept apart from :mod:`kiln.runtime.sampling` (which implements them on torch and numpy) so that
``kiln run --help`` builds its sampling flags from these fields without importing torch.
:class:`SamplingParams` is frozen and validated on construction; a bad value raises
:class:`~kiln.runtime.errors.SamplingParamsError` naming the parameter.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from kiln.errors import shown
from kiln.runtime.errors import NO_VALUE, SamplingParamsError

# torch.Generator.manual_seed takes a 64-bit seed, signed or unsigned (a negative one is read as
# its two's complement: -1 is 2**64 - 1); the numpy path draws from the same CPU torch.Generator,
# which kiln seeds from all 64 bits (kiln.runtime.sampling.make_generator: torch's own seeding
# of it reads 32), so distinct seeds modulo 2**64 give distinct streams on every device.
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): float32 logits divided by a
# smaller one overflow to inf, and the draw would read NaN. At 1e-5 a logit lead of 0.001
# already makes the rest e^-100 less likely.
GREEDY_BELOW = 1e-5


def _f(default: Any, help: str) -> Any:
    """A field with its CLI help (``kiln run`` builds its sampling flags from these)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop (the rules: kiln.runtime.sampling)."""

    max_tokens: int = _f(64, "New tokens at most (max_seq_len may end a request first: length); "
                             "0 only with prompt_logprobs (score the prompt, generate nothing).")
    temperature: float = _f(1.0, "Softmax temperature; 0 = greedy, as is anything below 1e-5 "
                                 "(vLLM's rule: logits divided by less overflow float32).")
    top_k: int = _f(0, "Sample from the k most likely tokens; 0 (or -1, vLLM's) = all.")
    top_p: float = _f(1.0, "Sample from the smallest set of tokens whose mass reaches top_p.")
    min_p: float = _f(0.0, "Drop tokens less likely than min_p * p(most likely token).")
    repetition_penalty: float = _f(1.0, "HF repetition penalty on prompt and output tokens "
                                        "(> 1 discourages repeats; 1 = off).")
    presence_penalty: float = _f(0.0, "Subtracted from the logit of every token already "
                                      "generated, in [-2, 2].")
    frequency_penalty: float = _f(0.0, "Subtracted once per earlier occurrence of a generated "
                                       "token, in [-2, 2].")
    seed: int | None = _f(None, "Seed of this request's generator, in [-2**63, 2**64 - 1]; a "
                                "negative one is its two's complement (-1 is 2**64 - 1) "
                                "(None: random).")
    stop: tuple[str, ...] = _f((), "Stop strings; text ends before them (matched across "
                                   "tokens).")
    stop_token_ids: tuple[int, ...] = _f((), "Token ids that end generation (besides EOS).")
    ignore_eos: bool = _f(False, "Keep generating after the model's EOS tokens.")
    logprobs: int | None = _f(None, "Return the raw logprob of each token and of the top n "
                                    "(0-20).")
    prompt_logprobs: int | None = _f(None, "Return each prompt token's logprob and the top n "
                                           "(0-20); the first token has none. Needs an engine "
                                           "built with --gather_context_logits.")
    include_stop_str_in_output: bool = _f(False, "Keep the matched stop string in the text.")
    skip_special_tokens: bool = _f(True, "Leave special tokens out of the text.")

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy's numbers as Python's (np.float32(0.9) had been refused
            value = getattr(self, f.name)  # as out of range: the checks take int and float)
            if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)):
                if isinstance(value, numbers.Integral):
                    object.__setattr__(self, f.name, int(value))
                elif isinstance(value, numbers.Real):
                    object.__setattr__(self, f.name, float(value))
        for name in ("stop", "stop_token_ids"):  # None: none, as vLLM's default (ported code
            if getattr(self, name) is None:  # passing stop=None had been refused)
                object.__setattr__(self, name, ())
        _check(self.stop != "" if isinstance(self.stop, str) else True, "stop",
               "is an empty string; give the text to stop at, or leave stop out")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        _check(isinstance(self.stop, Iterable), "stop", "must be a string or a list of strings",
               self.stop)
        _check(isinstance(self.stop_token_ids, Iterable), "stop_token_ids",
               "must be a list of token ids", self.stop_token_ids)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(  # (a numpy array's ids too)
            int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t
            for t in self.stop_token_ids))
        _check(_is_int(self.max_tokens) and self.max_tokens >= 0, "max_tokens",
               "must be an integer >= 1 (0 only with prompt_logprobs)", self.max_tokens)
        _check(self.max_tokens != 0 or self.prompt_logprobs is not None, "max_tokens",
               "is 0, which only scores a prompt: also set prompt_logprobs (0-20), or ask "
               "for max_tokens >= 1")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature",
               "must be a finite number >= 0 (0 = greedy)", self.temperature)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k",
               "must be an integer >= 1, or 0 or -1 (off)", self.top_k)
        if self.top_k == -1:  # vLLM's "off", as kiln serve takes it
            object.__setattr__(self, "top_k", 0)
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]",
               self.top_p)
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]",
               self.min_p)
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", "must be a finite number > 0 (1 = off)",
               self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, "must be in [-2, 2]", value)
        _check(self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
               "seed", f"must be an integer in [{SEED_MIN}, {SEED_MAX}]", self.seed)
        for i, stop in enumerate(self.stop):  # the entry, not the tuple (a request's [""]
            # had been shown as ('',)); the field names it, as kiln serve's param does
            if not (isinstance(stop, str) and stop != ""):
                raise SamplingParamsError(
                    f"stop[{i}]", f"has {'an empty string' if stop == '' else shown(stop)} at "
                                  f"index {i}; each stop must be a non-empty string")
        _check(all(is_utf8(s) for s in self.stop), "stop",
               f"must be UTF-8 text, found {shown(self.stop)} (a lone surrogate: bytes that are "
               "not UTF-8, e.g. from a shell in another locale)")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               f"must be token ids (integers >= 0), found "
               f"{', '.join(map(repr, self.stop_token_ids))}")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
               "logprobs", "must be None or an integer in [0, 20]", self.logprobs)
        _check(self.prompt_logprobs is None or
               (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
               "prompt_logprobs", "must be None or an integer in [0, 20]", self.prompt_logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any],
                               **overrides: Any) -> SamplingParams:
        """Defaults from an HF ``generation_config.json`` (do_sample off -> greedy), then overrides.

        Only the fields the file sets, as vLLM reads it: HF generate also fills what it leaves
        out from its own defaults, which for a sampling config means top_k 50 (here: no top-k).
        top_k, top_p and min_p are read with do_sample off too (as vLLM and HF's own
        ``update(do_sample=True)`` do), for a request that then asks for a temperature; the
        file's temperature only with it on. What HF would apply and kiln does not:
        :func:`not_applied`."""
        gc = generation_config
        sampling = gc.get("do_sample")
        if not (sampling is None or isinstance(sampling, bool)):  # ("false" is truthy to HF)
            raise SamplingParamsError("do_sample", "must be true or false", sampling)
        fields: dict[str, Any] = {key: gc[key] for key in ("top_k", "top_p", "min_p")
                                  if gc.get(key) is not None}
        if not sampling:
            fields["temperature"] = 0.0
        elif gc.get("temperature") is not None:
            fields["temperature"] = gc["temperature"]
        if gc.get("repetition_penalty") is not None:
            fields["repetition_penalty"] = gc["repetition_penalty"]
        if gc.get("max_new_tokens") is not None:
            fields["max_tokens"] = gc["max_new_tokens"]
        return cls(**{**fields, **overrides})


# generation_config.json fields with which HF generate picks other tokens and that kiln does not
# apply, each with the values that leave it off (HF's defaults; None and [] always do). The
# warpers' fields count only where do_sample is on.
_NOT_APPLIED = {"num_beams": (1,), "no_repeat_ngram_size": (0,), "min_length": (0,),
                "min_new_tokens": (0,), "bad_words_ids": (), "sequence_bias": (),
                "suppress_tokens": (), "begin_suppress_tokens": (),
                "exponential_decay_length_penalty": (), "guidance_scale": (1,),
                "watermarking_config": ()}
_NOT_APPLIED_WHEN_SAMPLING = {"typical_p": (1,), "epsilon_cutoff": (0,), "eta_cutoff": (0,),
                              "top_h": ()}


def not_applied(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The fields of an HF ``generation_config.json`` that change HF generate's tokens and that
    kiln's sampling does not apply (beam search, n-gram blocking, typical and eta sampling,
    suppressed or biased tokens, a minimum length...), by name, in the file's order."""
    fields = {**_NOT_APPLIED, **(_NOT_APPLIED_WHEN_SAMPLING
                                 if generation_config.get("do_sample") else {})}
    return {key: value for key, value in generation_config.items()
            if key in fields and value not in (None, [], {}) and value not in fields[key]}


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's raw logprob and the ``n`` most likely tokens' (id -> logprob): a sampled token
    (``logprobs``) or a prompt token (``prompt_logprobs``, from the logits before it)."""

    token_id: int
    logprob: float
    top: dict[int, float]


def check_seed(value: Any, error: type[Exception]) -> None:
    """``value`` is a seed as :attr:`SamplingParams.seed` takes one, an integer in [SEED_MIN,
    SEED_MAX]: kiln bench's and bench_serve's seed of prompts and arrivals, named ``seed``."""
    if not (_is_int(value) and SEED_MIN <= value <= SEED_MAX):
        raise error(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], found {shown(value)}")


def seeded_random(seed: int, stream: int = 0) -> random.Random:
    """Python's random of ``seed`` read modulo 2**64 as the sampling generators read it (-1 is
    2**64 - 1; ``random.Random`` itself reads a negative seed as its absolute value, -1 as 1),
    ``stream`` added for another draw of the same seed (the arrivals beside the prompts)."""
    return random.Random(seed % 2**64 + stream)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_utf8(text: str) -> bool:
    """False for a str with lone surrogates (undecodable argument bytes, a JSON "\\udXXX"
    escape): the tokenizer cannot encode it, so a stop string could never match."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_num(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _check(ok: bool, name: str, problem: str, value: Any = NO_VALUE) -> None:
    """SamplingParamsError unless ``ok``: ``name`` ``problem``, found ``value`` (if given)."""
    if not ok:
        raise SamplingParamsError(name, problem, value)
