"""Async scheduling (EngineCore's overlapped loop) on the torch executor on the CPU.

The overlapped loop schedules and launches step n+1 before it reads step n's tokens (placeholder
tokens fed on the device, stray rows of requests that stopped at n). These tests hold it to the
synchronous loop: the same tokens, logprobs, text and finish reasons for a mixed workload
(greedy, seeded sampling with every filter and penalty, logprobs, prompt logprobs, stop strings,
stop ids, max_tokens, max_seq_len, arrivals mid-flight, abort mid-flight); a stopped request's
freed blocks reused by a waiting one; an abort with a row in flight; every slot and block free
at the end; and executors without support (onnx) on the synchronous loop. Also the sampling
split it rests on: launching reads nothing from the device, collecting reads it once, and the
device-side ids are the collected tokens. A ``gpu``-marked twin runs the workload on CUDA
(CUDA-graph decode steps fed on the device).
"""

from __future__ import annotations

import logging

import pytest
import torch

from kiln.checkpoint import load_config, load_rank
from kiln.engine import BuildLimits
from kiln.runtime.core import EngineCore
from kiln.runtime.executor import DeviceTokens, SequenceChunk
from kiln.runtime.loader import open_engine
from kiln.runtime.params import SamplingParams
from kiln.runtime.results import CompletionResult
from kiln.runtime.sampling import Row, launch_rows, launch_rows_torch
from kiln.runtime.scheduler import PLACEHOLDER
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions
from tests.runtime.mocks import FakeDeviceGenerator, HashExecutor, OnDevice
from tests.runtime.toy_onnx import toy_engine_dir

LIMITS = BuildLimits(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=24)
PAGE = 4


def make_executor(ckpt, limits=LIMITS, device="cpu", **options) -> TorchExecutor:
    config = load_config(ckpt)
    tensors = {name: t.to(device) for name, t in load_rank(ckpt, 0, config).items()}
    return TorchExecutor(config.decoder, tensors, limits, device=device,
                         options=TorchExecutorOptions(**{"page_size": PAGE, **options}),
                         gather_context_logits=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 21, (n,), generator=g).tolist()
    return [torch.randint(17, 128, (k,), generator=g).tolist() for k in lengths]


# (params, arrival step); prompts(...)[i] is request i's prompt
WORKLOAD = [
    (SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), 0),
    (SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=2, max_tokens=10), 0),
    (SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=1, max_tokens=14), 0),
    (SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5, logprobs=3,
                    seed=2, max_tokens=12), 1),
    (SamplingParams(temperature=1.2, seed=3, stop_token_ids=tuple(range(17, 128, 6)),
                    max_tokens=20), 2),
    (SamplingParams(temperature=1.0, seed=4, stop=("qJ", "~~"), max_tokens=20), 2),
    (SamplingParams(temperature=0, prompt_logprobs=2, max_tokens=4), 3),
    (SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=0), 4),
    (SamplingParams(temperature=0.9, seed=5, max_tokens=20), 5),  # aborted after 3 tokens
    (SamplingParams(temperature=1.5, seed=6, max_tokens=60), 6),  # max_seq_len ends it
    (SamplingParams(temperature=0.7, seed=7, stop=("pp",), stop_token_ids=(40, 50),
                    include_stop_str_in_output=True, max_tokens=16), 9),
    (SamplingParams(temperature=0, stop_token_ids=(60, 117), max_tokens=16), 9),
]
ABORTED, ABORT_AFTER = 8, 3


class Recorder:
    """Wraps an executor's step_logits: records each step's chunks and fed tokens."""

    def __init__(self, executor):
        self.steps: list[list[SequenceChunk]] = []
        self.fed = 0
        inner = executor.step_logits

        def step_logits(chunks, pending: DeviceTokens | None = None):
            self.steps.append(list(chunks))
            if pending is not None:
                self.fed += len(pending.feeds)
                return inner(chunks, pending)
            return inner(chunks)
        executor.step_logits = step_logits


