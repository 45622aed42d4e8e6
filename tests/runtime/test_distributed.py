"""Tensor- and pipeline-parallel torch engines on the CPU (gloo, float32) against tp 1.

For every tiny variant (tests/models.py) and every layout its heads allow (tp 2, tp 4, pp 2,
tp 2 x pp 2), the engine run by the driver and its worker processes gives the tp 1 engine's
greedy tokens and, step by step, its last-token logits within 1e-4: one request alone, and
several requests of different lengths admitted mid-flight. Pipeline engines run each step in
micro-batches: one per stage by default, and also one (the stages one after the other) or more
than a step's chunks (one per chunk); tests/runtime/test_pipeline_micro_batches.py checks
that a stage sends each micro-batch without waiting for it. Worker processes cost seconds to
start, so the module shares one pool per world size; each engine opens on it and closes.

A world of one rank (the driver alone, over process groups of one rank) runs a tp 1 engine as
the plain TorchExecutor does: the gloo twin of the single-GPU NCCL test
(tests/gpu/test_distributed_gpu.py), through the same helper (:func:`one_rank_twins`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kiln.builder.api import build
from kiln.engine import read_manifest
from kiln.runtime.core import EngineCore
from kiln.runtime.distributed import DistributedExecutor, WorkerPool
from kiln.runtime.executor import Executor, SequenceChunk
from kiln.runtime.loader import ExecutorOptions, open_engine
from kiln.runtime.params import SamplingParams
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions
from kiln.runtime.torch_backend.paged_cache import KVCacheError
from kiln.runtime.torch_executor import load_executor
from tests.models import PROMPT, VARIANTS, hf_model, kiln_checkpoint, tp_sizes

LIMITS = dict(max_batch_size=4, max_input_len=24, max_seq_len=40, max_num_tokens=32)
LAYOUTS = [(2, 1), (4, 1), (1, 2), (2, 2)]  # (tp, pp)
OPTIONS = TorchExecutorOptions(page_size=8, collective_timeout_s=60)
GREEDY = SamplingParams(temperature=0, ignore_eos=True)
# (prompt length, max_tokens, step it arrives at): different lengths, two admitted mid-flight
INFLIGHT = [(5, 6, 0), (17, 4, 0), (9, 7, 2), (23, 5, 3)]


@pytest.fixture(scope="module")
def pools():
    made: dict[int, WorkerPool] = {}

    def get(world: int) -> WorkerPool:
        if world not in made:
            made[world] = WorkerPool(world, timeout_s=OPTIONS.collective_timeout_s)
        return made[world]

    yield get
    for pool in made.values():
        pool.shutdown()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    hf: dict = {}

    def get(name: str, tp: int = 1, pp: int = 1, **build_options):
        root = tmp_path_factory.mktemp(f"{name}-tp{tp}-pp{pp}")
        if name not in hf:
            hf[name] = hf_model(name, tmp_path_factory.mktemp(name) / "hf")
        ckpt = kiln_checkpoint(hf[name], root / "ckpt", tp=tp, pp=pp)
        build(ckpt, root / "engine", backend="torch", **{"dtype": "float32", **LIMITS,
                                                         **build_options})
        return root / "engine"
    return get


def open_on(pool: WorkerPool, engine_dir) -> DistributedExecutor:
    manifest = read_manifest(engine_dir)
    return DistributedExecutor.open(engine_dir, manifest, torch.device("cpu"), OPTIONS,
                                    pool=pool)


def open_single(engine_dir) -> TorchExecutor:
    _, executor = open_engine(engine_dir, ExecutorOptions(device="cpu"))
    return executor


class Recorder(Executor):
    """Any executor, with the last-token logits of every step kept."""

    def __init__(self, inner: Executor):
        self.inner, self.logits = inner, []
        self.limits, self.vocab_size = inner.limits, inner.vocab_size
        self.gathers_context_logits = inner.gathers_context_logits

    def step(self, chunks):
        return self.step_logits(chunks).last

    def step_logits(self, chunks, pending=None):
        out = self.inner.step_logits(chunks)
        self.logits.append(out.last.clone())
        return out

    def reserve(self, slot, num_tokens):
        return self.inner.reserve(slot, num_tokens)

    def release(self, slot):
        self.inner.release(slot)


def generate(executor: Executor, requests) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy outputs of ``requests`` ((prompt, max_tokens, arrival step)) and every step's
    logits, through the engine core (sync loop)."""
    recorder = Recorder(executor)
    added = drive(EngineCore(recorder, async_scheduling=False), requests, GREEDY)
    return [r.output_ids for r in added], recorder.logits


