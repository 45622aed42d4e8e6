"""The warm-up (kiln.runtime.warm_up): it runs every kind of step a server's requests make
(prompts of 1, 3, 16 and 17 tokens batched together, full decode batches, a chunked prefill
beside decodes, greedy and sampled rows, prompt scoring), leaves the core idle with every slot
free, and changes nothing a later request gets; on the CPU it runs nothing."""

from __future__ import annotations

import pytest

from kiln.engine import BuildLimits
from kiln.runtime import LLM, SamplingParams
from kiln.runtime.core import EngineCore
from kiln.runtime.loader import open_engine
from kiln.runtime.warm_up import warm_up
from tests.runtime.mocks import HashExecutor
from tests.runtime.test_async_scheduling import assert_all_free, make_executor
from tests.runtime.toy_onnx import toy_engine_dir

LIMITS = BuildLimits(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=24)


def test_the_warm_up_runs_every_kind_of_step_and_leaves_the_core_idle():
    executor = HashExecutor(LIMITS, 97)
    core = EngineCore(executor)
    warm_up(core)
    layout = [[(c.start, len(c.tokens)) for c in s] for s in executor.steps]
    assert layout[0] == [(0, 1), (0, 3), (0, 16), (0, 4)]  # 17 tokens: over the step's budget
    assert layout[1][-1] == (4, 13)  # ... so chunked
    assert layout[2] == [(2, 1), (4, 1), (17, 1), (17, 1)]  # a full decode batch
    assert layout[4][-1] == (0, 21) and layout[5][-1] == (21, 4)  # max_num_tokens + 1 tokens,
    assert len(layout[4]) == 4 and len(layout[5]) == 3  # chunked, beside decodes
    assert {len(s) for s in layout} == {2, 3, 4}  # decode batches of several widths
    assert not core.has_work() and not core.requests
    assert sorted(core.scheduler._free) == list(range(LIMITS.max_batch_size))
    with pytest.raises(RuntimeError, match="before it takes requests"):
        core.add_request([1, 2], SamplingParams(max_tokens=2))
        warm_up(core)


def test_after_the_warm_up_requests_get_what_they_get_on_a_fresh_engine(tiny_checkpoint):
    """The torch executor on the CPU, overlapped loop, context logits: the warm-up's sampled
    and scored requests leave no trace in the KV cache, the generators or the scheduler."""
    prompts = [[20, 31, 42, 53], [90, 80, 70, 60, 50, 40, 30], [5]]
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, ignore_eos=True)]
    results = {}
    for warm in (False, True):
        executor = make_executor(tiny_checkpoint)
        assert not executor.needs_warm_up  # on the CPU
        executor.needs_warm_up = True  # as on a GPU: run it, to compare
        llm = LLM.from_executor(executor)
        llm.core = EngineCore(executor, async_scheduling=True)
        if warm:
            assert llm.warm_up() > 0
            assert_all_free(llm.core, executor)
        results[warm] = llm.generate(prompts, params)
    for cold, warmed in zip(results[False], results[True], strict=True):
        assert warmed.token_ids == cold.token_ids
        assert warmed.logprobs == cold.logprobs
        assert warmed.prompt_logprobs == cold.prompt_logprobs


def test_on_the_cpu_the_warm_up_runs_nothing_and_says_so(tmp_path, caplog):
    _, onnx = open_engine(toy_engine_dir(tmp_path / "engine", LIMITS))
    with LLM.from_executor(onnx) as llm:
        assert not llm.executor.needs_warm_up
        runs = []
        step = llm.executor.step
        llm.executor.step = lambda chunks: runs.append(chunks) or step(chunks)
        with caplog.at_level("INFO", logger="kiln.runtime.llm"):
            llm.warm_up()
        assert runs == [] and "no warm-up: the engine runs on the CPU" in caplog.text
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids) == 2