def run(core: EngineCore, workload, tokenizer_prompts, abort=None):
    """Drive ``core`` through the workload; results by request index and streamed pieces."""
    added, results, streams, step = {}, {}, {}, 0
    while len(added) < len(workload) or core.has_work():
        for i, (params, arrival) in enumerate(workload):
            if i not in added and arrival <= step:
                added[i] = core.add_request(tokenizer_prompts[i], params).request_id
                streams[added[i]] = ([], [])
        deltas = core.step()
        if abort is not None:
            index, after = abort
            request = core.requests.get(added.get(index))
            if request is not None and not request.finished and \
                    len(request.output_ids) >= after:
                deltas.append(core.abort(request.request_id))
        for delta in deltas:
            streams[delta.request_id][0].extend(delta.token_ids)
            streams[delta.request_id][1].append(delta.text)
            if delta.finished:
                results[delta.request_id] = CompletionResult.from_request(
                    core.pop(delta.request_id))
        step += 1
        assert step < 500, "the engine did not finish"
    by_index = {i: results[rid] for i, rid in added.items()}
    for rid, (tokens, texts) in streams.items():
        assert tuple(tokens) == results[rid].token_ids and "".join(texts) == results[rid].text
    return by_index


def same(a: CompletionResult, b: CompletionResult) -> bool:
    """Equal results; logprob values to 1e-5. Exact tokens, but not exact floats: the two loops
    batch a request with different rows (a stray row takes a place in step n+1; a slot freed by
    a stop is reused one step later), and the executor's float32 GEMMs are not bit-invariant
    to the batch (the synchronous loop alone differs by an ulp with the company of a step)."""
    keys = ("text", "token_ids", "finish_reason", "stop_reason", "error")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and \
        close(a.logprobs, b.logprobs) and close(a.prompt_logprobs, b.prompt_logprobs)


def close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        x is y or (x.token_id == y.token_id and x.top.keys() == y.top.keys()
                   and x.logprob == pytest.approx(y.logprob, abs=1e-5)
                   and list(x.top.values()) == pytest.approx(list(y.top.values()), abs=1e-5))
        for x, y in zip(a, b, strict=True))


def assert_all_free(core: EngineCore, executor: TorchExecutor) -> None:
    assert not core.has_work() and core._inflight is None
    assert sorted(core.scheduler._free) == list(range(executor.limits.max_batch_size))
    assert executor.cache.allocator.num_free == executor.cache.allocator.num_blocks - 1


def test_async_and_sync_give_identical_outputs(tiny_checkpoint, tokenizer):
    ps = prompts(len(WORKLOAD))
    out, recorders = {}, {}
    for mode in (False, True):
        executor = make_executor(tiny_checkpoint)
        recorders[mode] = Recorder(executor)
        core = EngineCore(executor, tokenizer, async_scheduling=mode)
        assert core.async_scheduling is mode
        out[mode] = run(core, WORKLOAD, ps, abort=(ABORTED, ABORT_AFTER))
        assert_all_free(core, executor)
    for i in range(len(WORKLOAD)):
        assert same(out[False][i], out[True][i]), (i, out[False][i], out[True][i])
    reasons = {(r.finish_reason, type(r.stop_reason)) for r in out[True].values()}
    # the workload covers every way to end: stop id, stop string, length, abort
    assert {("stop", int), ("stop", str), ("length", type(None)),
            ("abort", type(None))} <= reasons
    assert len(out[True][ABORTED].token_ids) == ABORT_AFTER
    assert len(out[True][9].token_ids) == LIMITS.max_seq_len - len(ps[9]) + 1  # max_seq_len
    assert out[True][7].token_ids == () and out[True][6].prompt_logprobs is not None
    # the overlapped loop fed tokens on the device, and ran stray rows (requests that stopped
    # while their next row was in flight): more rows than the synchronous loop, same outputs
    assert recorders[False].fed == 0 and recorders[True].fed > 0
    rows = {mode: sum(len(s) for s in r.steps) for mode, r in recorders.items()}
    assert rows[True] > rows[False]


def _first_new(tokens: list[int], at_least: int) -> int:
    """Index of the first token at or after ``at_least`` that did not occur before it."""
    return next(i for i in range(at_least, len(tokens)) if tokens[i] not in tokens[:i])


