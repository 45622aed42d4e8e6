"""Sampling on CUDA logits: every filter and penalty runs on the device with the request's own
CUDA generator and no host sync before the step's one read; seeded requests are reproducible and
the same alone or batched (through EngineCore, with a mock and with the torch executor); the
draws follow the distribution and the filters; non-finite rows fail alone; CUDA agrees with the
CPU (numpy) implementation where no randomness is involved.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from kiln.builder.api import build
from kiln.engine import BuildLimits, read_manifest
from kiln.runtime import LLM, SamplingParams
from kiln.runtime.core import EngineCore
from kiln.runtime.executor import StepLogits
from kiln.runtime.loader import ExecutorOptions
from kiln.runtime.sampling import (
    Generators,
    Row,
    apply_penalties,
    filter_logits,
    filter_numpy,
    make_generator,
    penalties_numpy,
    sample,
    sample_rows,
    sample_torch,
)
from kiln.runtime.torch_backend.executor import TorchExecutorOptions
from kiln.runtime.torch_executor import load_executor
from tests.models import hf_model, kiln_checkpoint
from tests.runtime.mocks import HashExecutor, NonFiniteExecutor

pytestmark = pytest.mark.gpu
LIMITS = BuildLimits(max_batch_size=8, max_input_len=32, max_seq_len=64, max_num_tokens=64)
EVERY_FEATURE = [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0.7, top_k=50),
    SamplingParams(temperature=0.9, top_p=0.9),
    SamplingParams(temperature=1.1, min_p=0.05),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.8, min_p=0.02, repetition_penalty=1.3,
                   presence_penalty=0.5, frequency_penalty=0.5, logprobs=3),
    SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=2),
    SamplingParams(temperature=0),
]


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda", torch.cuda.current_device())


def _logits(cuda, rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 3).to(cuda)


def _rows(params_list, seed: int = 0, prompt=(1, 2, 3, 2), output=(5, 5, 9)):
    return [Row(i, p, list(prompt), list(output), Generators(seed + i).on)
            for i, p in enumerate(params_list)]


def test_generators_live_on_the_logits_device(cuda):
    generators = Generators(1)
    assert generators.on(cuda).device == cuda and generators.on("cpu").device.type == "cpu"
    logits = _logits(cuda, 1, 100)[0]
    token, _ = sample(logits, SamplingParams(), [], [], generators.on(cuda))
    assert 0 <= token < 100
    with pytest.raises(ValueError, match="generator is on cpu"):
        sample(logits, SamplingParams(), [], [], make_generator(0))


def test_a_step_syncs_the_host_once(cuda, monkeypatch):
    logits = _logits(cuda, len(EVERY_FEATURE), 32000)
    sample_rows(logits, _rows(EVERY_FEATURE))  # warm up: pinned host blocks, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the device work of every row: any synchronizing call raises here
        for row in _rows(EVERY_FEATURE, seed=1):
            sample_torch(logits[row.index], row.params, row.prompt_ids, row.output_ids,
                         None if row.params.greedy else row.generator(cuda))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the one host read waits on the step's event (launch/collect, async scheduling), which
    # sync debug mode does not flag: count the event waits, and no flagged sync besides
    waits = []

    class CountingEvent(torch.cuda.Event):
        def synchronize(self):
            waits.append(self)
            return super().synchronize()

    monkeypatch.setattr(torch.cuda, "Event", CountingEvent)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            picks = sample_rows(logits, _rows(EVERY_FEATURE, seed=2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert syncs == [] and len(waits) == 1, (syncs, len(waits))
    assert all(p is not None and 0 <= p[0] < 32000 for p in picks)


def test_seeded_rows_are_reproducible_and_the_same_alone_or_batched(cuda):
    logits = _logits(cuda, 4, 5000, seed=1)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=200, repetition_penalty=1.2,
                            frequency_penalty=0.3)
    others = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=0),
              SamplingParams(temperature=2.0, min_p=0.01)]

    def draws(seed, batched):
        mine, theirs = Generators(seed), [Generators(100 + i) for i in range(3)]
        out: list[int] = []
        for _ in range(16):
            if batched:
                rows = [Row(i, p, [1, 2], [], g.on)
                        for i, (p, g) in enumerate(zip(others, theirs, strict=True))]
                rows.insert(2, Row(3, params, [1, 2], out[:], mine.on))
                out.append(sample_rows(logits, rows)[2][0])
            else:
                out.append(sample_rows(logits[3:], [Row(0, params, [1, 2], out[:],
                                                        mine.on)])[0][0])
        return out

    alone = draws(7, batched=False)
    assert draws(7, batched=False) == alone
    assert draws(7, batched=True) == alone
    assert draws(8, batched=False) != alone
    assert len(set(alone)) > 4


def test_draws_follow_the_distribution_and_the_filters(cuda):
    n = 4000
    logits = torch.tensor([0.75, 0.25], device=cuda).log().expand(n, 2)
    picks = [t for t, _ in sample_rows(logits, _rows([SamplingParams()] * n))]
    assert abs(picks.count(0) / n - 0.75) < 0.03
    wide = _logits(cuda, 64, 5000, seed=2)
    best = wide.argmax(-1).tolist()
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
                   SamplingParams(temperature=5.0, min_p=1.0)):
        assert [t for t, _ in sample_rows(wide, _rows([params] * 64, prompt=(),
                                                      output=()))] == best
    top5 = wide.topk(5).indices.tolist()
    hot = [t for t, _ in sample_rows(wide, _rows([SamplingParams(temperature=3.0, top_k=5)] * 64,
                                                 prompt=(), output=()))]
    assert all(t in top5[i] for i, t in enumerate(hot)) and set(hot) != set(best)
    probs = torch.softmax(wide, -1)
    for params in (SamplingParams(temperature=1.0, min_p=0.2),
                   SamplingParams(temperature=1.0, top_p=0.5)):
        for i, t in enumerate(t for t, _ in sample_rows(wide, _rows([params] * 64, prompt=(),
                                                                     output=()))):
            if params.min_p:
                assert probs[i, t] >= 0.2 * probs[i].max() * (1 - 1e-5)
            else:  # inside the smallest prefix reaching 0.5
                ordered = probs[i].sort(descending=True).values
                assert probs[i, t] >= ordered[int((ordered.cumsum(-1) < 0.5).sum())] * (1 - 1e-5)


def test_repetition_penalty_never_repeats_on_cuda(cuda):
    logits = torch.zeros(50, device=cuda)
    logits[:5] = 10.0  # five likely tokens, each penalized once seen
    params = SamplingParams(temperature=0.5, repetition_penalty=1e6, presence_penalty=2.0)
    generator, seen = Generators(3).on(cuda), []
    for _ in range(5):
        token, _ = sample(logits, params, [], seen, generator)
        assert token not in seen
        seen.append(token)
    assert sorted(seen) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("params", EVERY_FEATURE, ids=repr)
def test_cuda_agrees_with_the_cpu_implementation(cuda, params):
    logits = _logits(cuda, 1, 3000, seed=4)[0]
    prompt, output = [1, 2, 3, 2, 7], [5, 5, 9]
    pen = apply_penalties(logits, params, prompt, output)
    want = penalties_numpy(logits.cpu().numpy(), params, prompt, output)
    torch.testing.assert_close(pen.cpu(), torch.from_numpy(want))
    assert torch.isfinite(pen).all()
    if params.greedy:
        got = sample_rows(logits[None], _rows([params], prompt=prompt, output=output))[0]
        ref = sample_rows(logits[None].cpu(), _rows([params], prompt=prompt, output=output))[0]
        assert got[0] == ref[0]
        if params.logprobs is not None:
            assert list(got[1].top) == list(ref[1].top)
            assert got[1].logprob == pytest.approx(ref[1].logprob, abs=1e-4)
        return
    kept = filter_logits(pen, params)
    ref = torch.from_numpy(filter_numpy(want, params))
    assert torch.equal(torch.isfinite(kept).cpu(), torch.isfinite(ref))
    torch.testing.assert_close(torch.softmax(kept, -1).cpu(), torch.softmax(ref, -1))
    assert not torch.isnan(torch.softmax(kept, -1)).any()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_row_gets_no_token_and_the_others_do(cuda, bad):
    logits = _logits(cuda, 3, 100)
    logits[1, 7] = bad
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9),
              SamplingParams(temperature=0.8, logprobs=2)]
    picks = sample_rows(logits, _rows(params))
    assert picks[1] is None
    assert picks[0] == (int(logits[0].argmax()), None)
    assert 0 <= picks[2][0] < 100 and picks[2][1].token_id == picks[2][0]


class _CudaHashExecutor(NonFiniteExecutor):
    """HashExecutor logits (and NonFiniteExecutor's poison), handed back on the GPU."""

    def step(self, chunks):
        return super().step(chunks).to("cuda")


def _requests(vocab: int, n: int = 12):
    kinds = [SamplingParams(temperature=0.8, top_k=20, max_tokens=9),
             SamplingParams(temperature=1.2, top_p=0.9, min_p=0.02, max_tokens=7),
             SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
                            frequency_penalty=0.4, logprobs=2, max_tokens=10),
             SamplingParams(temperature=0, max_tokens=6)]
    prompts = [[(7 * i + j) % vocab for j in range(3 + i % 5)] for i in range(n)]
    return prompts, [kinds[i % 4].replace(seed=i, ignore_eos=True) for i in range(n)]


