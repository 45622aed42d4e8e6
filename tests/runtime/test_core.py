"""EngineCore's sampling step: requests whose logits turn non-finite end with ``error`` while the
others go on; seeded sampled requests are the same alone, batched and mid-flight; on an
(emulated) accelerator each request's generator lives on the logits' device and a step reads the
host once; a step never changes torch's process-wide thread count."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import pickle
import weakref

import pytest
import torch

from kiln.engine import BuildLimits
from kiln.runtime import LLM, AsyncLLM, SamplingParams, sampling
from kiln.runtime.core import EngineCore, freeze_loaded_objects
from kiln.runtime.errors import RequestError
from tests.runtime.mocks import (
    FakeDeviceGenerator,
    HashExecutor,
    MetaExecutor,
    NonFiniteExecutor,
    OnDevice,
    SlowExecutor,
)
from tests.runtime.test_inflight import run_mid_flight

LIMITS = BuildLimits(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=24)
POISON = 13
PROMPTS = [[5, 1, 2], [POISON, 3, 4, 5], [7, 8], [9, 9, 9, 9, 9]]
KINDS = {
    "plain-greedy": SamplingParams(temperature=0, max_tokens=8),
    "sampled": SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=8),
    "greedy-penalty-logprobs": SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=2,
                                              max_tokens=8),
}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_non_finite_logits_end_that_request_with_error_and_the_others_go_on(kind, bad, caplog):
    params = KINDS[kind]

    def llm():  # the poisoned prompt (4 tokens) gets bad logits from its 3rd output token on
        return LLM.from_executor(NonFiniteExecutor(LIMITS, 97, POISON, after=6, value=bad))

    alone = [llm().generate([p], params)[0] for p in PROMPTS]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kiln.runtime.core"):
        batched = llm().generate(PROMPTS, params)
    failed = batched[1]
    assert failed.finish_reason == "error" and len(failed.token_ids) == 2
    assert failed.token_ids == alone[1].token_ids
    assert failed.error.startswith(f"request {failed.request_id}: ")
    assert "not finite" in failed.error
    # logged once at INFO: the caller gets it as finish "error" + request.error (kiln run
    # prints it), so the default level does not say it twice
    logged = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO
    assert failed.request_id in logged[0].getMessage()
    for i in (0, 2, 3):
        assert batched[i].finish_reason == "length" and batched[i].error is None
        assert batched[i].token_ids == alone[i].token_ids and len(alone[i].token_ids) == 8


def test_a_non_finite_request_names_its_engine_dir_for_kiln_verify(tmp_path, monkeypatch):
    """The message sends the user to ``kiln verify`` with the engine's own path, quoted for a
    shell (a trial copied the literal ENGINE_DIR); an executor built by hand has no path."""
    engine = tmp_path / "my engine"
    engine.mkdir()
    poisoned = NonFiniteExecutor(LIMITS, 97, POISON, after=6)
    monkeypatch.setattr("kiln.runtime.llm.open_engine", lambda *a: (None, poisoned))
    monkeypatch.setattr("kiln.runtime.llm.load_tokenizer", lambda *a: None)
    failed = LLM(engine).generate([PROMPTS[1]], KINDS["plain-greedy"])[0]
    assert failed.finish_reason == "error"
    assert f"check its files with kiln verify '{engine}' and the checkpoint" in failed.error
    by_hand = LLM.from_executor(NonFiniteExecutor(LIMITS, 97, POISON, after=6))
    failed = by_hand.generate([PROMPTS[1]], KINDS["plain-greedy"])[0]
    assert "kiln verify ENGINE_DIR and the checkpoint" in failed.error


def test_async_llm_streams_the_error_of_a_non_finite_request():
    llm = LLM.from_executor(NonFiniteExecutor(LIMITS, 97, POISON, after=6))
    params = KINDS["sampled"]

    async def main():
        async with AsyncLLM(llm) as engine:
            return await asyncio.gather(engine.generate(PROMPTS[1], params),
                                        engine.generate(PROMPTS[0], params))

    failed, fine = asyncio.run(main())
    assert failed.finish_reason == "error" and "not finite" in failed.error
    assert fine.finish_reason == "length" and fine.error is None and len(fine.token_ids) == 8


def test_seeded_sampled_requests_are_the_same_alone_batched_and_mid_flight():
    kinds = [SamplingParams(temperature=0.8, top_k=20, max_tokens=9),
             SamplingParams(temperature=1.2, top_p=0.9, min_p=0.02, max_tokens=7),
             SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
                            frequency_penalty=0.4, logprobs=2, max_tokens=10),
             SamplingParams(temperature=0, max_tokens=6)]
    prompts = [[(7 * i + j) % 97 for j in range(3 + i % 5)] for i in range(10)]
    params = [kinds[i % 4].replace(seed=i) for i in range(10)]

    def make():
        return HashExecutor(LIMITS, 97)

    alone = [LLM.from_executor(make()).generate([p], q)[0].token_ids
             for p, q in zip(prompts, params, strict=True)]
    batched = [r.token_ids for r in LLM.from_executor(make()).generate(prompts, params)]
    mid = run_mid_flight(make(), prompts, params, [0, 0, 1, 1, 2, 4, 4, 6, 9, 9])
    assert batched == alone and [tuple(t) for t in mid] == alone
    assert len({t for ids in alone for t in ids}) > 20  # sampled, not a constant


def test_on_an_accelerator_generators_live_on_the_logits_device_and_a_step_reads_once(
        monkeypatch):
    made = []

    def fake(seed, device="cpu"):
        made.append((seed, torch.device(device)))
        return FakeDeviceGenerator(device, 0 if seed is None else seed)

    monkeypatch.setattr(sampling, "make_generator", fake)
    executor = MetaExecutor(LIMITS, 64)
    core = EngineCore(executor)
    kinds = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0),
             SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2,
                            frequency_penalty=0.3, seed=2),
             SamplingParams(temperature=1.0, top_k=4, logprobs=2, seed=3)]
    requests = [core.add_request([1, 2, i + 3], p.replace(max_tokens=5))
                for i, p in enumerate(kinds)]
    with OnDevice() as device:
        steps = 0
        while core.has_work():
            core.step()
            steps += 1
    assert len(device.reads) == steps  # one host read per step, whatever the batch holds
    assert all(r.finish_reason == "length" and len(r.output_ids) == 5 for r in requests)
    assert sorted(made) == [(1, torch.device("meta")), (2, torch.device("meta")),
                            (3, torch.device("meta"))]  # greedy made none


def test_a_step_leaves_torchs_thread_count_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    llm = LLM.from_executor(HashExecutor(LIMITS, 97))
    params = [SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=1),
              SamplingParams(temperature=0)]
    llm.generate([[1, 2, 3], [4, 5]], params)
    assert calls == []


def test_a_prompt_id_outside_the_vocabulary_is_named_by_its_position():
    """The first id outside, where it is (it had listed up to five, named by no position)."""
    core = EngineCore(HashExecutor(LIMITS, 64), None)
    with pytest.raises(RequestError, match=r"^request r1: prompt\[1\]: token id 64 is outside "
                                           r"the vocabulary \[0, 64\); pass ids of the "
                                           r"model's tokenizer$"):
        core.add_request([1, 64, -1], SamplingParams(), "r1")
    assert not core.has_work() and "r1" not in core.requests


def test_stop_token_ids_outside_the_vocabulary_are_refused_like_prompt_ids():
    core = EngineCore(HashExecutor(LIMITS, 64), None)
    with pytest.raises(RequestError, match=r"^request r1: stop_token_ids\[1\]: token id 64 is "
                                           r"outside the vocabulary \[0, 64\); pass ids of "
                                           r"the model's tokenizer$"):
        core.add_request([1, 2], SamplingParams(stop_token_ids=(3, 64, 999999)), "r1")
    assert not core.has_work() and "r1" not in core.requests
    with pytest.raises(RequestError) as raised:  # the entry at fault, for kiln serve's param
        core.add_request([1, 2], SamplingParams(stop_token_ids=(3, 64)), "r1")
    assert raised.value.field == "stop_token_ids[1]"
    assert pickle.loads(pickle.dumps(raised.value)).field == "stop_token_ids[1]"  # (replicas)
    core.add_request([1, 2], SamplingParams(stop_token_ids=(0, 63)), "r1")  # the edges: fine


STEP_S = 0.02  # a model step's time, so that waits are measurable


def test_queue_time_is_arrival_to_admission_into_a_slot():
    """One slot, two requests: the second is admitted by the scheduling right after the first
    one's finish, so it queued for the whole of the first one's run; each stamp is taken when
    the scheduler admits, before the step runs; every delta after admission carries the wait."""
    one_slot = BuildLimits(max_batch_size=1, max_input_len=32, max_seq_len=64, max_num_tokens=24)
    llm = LLM.from_executor(SlowExecutor(one_slot, 97, STEP_S))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    deltas = list(llm.generate_stream([[1, 2, 3], [4, 5]], params))
    first, second = (next(d.result for d in deltas if d.index == i and d.result) for i in (0, 1))
    a, b = first.timings, second.timings
    assert a.arrival <= a.admitted and a.queue_s < STEP_S  # a free slot: admitted at once
    assert a.token_times[0] - a.admitted >= STEP_S  # stamped before its first step ran
    assert a.finished <= b.admitted and b.token_times[0] - b.admitted >= STEP_S
    assert b.queue_s == pytest.approx(a.latency_s, abs=STEP_S / 2)  # waited for a's whole run
    assert a.latency_s >= 4 * STEP_S
    for d in deltas:
        assert d.queue_s == (first if d.index == 0 else second).timings.queue_s


def test_a_request_aborted_while_it_waits_has_no_queue_time():
    one_slot = BuildLimits(max_batch_size=1, max_input_len=32, max_seq_len=64, max_num_tokens=24)
    core = EngineCore(HashExecutor(one_slot, 97), None)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    core.add_request([1, 2], params, "runs")
    core.add_request([3, 4], params, "waits")
    core.step()
    core.abort("waits")
    assert core.requests["runs"].admitted_time is not None
    assert core.requests["waits"].admitted_time is None


class _Cycle(list):
    """A list that takes weak references."""


def test_freezing_the_loaded_objects_keeps_them_out_of_full_collections():
    loaded = [[i] for i in range(1000)]  # tracked containers alive at "load" time
    cycle = _Cycle()
    cycle.append(cycle)  # garbage in a reference cycle: collected, not frozen
    gone = weakref.ref(cycle)
    del cycle
    assert freeze_loaded_objects() >= len(loaded)
    assert gone() is None
    later = [[i] for i in range(10)]
    tracked = {id(o) for o in gc.get_objects()}  # frozen ones are no longer listed
    assert id(loaded[0]) not in tracked and id(later[0]) in tracked
    gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_the_core_itself_freezes_nothing():
    """EngineCore leaves process-wide settings alone; the processes that own it freeze."""
    core = EngineCore(HashExecutor(LIMITS, 97))
    core.add_request([1, 2], SamplingParams(temperature=0, max_tokens=2))
    while core.has_work():
        core.step()
    assert gc.get_freeze_count() == 0