def test_stopped_requests_blocks_reused_while_its_stray_row_was_in_flight(tiny_checkpoint):
    """A stops (stop id) while its next row is in flight; the cache holds one request, so B
    waits, then takes A's freed blocks: B's tokens are those it gets alone."""
    limits = BuildLimits(max_batch_size=2, max_input_len=8, max_seq_len=20, max_num_tokens=16)
    a_prompt, b_prompt = [20, 31, 42, 53, 64, 75], [90, 80, 70, 60, 50, 40]
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    b_params = SamplingParams(temperature=0.9, seed=11, max_tokens=10, ignore_eos=True)

    def alone(prompt, params):
        core = EngineCore(make_executor(tiny_checkpoint, limits), async_scheduling=False)
        request = core.add_request(prompt, params)
        while core.has_work():
            core.step()
        return request.output_ids

    a_tokens = alone(a_prompt, greedy)
    stop_at = _first_new(a_tokens, 2)
    a_params = greedy.replace(stop_token_ids=(a_tokens[stop_at],))
    executor = make_executor(tiny_checkpoint, limits, kv_cache_blocks=1 + 5)  # one sequence
    recorder = Recorder(executor)
    core = EngineCore(executor, async_scheduling=True)  # on the CPU only when asked
    a, b = core.add_request(a_prompt, a_params), core.add_request(b_prompt, b_params)
    tables = {}
    while core.has_work():
        core.step()
        for r in (a, b):
            seq = core.scheduler.running.get(r.request_id)
            if seq is not None and r.request_id not in tables:
                tables[r.request_id] = set(executor.cache.allocator.tables[seq.slot].tolist())
    assert a.output_ids == a_tokens[:stop_at + 1] and a.finish_reason == "stop"
    assert b.output_ids == alone(b_prompt, b_params)
    assert tables[a.request_id] & tables[b.request_id]  # B got blocks that A had
    # A's stray row (its stop token, a placeholder, fed at its position while in flight) was
    # launched in a step before B's first write to the blocks
    stray = len(a_prompt) + stop_at
    b_first = next(i for i, s in enumerate(recorder.steps)
                   if any(c.start == 0 and c.tokens[0] == b_prompt[0] for c in s))
    assert any(c.start == stray and c.tokens == (PLACEHOLDER,)
               for s in recorder.steps[:b_first] for c in s), "no row was in flight at A's stop"
    assert_all_free(core, executor)


def test_abort_with_a_row_in_flight_releases_cleanly(tiny_checkpoint):
    ps = prompts(3, seed=2)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
    want = {}
    for mode in (False, True):
        executor = make_executor(tiny_checkpoint)
        core = EngineCore(executor, async_scheduling=mode)
        requests = [core.add_request(p, params) for p in ps]
        for _ in range(3):
            core.step()
        victim = requests[1]
        if mode:  # its next row is launched and its token not read yet
            assert victim.request_id in core._inflight.placeholders
        core.abort(victim.request_id)
        core.pop(victim.request_id)
        late = core.add_request(ps[1], params)  # may take its slot at once
        while core.has_work():
            core.step()
        want[mode] = [r.output_ids for r in (*requests, late)] + [victim.finish_reason]
        assert_all_free(core, executor)
    assert want[False] == want[True]
    assert want[True][-1] == "abort" and len(want[True][1]) == 3