def drive(core: EngineCore, requests, params: SamplingParams) -> list:
    """Run ``requests`` ((prompt, max_tokens, arrival step)) under ``params`` to the end on
    ``core``, each added at its step; the requests."""
    pending, added, step = list(requests), [], 0
    while pending or core.has_work():
        while pending and pending[0][2] <= step:
            prompt, max_tokens, _ = pending.pop(0)
            added.append(core.add_request(prompt, params.replace(max_tokens=max_tokens)))
        core.step()
        step += 1
    return added


def workloads(vocab: int) -> dict[str, list]:
    g = torch.Generator().manual_seed(7)
    inflight = [(torch.randint(0, vocab, (n,), generator=g).tolist(), m, at)
                for n, m, at in INFLIGHT]
    return {"alone": [(PROMPT, 6, 0)], "in-flight": inflight}


def run_all(executor: Executor) -> dict[str, tuple]:
    return {what: generate(executor, requests)
            for what, requests in workloads(executor.vocab_size).items()}


def run_on_host(executor: Executor) -> dict[str, tuple]:
    """:func:`run_all` with the logits copied to the host (they outlive the executor)."""
    return {what: (tokens, [x.cpu() for x in logits])
            for what, (tokens, logits) in run_all(executor).items()}


def assert_same_outputs(got: dict[str, tuple], want: dict[str, tuple], tolerance: float,
                        *where) -> None:
    """The same greedy tokens per workload, and every step's logits within ``tolerance``."""
    assert got.keys() == want.keys()
    for what, (tokens, logits) in want.items():
        assert got[what][0] == tokens, (*where, what)
        assert len(got[what][1]) == len(logits), (*where, what)
        error = max(float((a - b).abs().max()) for a, b in zip(got[what][1], logits,
                                                               strict=True))
        assert error <= tolerance, (*where, what, error)