def test_engine_core_on_cuda_logits_alone_equals_batched_and_a_nan_request_fails(cuda):
    prompts, params = _requests(97)
    poisoned = [13, 1, 2, 3]

    def llm():
        return LLM.from_executor(_CudaHashExecutor(LIMITS, 97, poison=13, after=6))

    alone = [llm().generate([p], q)[0].token_ids for p, q in zip(prompts, params, strict=True)]
    results = llm().generate([*prompts, poisoned], [*params, params[0]])
    assert [r.token_ids for r in results[:-1]] == alone
    assert results[-1].finish_reason == "error" and "not finite" in results[-1].error
    assert len({t for ids in alone for t in ids}) > 20
    cpu = [r.token_ids for r in LLM.from_executor(HashExecutor(LIMITS, 97)).generate(
        prompts, [p for p in params])]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    assert [alone[i] for i in greedy] == [cpu[i] for i in greedy]  # greedy: device-independent


def _torch_executor(tmp_path, dtype: str):
    """A tiny Llama's torch engine in ``dtype`` on the GPU (CUDA graphs on), 17 cache pages."""
    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    engine = tmp_path / "engine"
    build(ckpt, engine, backend="torch", max_batch_size=8, max_input_len=32, max_seq_len=64,
          max_num_tokens=64, dtype=dtype)
    return load_executor(engine, read_manifest(engine), ExecutorOptions(device="cuda"),
                         TorchExecutorOptions(kv_cache_blocks=17, page_size=32))


