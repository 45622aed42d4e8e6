"""The in-flight batching invariant: greedy tokens are the same alone, in a full batch, and when
admitted mid-flight (requests of different lengths arriving at random steps)."""

from __future__ import annotations

import random

import pytest

from kiln.engine import BuildLimits
from kiln.runtime import LLM, SamplingParams
from kiln.runtime.core import EngineCore
from kiln.runtime.reference_executor import ReferenceExecutor
from tests.runtime.mocks import CapacityExecutor, HashExecutor

GREEDY = SamplingParams(temperature=0, max_tokens=12)
LIMITS = BuildLimits(max_batch_size=5, max_input_len=40, max_seq_len=56, max_num_tokens=24)


def workload(vocab: int, n: int = 18, seed: int = 0, most: int = 16):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    params = [GREEDY.replace(max_tokens=rng.randint(1, most)) for _ in range(n)]
    arrivals = sorted(rng.randrange(0, 40) for _ in range(n))
    return prompts, params, arrivals


def run_mid_flight(executor, prompts, params, arrivals):
    core = EngineCore(executor)
    ids, pending, step = {}, list(range(len(prompts))), 0
    while pending or core.has_work():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            ids[core.add_request(prompts[i], params[i]).request_id] = i
        core.step()
        step += 1
    return [core.requests[rid].output_ids for rid, _ in sorted(ids.items(), key=lambda x: x[1])]


@pytest.mark.parametrize("make", [
    lambda: HashExecutor(LIMITS, vocab_size=97),
    lambda: CapacityExecutor(LIMITS, vocab_size=97, capacity=120),  # paged-like: requests wait
], ids=["contiguous", "paged"])
def test_invariant_with_a_history_hash_model(make):
    prompts, params, arrivals = workload(97)
    alone = [LLM.from_executor(make()).generate([p], q)[0].token_ids
             for p, q in zip(prompts, params, strict=True)]
    batched = [r.token_ids for r in LLM.from_executor(make()).generate(prompts, params)]
    executor = make()
    mid = run_mid_flight(executor, prompts, params, arrivals)
    widest = max(len(c) for c in executor.steps)
    if isinstance(executor, CapacityExecutor):  # the cache, not the slots, limited the batch
        assert widest < LIMITS.max_batch_size
    else:
        assert widest == LIMITS.max_batch_size, "never a full batch"
    assert [len(t) for t in alone] == [q.max_tokens for q in params]  # no EOS without tokenizer
    assert batched == alone
    assert [tuple(t) for t in mid] == [tuple(t) for t in alone]


def test_invariant_with_the_oracle_on_a_tiny_llama(tiny_checkpoint):
    executor = ReferenceExecutor.from_checkpoint(tiny_checkpoint, LIMITS)
    prompts, params, arrivals = workload(executor.vocab_size, n=16, seed=1, most=6)
    assert len({len(p) for p in prompts}) > 8
    alone = [tuple(executor.decoder.generate(p, q.max_tokens)) for p, q in
             zip(prompts, params, strict=True)]
    batched = LLM.from_executor(ReferenceExecutor(executor.decoder, LIMITS)).generate(prompts,
                                                                                    params)
    assert [r.token_ids for r in batched] == alone
    mid_executor = ReferenceExecutor(executor.decoder, LIMITS)
    mid = run_mid_flight(mid_executor, prompts, params, arrivals)
    assert [tuple(t) for t in mid] == alone