def one_rank_twins(engine_dir: Path, device: torch.device, options: TorchExecutorOptions,
                   ) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """A tp 1 x pp 1 engine run by the plain TorchExecutor, then by the multi-rank driver over
    a world of one rank (no worker process; gloo groups on the CPU, NCCL on a GPU), with the
    same options: their :func:`run_on_host` outputs (plain, driver). Checks on the way that
    every step of the driver went out as a plan, that the collectives the forward of a larger
    world calls run over the world of one (its forward calls none but the KV-cache size
    all-reduce), and that closing leaves no thread of the pool running."""
    manifest = read_manifest(engine_dir)
    plain = load_executor(engine_dir, manifest, ExecutorOptions(device=device.type), options)
    try:
        assert type(plain) is TorchExecutor
        want = run_on_host(plain)
    finally:
        plain.close()
    driver = DistributedExecutor.open(engine_dir, manifest, device, options)
    try:
        pool, comm = driver.pool, driver.shard.comm
        assert pool.world_size == 1 and not pool.processes
        assert comm.groups.backend == ("nccl" if device.type == "cuda" else "gloo")
        assert comm.groups.world.size() == 1 and comm.tp is comm.groups.world
        got = run_on_host(driver)
        assert pool.steps_sent == sum(len(logits) for _, logits in got.values())
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(driver.local.device)
        assert torch.equal(comm.all_reduce(x.clone()), x)
        assert torch.equal(comm.gather_vocab(x), x)
        assert comm.min_over_world(7) == 7
    finally:
        driver.close()
    assert pool.groups is None and not pool._monitor.is_alive()
    return want, got


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parallel_engines_give_the_tokens_and_logits_of_tp1(name, engines, pools):
    single = open_single(engines(name))
    want = run_all(single)
    single.close()
    layouts = [(tp, pp) for tp, pp in LAYOUTS if tp in tp_sizes(name)]
    for tp, pp in layouts:
        executor = open_on(pools(tp * pp), engines(name, tp, pp))
        try:
            got = run_all(executor)
        finally:
            executor.close()
        assert_same_outputs(got, want, 1e-4, tp, pp)


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_pipeline_engines_give_tp1s_outputs_with_any_micro_batch_count(micro_batches, engines,
                                                                      pools):
    single = open_single(engines("llama-gqa"))
    want = run_all(single)
    single.close()
    options = dataclasses.replace(OPTIONS, micro_batches=micro_batches)
    for tp, pp in [(1, 2), (2, 2)]:
        engine = engines("llama-gqa", tp, pp)
        executor = DistributedExecutor.open(engine, read_manifest(engine), torch.device("cpu"),
                                            options, pool=pools(tp * pp))
        try:
            got = run_all(executor)
        finally:
            executor.close()
        assert_same_outputs(got, want, 1e-4, tp, pp, micro_batches)


def decode(executor: Executor, async_scheduling: bool, requests, params) -> list[list[int]]:
    """Outputs of ``requests`` under ``params`` through the engine core's sync or async
    loop (:func:`drive`)."""
    core = EngineCore(executor, async_scheduling=async_scheduling)
    assert core.async_scheduling == async_scheduling
    return [r.output_ids for r in drive(core, requests, params)]


@pytest.mark.parametrize("tp,pp,micro_batches", [(2, 1, None), (1, 2, None), (2, 2, None),
                                                 (1, 2, 4), (2, 2, 2)])
def test_async_scheduling_gives_the_sync_loops_tokens(tp, pp, micro_batches, engines, pools,
                                                      monkeypatch):
    """The async loop over a multi-rank engine (the previous step's sampled ids broadcast from
    the driver to every rank, never read to the host first) gives the sync loop's tokens:
    greedy and seeded sampling, requests admitted mid-flight, pipeline steps whole and in
    micro-batches (each takes its share of the fed rows)."""
    engine = engines("llama-gqa", tp, pp)
    options = dataclasses.replace(OPTIONS, micro_batches=micro_batches)
    executor = DistributedExecutor.open(engine, read_manifest(engine), torch.device("cpu"),
                                        options, pool=pools(tp * pp))
    sent = []
    send_all = executor.pool.send_all
    monkeypatch.setattr(executor.pool, "send_all", lambda m: (sent.append(m), send_all(m)))
    try:
        assert not executor.prefers_async  # opt-in until measured on GPUs
        requests = workloads(executor.vocab_size)["in-flight"]
        for params in (GREEDY, SamplingParams(temperature=1.0, top_k=20, seed=5,
                                              ignore_eos=True)):
            sync = decode(executor, False, requests, params)
            steps = [m for m in sent if m[0] == "step"]
            assert steps and all(len(m) == 3 for m in steps)  # the plan alone
            sent.clear()
            assert decode(executor, True, requests, params) == sync, params
            fed = [m[3] for m in sent if m[0] == "step" and len(m) == 4]
            assert fed and all(rows >= len(feeds) > 0 for rows, feeds in fed)
            sent.clear()
    finally:
        executor.close()