def test_torch_executor_sampled_requests_alone_equal_batched(cuda, tmp_path):
    ex = _torch_executor(tmp_path, "float32")
    prompts, params = _requests(ex.vocab_size, n=8)

    def run(batch):
        core, out = EngineCore(ex), []
        for group in batch:
            requests = [core.add_request(prompts[i], params[i]) for i in group]
            while core.has_work():
                core.step()
            out += [(i, r.output_ids, r.finish_reason) for i, r in zip(group, requests,
                                                                        strict=True)]
        return [ids for _, ids, _ in sorted(out)], {reason for _, _, reason in out}

    alone, reasons = run([[i] for i in range(len(prompts))])
    assert reasons == {"length"}
    assert run([list(range(len(prompts)))]) == (alone, reasons)
    assert run([list(range(len(prompts)))])[0] == alone  # reproducible
    ex.close()


def test_a_decode_graphs_own_greedy_pass_changes_no_token_or_logprob(cuda, tmp_path,
                                                                       monkeypatch):
    """bf16 engine, CUDA graphs: each decode step hands the sampler its graph's greedy pass
    and its bf16 logits; the same requests with the sampler's own pass over a float32 copy
    (the step as it was) give the same tokens and logprobs, bit for bit. Requests join while
    others decode (graph steps, eager steps, padded graphs of 3 rows in 4, async feeds from
    a graph's ids into an eager step)."""
    ex = _torch_executor(tmp_path, "bfloat16")
    prompts, params = _requests(ex.vocab_size, n=6)
    params = [p.replace(logprobs=2) if i == 1 else p for i, p in enumerate(params)]
    heads = []

    def run(async_scheduling: bool):
        core, requests = EngineCore(ex, async_scheduling=async_scheduling), []
        for i in range(6):
            requests.append(core.add_request(prompts[i], params[i]))
            for _ in range(3 if i in (2, 4) else 0):
                core.step()
        while core.has_work():
            core.step()
        return [(r.output_ids, r.finish_reason, r.logprobs) for r in requests]

    step_logits = type(ex).step_logits

    def counted(self, chunks, pending=None):
        out = step_logits(self, chunks, pending)
        heads.append(out.greedy is not None)
        return out

    monkeypatch.setattr(type(ex), "step_logits", counted)
    with_heads = [run(True), run(False)]
    assert any(heads) and not all(heads), heads  # graph steps and eager steps both ran

    def as_before(self, chunks, pending=None):
        out = step_logits(self, chunks, pending)
        return StepLogits(out.last.float(), out.context)

    monkeypatch.setattr(type(ex), "step_logits", as_before)
    assert [run(True), run(False)] == with_heads
    assert with_heads[0] == with_heads[1]
    assert {reason for _, reason, _ in with_heads[0]} == {"length"}
    ex.close()