def test_admission_is_stamped_by_the_overlapped_loops_scheduling(tiny_checkpoint):
    """One slot, two requests: the overlapped loop frees A's slot when it launches A's last
    row, so B is admitted by the next step's scheduling, after A's last launch (A's last but
    one token collected) and before B's first token; stamps come from both of its schedule
    calls (the pipeline's fill and each later step)."""
    limits = BuildLimits(max_batch_size=1, max_input_len=8, max_seq_len=20, max_num_tokens=16)
    core = EngineCore(make_executor(tiny_checkpoint, limits), async_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a, b = core.add_request([20, 31, 42], params), core.add_request([90, 80], params)
    while core.has_work():
        core.step()
    assert a.arrival_time <= a.admitted_time <= a.token_times[0]
    assert a.token_times[-2] <= b.admitted_time <= b.token_times[0]


def test_executors_without_device_feeds_keep_the_synchronous_loop(tmp_path, caplog):
    limits = BuildLimits(max_batch_size=2, max_input_len=8, max_seq_len=16, max_num_tokens=16)
    _, onnx = open_engine(toy_engine_dir(tmp_path / "engine", limits))
    assert not onnx.supports_async
    core = EngineCore(onnx)
    assert not core.async_scheduling
    request = core.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    while core.has_work():
        core.step()
    assert len(request.output_ids) == 3 and core._inflight is None
    with pytest.raises(RuntimeError, match="supports_async is False"):
        HashExecutor(limits, 64).step_logits([SequenceChunk(0, (1,), 0)],
                                             DeviceTokens(torch.zeros(1), {0: 0}))
    with caplog.at_level(logging.INFO, logger="kiln.runtime.core"):
        EngineCore(HashExecutor(limits, 64), async_scheduling=True)  # asked, cannot: said
    assert "synchronous loop" in caplog.text


@pytest.mark.gpu
def test_async_and_sync_agree_on_cuda(tiny_checkpoint):
    """The same workload (stop strings aside: no tokenizer here) on a CUDA GPU: CUDA-graph
    decode steps fed on the device, device sampling collected one step late."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    workload = [(p.replace(stop=()), t) for p, t in WORKLOAD]
    ps = prompts(len(workload))
    out = {}
    for mode in (False, True):
        # Triton's paged attention takes pages of 16 tokens or more
        executor = make_executor(tiny_checkpoint, device="cuda", page_size=16,
                                 kv_cache_blocks=1 + 4 * 4)
        assert executor.graphs is not None
        core = EngineCore(executor, async_scheduling=mode)
        out[mode] = run(core, workload, ps, abort=(ABORTED, ABORT_AFTER))
        assert_all_free(core, executor)
        executor.close()
    for i in range(len(workload)):
        assert same(out[False][i], out[True][i]), (i, out[False][i], out[True][i])
    assert {r.finish_reason for r in out[True].values()} == {"stop", "length", "abort"}


def _feature_rows() -> list[Row]:
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=5),
              SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
                             logprobs=2),
              SamplingParams(temperature=0, frequency_penalty=0.5)]
    return [Row(i, p, [1, 2, 3], [4, 4], lambda d, i=i: FakeDeviceGenerator(d, seed=i))
            for i, p in enumerate(params)]


def test_launched_sampling_reads_the_host_once_at_collect():
    """On an accelerator (emulated): launching reads nothing; collect reads once."""
    rows = _feature_rows()
    with OnDevice() as device:
        launched = launch_rows(torch.zeros(len(rows) + 1, 64, device="meta"), rows)
        assert device.reads == [] and launched.ids.shape == (len(rows) + 1,)
        picks = launched.collect()
    assert device.reads == ["tolist"] and all(p is not None for p in picks)


def test_launched_ids_are_the_collected_tokens():
    """Device-side ids (what the next step is fed) equal the tokens read at collect, with
    the torch path on CPU tensors and with the numpy path."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 64, generator=g)
    rows = [Row(r.index + 1, r.params, r.prompt_ids, r.output_ids,
                lambda d, i=r.index: FakeDeviceGenerator(d, seed=i)) for r in _feature_rows()]
    for launched in (launch_rows_torch(logits, rows), launch_rows(logits, rows)):
        picks = launched.collect()
        assert [launched.ids[r.index].item() for r in rows] == [p[0] for p in picks]


def test_async_is_the_default_only_where_it_overlaps(tiny_checkpoint):
    """The torch executor prefers async on CUDA only: on the CPU a step is computed as it is
    launched, and async would only make every token but the last wait one step longer."""
    executor = make_executor(tiny_checkpoint)
    assert executor.supports_async and not executor.prefers_async
    assert not EngineCore(executor).async_scheduling
    assert EngineCore(executor, async_scheduling=True).async_scheduling
    executor.close()