@pytest.mark.parametrize("name", ["llama-mha-headdim-bias", "falcon-40b-gqa"])
def test_a_bfloat16_tp2_engine_rounds_its_sums_once_as_tp1(name, engines, pools):
    """A 16-bit engine's row-parallel partial sums cross the all-reduce in float32 and are
    rounded once, as tp 1 rounds its whole sum: tp 1's logits to 1e-3 (the same bits in
    practice, on a model whose logits stay under 1). Each rank's rounded partial had been
    2.2e-3 to 3.9e-3 away here, and made an 8B-shaped bfloat16 tp 2 leave tp 1's greedy
    tokens on an H200. With biases (added by rank 0 alone) and a parallel-residual block
    (one all-reduce of both partials)."""
    single = open_single(engines(name, dtype="bfloat16"))
    try:
        want = run_all(single)
    finally:
        single.close()
    executor = open_on(pools(2), engines(name, 2, dtype="bfloat16"))
    try:
        assert_same_outputs(run_all(executor), want, 1e-3, name)
    finally:
        executor.close()


def test_a_quantized_tp2_engine_gives_the_tokens_and_logits_of_tp1(tmp_path, pools):
    """int8_sq with an int8 KV cache: static input scales and per-channel weight scales shard
    with their weights (a row-parallel weight's scales are whole), so tp 2 is tp 1's numerics."""
    from tests.builder.quantized import quantize_checkpoint

    src = kiln_checkpoint(hf_model("llama-mha-headdim-bias", tmp_path / "hf"), tmp_path / "ckpt")
    outs = []
    for tp in (1, 2):
        ckpt = quantize_checkpoint(src, tmp_path / f"q{tp}", "int8_sq", tp=tp,
                                   kv_cache_dtype="int8")
        build(ckpt, tmp_path / f"e{tp}", backend="torch", dtype="float32", **LIMITS)
        executor = open_single(tmp_path / "e1") if tp == 1 else open_on(pools(2), tmp_path / "e2")
        try:
            outs.append(run_all(executor))
        finally:
            executor.close()
    assert_same_outputs(outs[1], outs[0], 1e-4)


def test_a_world_of_one_rank_gives_the_plain_executors_tokens_and_logits(engines):
    """The driver's path with one rank, on gloo: same kernels, same options, same cache
    size, so the logits agree to 1e-5 (in practice exactly)."""
    want, got = one_rank_twins(engines("llama-gqa"), torch.device("cpu"), OPTIONS)
    assert_same_outputs(got, want, 1e-5)


def test_context_logits_come_back_from_the_last_stage(engines, pools):
    """Prompt logprobs' context logits: gathered over the vocab on the last stage, sent to the
    driver, split per chunk (the step runs in two micro-batches: the first chunk, then the
    other two)."""
    single = open_single(engines("llama-gqa", gather_context_logits=True))
    executor = open_on(pools(4), engines("llama-gqa", 2, 2, gather_context_logits=True))
    try:
        outs = []
        for ex in (single, executor):
            assert ex.reserve(1, 12) and ex.reserve(2, 7)
            chunks = [SequenceChunk(1, PROMPT, 0, context_logits=True),
                      SequenceChunk(2, PROMPT[:3], 0),
                      SequenceChunk(3, PROMPT[4:9], 0, context_logits=True)]
            assert ex.reserve(3, 5)
            outs.append(ex.step_logits(chunks))
    finally:
        executor.close()
        single.close()
    want, got = outs
    assert sorted(got.context) == [0, 2]
    assert float((got.last - want.last).abs().max()) <= 1e-4
    for i in (0, 2):
        assert got.context[i].shape == want.context[i].shape
        assert float((got.context[i] - want.context[i]).abs().max()) <= 1e-4


def test_an_invalid_step_is_refused_before_any_worker_runs_it(engines, pools):
    executor = open_on(pools(2), engines("llama-gqa", 2, 1))
    try:
        assert executor.reserve(0, 8)
        with pytest.raises(RuntimeError, match="starts at 3"):
            executor.step([SequenceChunk(0, [1, 2], 3)])
        got = executor.step([SequenceChunk(0, PROMPT[:5], 0)])  # the ranks still agree
        assert got.shape == (1, 128) and not executor.pool.failed
    finally:
        executor.close()


