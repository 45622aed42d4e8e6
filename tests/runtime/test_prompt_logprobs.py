"""SamplingParams.prompt_logprobs on engines built with --gather_context_logits (onnx and torch
on the CPU, tiny random Llama): equal to the oracle's log_softmax at every prompt position,
the same alone, batched and chunk-prefilled; refused by engines built without the flag;
max_tokens=0 scores a prompt without generating."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from kiln.builder import build
from kiln.engine import read_manifest
from kiln.reference import ReferenceDecoder
from kiln.runtime import LLM, AsyncLLM, SamplingParams
from kiln.runtime.errors import RequestError, SamplingParamsError
from kiln.runtime.loader import ExecutorOptions, open_engine
from tests.runtime.mocks import HashExecutor

# max_num_tokens 16 < the 30-token prompt: it is prefilled in two chunks (16 + 14), and with
# other prompts beside it in more, at other offsets.
LIMITS = dict(max_batch_size=4, max_input_len=32, max_seq_len=40, max_num_tokens=16)
LONG = [(7 * i + 3) % 128 for i in range(30)]
OTHERS = [[5, 9, 2, 77, 31], [100, 4, 4, 8, 15, 16, 23, 42, 1, 2, 3, 60], [11] * 9]
TOP = 3
ATOL = 1e-4  # float32 engine vs float32 oracle, logprob units
GREEDY = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=TOP)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("gather")
    out = {}
    for backend in ("onnx", "torch"):
        out[backend] = root / backend
        build(tiny_checkpoint, out[backend], backend=backend, dtype="float32",
              gather_context_logits=True, **LIMITS)
    return out


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint):
    decoder = ReferenceDecoder.from_checkpoint(tiny_checkpoint)

    def logprobs(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(decoder.forward(torch.tensor([prompt]))[0].double(), -1)
    return logprobs


def _llm(engine) -> LLM:
    """An LLM over the engine's executor (the tiny model has no tokenizer: token id prompts)."""
    return LLM.from_executor(open_engine(engine, ExecutorOptions(device="cpu"))[1])


def _check_against_oracle(scored, prompt, want: torch.Tensor) -> None:
    assert len(scored) == len(prompt) and scored[0] is None
    for p in range(1, len(prompt)):
        entry, row = scored[p], want[p - 1]
        assert entry.token_id == prompt[p]
        assert math.isfinite(entry.logprob) and abs(entry.logprob - float(row[prompt[p]])) <= ATOL
        top = torch.topk(row, TOP)
        assert list(entry.top) == top.indices.tolist()
        assert all(abs(v - float(w)) <= ATOL for v, w in zip(entry.top.values(), top.values,
                                                               strict=True))


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_prompt_logprobs_match_the_oracle_alone_batched_and_chunked(engines, oracle, backend):
    assert read_manifest(engines[backend]).gather_context_logits is True
    llm = _llm(engines[backend])
    prompts = [LONG, *OTHERS]
    alone = [llm.generate([p], GREEDY)[0] for p in prompts]
    batched = llm.generate(prompts, GREEDY)
    for prompt, one, many in zip(prompts, alone, batched, strict=True):
        _check_against_oracle(one.prompt_logprobs, prompt, oracle(prompt))
        assert many.token_ids == one.token_ids and len(one.token_ids) == 2
        for a, b in zip(one.prompt_logprobs[1:], many.prompt_logprobs[1:], strict=True):
            assert a.token_id == b.token_id and list(a.top) == list(b.top)
            assert abs(a.logprob - b.logprob) <= 1e-5  # same numbers, up to batch-shape rounding
    # the generated tokens' logits are unchanged by asking for context logits
    plain = llm.generate(prompts, GREEDY.replace(prompt_logprobs=None))
    assert [r.token_ids for r in plain] == [r.token_ids for r in batched]
    assert all(r.prompt_logprobs is None for r in plain)


def test_max_tokens_zero_scores_the_prompt_only(engines, oracle):
    llm = _llm(engines["onnx"])
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    result, other = llm.generate([LONG, OTHERS[0]], [params, GREEDY])
    assert result.finish_reason == "length" and result.token_ids == () and result.text == ""
    assert all(entry.top == {} for entry in result.prompt_logprobs[1:])
    _check_against_oracle_values(result.prompt_logprobs, LONG, oracle(LONG))
    assert len(other.token_ids) == 2
    one = llm.generate([[42]], params)[0]  # a one-token prompt: nothing to score
    assert one.prompt_logprobs == (None,) and one.finish_reason == "length"


def _check_against_oracle_values(scored, prompt, want) -> None:
    for p in range(1, len(prompt)):
        assert abs(scored[p].logprob - float(want[p - 1, prompt[p]])) <= ATOL


def test_async_llm_returns_prompt_logprobs(engines, oracle):
    llm = _llm(engines["torch"])

    async def main():
        async with AsyncLLM(llm) as engine:
            return await asyncio.gather(engine.generate(LONG, GREEDY),
                                        engine.generate(OTHERS[1], GREEDY))

    first, second = asyncio.run(main())
    _check_against_oracle(first.prompt_logprobs, LONG, oracle(LONG))
    _check_against_oracle(second.prompt_logprobs, OTHERS[1], oracle(OTHERS[1]))


def test_engine_without_the_flag_refuses_prompt_logprobs(tiny_checkpoint, tmp_path):
    engine = tmp_path / "plain"
    build(tiny_checkpoint, engine, backend="torch", dtype="float32", **LIMITS)
    assert read_manifest(engine).gather_context_logits is False
    for llm in (_llm(engine), LLM.from_executor(HashExecutor(read_manifest(engine).limits, 128))):
        with pytest.raises(RequestError) as error:
            llm.generate([LONG], GREEDY)
        message = str(error.value)
        assert "\n" not in message and message.endswith(
            "rebuild it with kiln.build(..., gather_context_logits=True)")
        assert llm.generate([LONG], GREEDY.replace(prompt_logprobs=None))[0].finish_reason \
            == "length"


@pytest.mark.parametrize(("changes", "expected"), [
    (dict(max_tokens=0), "SamplingParams.max_tokens is 0, which only scores a prompt: also set "
                         "prompt_logprobs"),
    (dict(max_tokens=-1, prompt_logprobs=1), "SamplingParams.max_tokens must be an integer >= 1"),
    (dict(prompt_logprobs=21), "SamplingParams.prompt_logprobs must be None or an integer in "
                               "[0, 20], found 21"),
    (dict(prompt_logprobs=True), "SamplingParams.prompt_logprobs must be None"),
])
def test_params_validation(changes, expected):
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(**changes)
    assert str(error.value).startswith(expected)