def test_a_step_the_cache_cannot_hold_leaves_every_rank_with_the_same_blocks(engines, pools):
    """Slot 0 grows into the last free block, then slot 2 finds none: the step is refused on
    the driver, and the block slot 0 took is replayed on the workers, so their reserve()
    answers stay the driver's (a worker whose answer differed would fail the engine)."""
    options = dataclasses.replace(OPTIONS, kv_cache_blocks=1 + 7)  # 5 blocks of 8 per 40 tokens
    engine = engines("llama-gqa", 2, 1)
    executor = DistributedExecutor.open(engine, read_manifest(engine), torch.device("cpu"),
                                        options, pool=pools(2))
    try:
        assert executor.reserve(0, 8) and executor.reserve(1, 40)  # 6 of 7 blocks
        executor.step([SequenceChunk(0, PROMPT[:8], 0)])
        with pytest.raises(KVCacheError, match="slot 2"):
            executor.step([SequenceChunk(0, PROMPT[8:10], 8), SequenceChunk(2, [5] * 8, 0)])
        assert not executor.reserve(2, 8)  # the workers replay: no block left there either
        executor.release(1)
        assert executor.reserve(2, 8) and executor.reserve(3, 24)
        got = executor.step([SequenceChunk(0, PROMPT[8:10], 8), SequenceChunk(2, [5] * 8, 0)])
        assert got.shape == (2, 128) and not executor.pool.failed
    finally:
        executor.close()


def test_a_worker_freezes_its_process_once_its_engine_is_ready_and_thaws_it_on_close(
        monkeypatch):
    """A rank's process serves nothing else: a full collection there would hold up every rank's
    collectives (kiln.runtime.core.freeze_loaded_objects); the pool may open another engine."""
    import gc
    from types import SimpleNamespace

    from kiln.runtime.distributed import worker

    class End:
        def __init__(self):
            self.sent = []

        def send(self, message):
            self.sent.append((message[0], gc.get_freeze_count()))

    class Closing:
        def close(self):
            pass

    monkeypatch.setattr(worker, "build_executor", lambda *args: Closing())
    end = End()
    w = worker.Worker(end, groups=None, rank=1)
    shard = SimpleNamespace(last_stage=True, tp_rank=1)
    w.pending = (Path("engine"), None, torch.device("cpu"), None, shard, {})
    w.build()
    w.close()
    (ready, frozen), (closed, after) = end.sent
    assert (ready, closed) == ("ready", "closed") and frozen > 0 and after == 0


def test_a_drivers_step_is_a_new_float32_tensor():
    """RankDriver.step keeps Executor.step's contract where rank 0's executor returns a decode
    graph's logits (GPU, tp > 1: the model dtype, in the static buffer the next replay
    overwrites; the GPU tests' Recorder cloned them, which hid it)."""
    from kiln.runtime.distributed.driver import RankDriver
    from kiln.runtime.executor import StepLogits

    graph_buffer = torch.arange(8, dtype=torch.bfloat16)[None]

    class Pool:
        def check(self):
            pass

        def send_all(self, message):
            pass

    class Graphs(RankDriver):
        def _run_local(self, chunks, pending):
            return StepLogits(graph_buffer, {}, greedy=object())

    local = type("Local", (), dict(limits=LIMITS, vocab_size=8, gathers_context_logits=False))
    driver = Graphs(Pool(), local(), torch.device("cpu"), owns_pool=False)
    got = driver.step([SequenceChunk(0, (1,), 0)])
    assert got.dtype == torch.float32 and torch.equal(got, graph_buffer.float())
    graph_buffer.zero_()  # the next replay
    assert got.sum() == 28

