"""Data-parallel replicas (``dp``) on the CPU: N replica processes of a tp 1 torch engine behind
one front give each request what one engine gives it; a replica that dies ends the run with one
line naming it and leaves no process; what cannot run as replicas is refused before anything
starts. Replica processes cost seconds to start, so the module shares one pair of them. The
engine in a process of its own (``engine_process``) is the same front over one replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import re
import signal
import threading
import time
from unittest import mock

import pytest
from click.testing import CliRunner

from kiln.builder.api import build
from kiln.cli.main import main
from kiln.engine import EngineError, read_manifest
from kiln.errors import Wording, limits_as_options, worded, wording
from kiln.runtime import LLM, AsyncLLM, ExecutorOptions, SamplingParams
from kiln.runtime.bench import Workload, run_benchmark
from kiln.runtime.compat import MachineInfo
from kiln.runtime.errors import RequestError, WorkerError
from kiln.runtime.loader import check_engine, open_engine
from tests.models import hf_model, kiln_checkpoint
from tests.runtime.test_distributed_faults import alive, write_char_tokenizer

# two slots per replica: six requests make the front hold some until a slot frees
LIMITS = dict(max_batch_size=2, max_input_len=24, max_seq_len=48, max_num_tokens=32)
PROMPTS = ["Hi", "The quick brown fox", "a", "Once upon a time, far", "0123456789",
           "xyz?"]
MAX_TOKENS = [7, 3, 9, 5, 6, 8]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    hf = hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "hf")
    made = {}

    def get(tp: int = 1):
        if tp not in made:
            root = tmp_path_factory.mktemp(f"tp{tp}")
            build(kiln_checkpoint(hf, root / "ckpt", tp=tp), root / "engine", backend="torch",
                  dtype="float32", **LIMITS)
            write_char_tokenizer(root / "engine")
            made[tp] = root / "engine"
        return made[tp]
    return get


@pytest.fixture(scope="module")
def single(engines):
    with LLM(engines(), ExecutorOptions(device="cpu")) as llm:
        yield llm


@pytest.fixture(scope="module")
def replicas(engines):
    with LLM(engines(), ExecutorOptions(device="cpu", dp=2)) as llm:
        yield llm


def params(**kwargs) -> list[SamplingParams]:
    return [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n, **kwargs)
            for n in MAX_TOKENS]


def test_dp2_gives_each_request_the_tokens_of_one_replica(replicas, single):
    served = list(replicas.core.served)
    got = replicas.generate(PROMPTS, params(logprobs=2))
    want = single.generate(PROMPTS, params(logprobs=2))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [len(r.token_ids) for r in got] == MAX_TOKENS
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.finish_reason for r in got] == ["length"] * len(PROMPTS)
    for a, b in zip(got, want, strict=True):
        assert [x.token_id for x in a.logprobs] == [x.token_id for x in b.logprobs]
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs],
                                                                abs=1e-5)
        assert len(a.timings.token_times) == len(a.token_ids)
    routed = [now - before for now, before in zip(replicas.core.served, served, strict=True)]
    assert sum(routed) == len(PROMPTS) and min(routed) >= 2  # both replicas worked
    assert not replicas.core.has_work() and not replicas.core.requests


def test_queue_time_through_the_front_counts_the_wait_for_a_replica_slot(replicas):
    """Four slots (two replicas of two), six requests: four are admitted at once, the last two
    wait in the front until a request has finished. A one-token request, which finishes in the
    step that admits it, has its admission too."""
    timings = [r.timings for r in replicas.generate(PROMPTS, params())]
    for t in timings:
        assert t.arrival <= t.admitted <= t.token_times[0]
    assert all(t.admitted >= min(s.finished for s in timings[:4]) for t in timings[4:])
    (one,) = replicas.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=1))
    assert one.timings.arrival <= one.timings.admitted <= one.timings.finished


def test_each_replica_is_asked_to_warm_itself_up(replicas, single, caplog):
    """On the CPU each replica answers that it needs none (kiln.runtime.warm_up)."""
    with caplog.at_level("INFO", logger="kiln.runtime.llm"):
        replicas.warm_up()
    assert "no warm-up: the engine runs on the CPU" in caplog.text
    assert not replicas.core.has_work() and not replicas.core.scheduler.running
    got, want = replicas.generate(PROMPTS, params()), single.generate(PROMPTS, params())
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_stop_strings_streaming_and_abort_through_the_front(replicas, single):
    stop = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12)
    want = single.generate(PROMPTS[:3], stop)
    cut = want[1].text[2:4]  # a stop string the second prompt's output holds
    stopped = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, stop=(cut,))
    assert replicas.generate(PROMPTS[1], stopped)[0].text == single.generate(PROMPTS[1],
                                                                              stopped)[0].text
    streamed = {}
    for delta in replicas.generate_stream(PROMPTS[:3], stop):
        streamed[delta.index] = streamed.get(delta.index, "") + delta.text
    assert [streamed[i] for i in range(3)] == [r.text for r in want]

    async def submit_abort_and_finish():
        async with AsyncLLM(replicas) as engine:
            kept = await engine.submit(PROMPTS[0], stop)
            dropped = await engine.submit(PROMPTS[3], SamplingParams(max_tokens=40,
                                                                     ignore_eos=True))
            await engine.abort(dropped)
            last = [d async for d in engine.stream(dropped)][-1]
            result = [d async for d in engine.stream(kept)][-1].result
            return last.finish_reason, result

    reason, result = asyncio.run(submit_abort_and_finish())
    assert reason == "abort" and result.token_ids == want[0].token_ids
    assert not replicas.core.scheduler.running and not replicas.core.has_work()


def test_an_aborted_requests_id_can_be_reused_at_once(replicas, single):
    """Tokens of the aborted request still on their way are not the new request's."""
    core, greedy = replicas.core, SamplingParams(temperature=0, ignore_eos=True, max_tokens=8)
    core.add_request([5, 6, 7], greedy, request_id="again")
    while not core.requests["again"].output_ids:
        core.step()
    time.sleep(0.3)  # the replica steps on: more of its tokens wait in the pipe
    core.abort("again")
    core.pop("again")
    core.add_request([9, 9], greedy, request_id="again")
    streamed: list[int] = []
    while "again" not in core.requests or not core.requests["again"].finished:
        for delta in core.step():
            streamed += delta.token_ids
    done = core.pop("again")
    want = single.generate([[9, 9]], greedy)[0].token_ids
    assert tuple(streamed) == tuple(done.output_ids) == want
    assert len(done.token_times) == 8


def test_requests_are_checked_in_the_front_as_one_engine_checks_them(replicas, single):
    for llm in (replicas, single):
        with pytest.raises(RequestError) as info:
            llm.core.add_request(list(range(1, 30)), SamplingParams(), request_id="long")
        assert str(info.value) == ("request long: prompt of 29 tokens exceeds the engine's "
                                   "max_input_len 24; shorten it, or build with a larger "
                                   "max_input_len (kiln.build, or beside LLM(model=...))")
    assert replicas.limits.max_batch_size == 4 and replicas.limits.max_input_len == 24
    assert replicas.executor is None and replicas.gathers_context_logits is False


def test_kiln_run_with_dp2_and_the_benchmark_over_replicas(engines, replicas, single):
    result = CliRunner().invoke(main, ["run", "--engine_dir", str(engines()), "--device", "cpu",
                                       "--dp", "2", "--max_output_len", "5", "--ignore_eos",
                                       *[a for p in PROMPTS[:4] for a in ("--input_text", p)]],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    want = single.generate(PROMPTS[:4], SamplingParams(temperature=0, ignore_eos=True,
                                                       max_tokens=5))
    assert result.stdout == "".join(f"[{i}]\n{r.text}\n" for i, r in enumerate(want, 1))
    report = run_benchmark(replicas.core, Workload(input_len=4, output_len=3, num_requests=5))
    assert report.output_tokens == 15 and report.ttft_ms.mean > 0


def test_a_check_said_by_the_front_is_not_said_again_by_each_replica(engines, capfd, caplog):
    with caplog.at_level("INFO"):  # the replicas' level: they log their loads at INFO
        result = CliRunner().invoke(main, ["run", "--engine_dir", str(engines()),
                                           "--device", "cpu", "--dp", "2", "--max_output_len",
                                           "2", "--input_text", "a",
                                           "--kv_cache_free_gpu_memory_fraction", "0.5",
                                           "--prefill_attention", "kiln"],
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.output
    replicas = capfd.readouterr().err  # they log to this process's fd 2
    assert "[replica 1]" in replicas
    for message in ("kv_cache_free_gpu_memory_fraction has no effect on the CPU",
                    "prefill_attention has no effect on the CPU",
                    "torch engine on the CPU: PyTorch reference kernels, the slow path"):
        assert sum(message in m for m in caplog.messages) == 1, message  # the front's
        assert message not in replicas


def test_a_killed_replica_ends_the_run_within_seconds_naming_it(engines):
    llm = LLM(engines(), ExecutorOptions(device="cpu", dp=2))
    processes = llm.core.pool.processes
    at = []
    timer = threading.Timer(1.0, lambda: (at.append(time.monotonic()), processes[1].kill()))
    timer.start()
    try:
        with pytest.raises(WorkerError) as info:
            for _ in range(100_000):
                while len(llm.core.requests) < 4:
                    llm.core.add_request([5, 6, 7], SamplingParams(ignore_eos=True,
                                                                   max_tokens=40))
                for delta in llm.core.step():
                    if delta.finished:
                        llm.core.pop(delta.request_id)
    finally:
        timer.cancel()
    assert time.monotonic() - at[0] < 10
    assert re.fullmatch(r"replica 1 \(pid \d+\) died: killed by SIGKILL \(sent by a user, or by "
                        r"the kernel's OOM killer when memory ran out\); the other replicas were "
                        r"stopped", str(info.value)), str(info.value)
    assert not any(alive(p.pid) for p in processes)
    with pytest.raises(WorkerError, match="replica 1"):  # the engine stays failed
        llm.core.step()
    llm.close()


def test_what_cannot_run_as_replicas_is_refused_before_anything_starts(engines, caplog):
    engine = engines()
    one_gpu = MachineInfo(kiln_version=read_manifest(engine).kiln_version, gpus=((9, 0),))
    with pytest.raises(EngineError) as info:
        check_engine(engine, ExecutorOptions(device="cuda", dp=2), machine=one_gpu)
    assert str(info.value) == ("dp=2 needs 2 GPUs (one replica per GPU), and this machine has "
                               "1 visible; run with dp=1, or where 2 GPUs are visible")
    two_gpus = MachineInfo(kiln_version=one_gpu.kiln_version, gpus=((9, 0), (9, 0)))
    with pytest.raises(EngineError) as info:
        check_engine(engines(tp=2), ExecutorOptions(device="cuda", dp=2), machine=two_gpus)
    assert str(info.value) == ("dp=2 runs copies of a single-rank engine, and this engine has "
                               "2 ranks (tp 2 x pp 1); run it with dp=1, or build a tp 1 x "
                               "pp 1 engine (kiln convert_checkpoint --tp_size 1 --pp_size 1) "
                               "for data parallelism")  # (a retest's pp 3 had been told tp 1)
    with pytest.raises(EngineError, match="open_engine opens one executor in this process, "
                                          "and dp is 2"):
        open_engine(engine, ExecutorOptions(device="cpu", dp=2))
    with pytest.raises(EngineError, match="and engine_process is set"):
        open_engine(engine, ExecutorOptions(device="cpu", engine_process=True))
    with pytest.raises(EngineError) as info:
        check_engine(engines(tp=2), ExecutorOptions(device="cpu", engine_process=True))
    assert str(info.value) == ("engine_process runs a single-rank engine in a process of its "
                               "own, and this engine has 2 ranks (tp 2 x pp 1), whose model "
                               "steps already run in rank processes; leave engine_process out")
    with caplog.at_level(logging.WARNING), pytest.raises(EngineError, match="dp=2 runs"):
        check_engine(engines(tp=2), ExecutorOptions(device="cpu", dp=2))
    assert "slow path" not in caplog.text  # a trial: the CPU warning came before the refusal
    for args in (["run", "--input_text", "Hi"], ["bench", "--num_requests", "2"]):
        result = CliRunner().invoke(main, [*args, "--engine_dir", str(engines(tp=2)), "--device",
                                           "cpu", "--dp", "2"])
        assert result.exit_code == 2
        assert result.output.startswith("error: --dp 2 runs copies of a single-rank engine")


def test_engine_process_with_dp_is_refused_by_the_api_as_by_kiln_serve(engines, monkeypatch):
    """kiln serve refused --dp 2 --engine_process (its replicas run in processes of their own
    already), while LLM(engine_dir, ExecutorOptions(dp=2, engine_process=True)) started the two
    replicas and never read the flag: the options refuse it now, for both, in one line (each
    naming the options as it takes them)."""
    with pytest.raises(EngineError) as info:
        LLM(engines(), ExecutorOptions(device="cpu", dp=2, engine_process=True))
    assert str(info.value) == ("dp=2 runs every replica in a process of its own already; "
                               "leave engine_process out")

    def bind(host, port):  # refused before: a server that got this far would serve forever
        raise AssertionError("kiln serve bound its address")

    monkeypatch.setattr("kiln.cli.serve._bind", bind)
    result = CliRunner().invoke(main, ["serve", "--engine_dir", str(engines()), "--device", "cpu",
                                       "--dp", "2", "--engine_process"])
    assert (result.exit_code, result.output) == (
        2, "error: --dp 2 runs every replica in a process of its own already; leave "
           "--engine_process out\n")


def test_cpu_replicas_beyond_the_host_memory_are_refused_before_any_starts(engines,
                                                                           monkeypatch):
    from kiln.runtime import loader

    engine = engines()
    each = loader.replica_host_bytes(read_manifest(engine))
    assert each > sum(read_manifest(engine).sizes.values()) > 0  # files and a KV cache
    monkeypatch.setattr(loader, "available_memory", lambda: 3 * each + 1)
    check_engine(engine, ExecutorOptions(device="cpu", dp=3))  # fits
    with pytest.raises(EngineError) as info:
        check_engine(engine, ExecutorOptions(device="cpu", dp=100))
    assert re.fullmatch(r"dp=100: 100 CPU replicas of this engine need up to \S+ [KMG]iB "
                        r"of host memory \(\S+ [KMG]iB each, its files and a full KV cache\), "
                        r"and \S+ [KMG]iB is available; run with dp=3 or fewer",
                        str(info.value)), \
        str(info.value)
    monkeypatch.setattr(loader, "available_memory", lambda: each)
    with pytest.raises(EngineError, match="run without dp, or rebuild with a smaller "
                                          "max_batch_size or max_seq_len"):  # Python's names
        check_engine(engine, ExecutorOptions(device="cpu", dp=2))
    result = CliRunner().invoke(main, ["run", "--input_text", "Hi", "--engine_dir", str(engine),
                                       "--device", "cpu", "--dp", "2"])
    assert result.exit_code == 2 and result.output.startswith("error: --dp 2: 2 CPU replicas")


def test_a_warning_of_the_checks_is_said_once_for_all_replicas(tmp_path, caplog, capfd):
    """cpu_spin_wait on an onnx engine of two parts: warned of by the front, not again by each
    replica (a trial had it once per --dp replica)."""
    from kiln.engine import BuildLimits
    from tests.runtime.toy_onnx import toy_engine_dir

    engine = toy_engine_dir(tmp_path / "engine", BuildLimits(**LIMITS), parts=2)
    write_char_tokenizer(engine)
    with caplog.at_level(logging.WARNING), \
            LLM(engine, ExecutorOptions(device="cpu", dp=2, cpu_spin_wait=True)) as llm:
        assert len(llm.generate([[1, 2, 3]] * 2, SamplingParams(max_tokens=2))) == 2
    said = caplog.text + capfd.readouterr().err
    assert said.count("cpu_spin_wait with an engine of 2 parts") == 1, said


def test_a_replica_that_dies_while_the_others_start_stops_the_start(engines, monkeypatch):
    """Replicas start one after another; one that died meanwhile (the OOM killer, under a large
    --dp) is named at once instead of after every other replica has started."""
    import os
    import signal

    from kiln.runtime.distributed import replicas

    started = []

    def start_killing_the_first(process):
        if started:  # replica 0 dies before replica 1 starts
            os.kill(started[0].pid, signal.SIGKILL)
            started[0].join(10)
        replicas_start(process)
        started.append(process)

    replicas_start = replicas.start
    monkeypatch.setattr(replicas, "start", start_killing_the_first)
    with pytest.raises(WorkerError, match=r"replica 0 \(pid \d+\) died: killed by SIGKILL"):
        LLM(engines(), ExecutorOptions(device="cpu", dp=3))
    assert len(started) == 2  # replica 2 never started
    assert not any(alive(p.pid) for p in started)


def test_replicas_of_an_llm_dropped_without_close_exit(engines):
    from tests.runtime.test_distributed_faults import wait_gone

    llm = LLM(engines(), ExecutorOptions(device="cpu", dp=2))
    pids = [p.pid for p in llm.core.pool.processes]
    del llm
    assert wait_gone(pids)


@pytest.fixture(scope="module")
def engine_process(engines):
    with LLM(engines(), ExecutorOptions(device="cpu", engine_process=True)) as llm:
        yield llm


def test_the_engine_in_its_own_process_gives_what_it_gives_in_this_one(engine_process, single):
    assert engine_process.executor is None and engine_process.core.pool.size == 1
    assert engine_process.limits == single.limits
    sampled = [SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=n, ignore_eos=True)
               for i, n in enumerate(MAX_TOKENS)]
    for plist in (params(logprobs=2), sampled):
        got, want = engine_process.generate(PROMPTS, plist), single.generate(PROMPTS, plist)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.text for r in got] == [r.text for r in want]

    async def stream_while_others_run():
        async with AsyncLLM(engine_process) as engine:
            results = await asyncio.gather(*(engine.generate(prompt, p) for prompt, p
                                             in zip(PROMPTS, params(), strict=True)))
            return [r.token_ids for r in results]

    assert asyncio.run(stream_while_others_run()) == [r.token_ids for r in
                                                      single.generate(PROMPTS, params())]
    assert not engine_process.core.has_work() and not engine_process.core.scheduler.running


def test_a_wake_ends_the_fronts_wait_for_the_engine_process_at_once(engine_process):
    """AsyncLLM wakes the front whenever it queues a command, so a request submitted while the
    engine thread waits for the engine process's next message is routed now, not after it."""
    pool, returned = engine_process.core.pool, []
    pool.receive(0)  # a wake-up an earlier AsyncLLM left pending: cleared
    waiter = threading.Thread(target=lambda: returned.append(pool.receive(30.0)))
    start = time.monotonic()
    waiter.start()
    time.sleep(0.2)
    assert not returned  # the idle engine process sends nothing: the wait goes on
    for _ in range(100_000):  # many wake-ups before the next wait: the pipe never blocks
        engine_process.core.wake()
    waiter.join(5.0)
    assert returned == [[]] and time.monotonic() - start < 5.0
    (result,) = engine_process.generate(PROMPTS[0], params()[0])  # still serves
    assert len(result.token_ids) == MAX_TOKENS[0]


def test_a_killed_engine_process_is_named_as_such(engines):
    llm = LLM(engines(), ExecutorOptions(device="cpu", engine_process=True))
    (process,) = llm.core.pool.processes
    llm.core.add_request([5, 6, 7], SamplingParams(ignore_eos=True, max_tokens=40))
    process.kill()
    with pytest.raises(WorkerError) as info:
        for _ in range(1000):
            llm.core.step()
    assert re.fullmatch(r"the engine process \(pid \d+\) died: killed by SIGKILL \(sent by a "
                        r"user, or by the kernel's OOM killer when memory ran out\)",
                        str(info.value)), str(info.value)
    llm.close()


def test_an_engine_process_that_dies_while_idle_fails_the_engine_at_once(engines):
    """Nothing steps while the server is idle: the engine thread checks the process itself,
    so health turns False and a later request's stream raises the failure (it did not hang
    with a core spinning: the front had no replica to receive from)."""
    llm = LLM(engines(), ExecutorOptions(device="cpu", engine_process=True))
    (process,) = llm.core.pool.processes

    async def scenario():
        async with AsyncLLM(llm) as engine:
            assert engine.healthy()
            process.kill()
            deadline = time.monotonic() + 10
            while engine.healthy() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not engine.healthy()
            rid = await engine.submit(PROMPTS[0], params()[0])
            with pytest.raises(WorkerError, match=r"the engine process \(pid \d+\) died"):
                async for _ in engine.stream(rid):
                    pass

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert isinstance(llm.error, WorkerError)
    llm.close()


def test_a_request_routed_to_a_dead_engine_process_is_not_lost(engines):
    """The front's send to a process that died fails; the step then names the death instead
    of returning nothing for ever."""
    llm = LLM(engines(), ExecutorOptions(device="cpu", engine_process=True))
    (process,) = llm.core.pool.processes
    process.kill()
    process.join()
    llm.core.add_request([5, 6, 7], SamplingParams(max_tokens=4))
    with pytest.raises(WorkerError, match="the engine process"):
        for _ in range(200):  # 50 ms a step at most: 10 s
            llm.core.step()
    llm.close()


def test_a_bad_engine_dir_is_named_before_the_tokenizer(tmp_path):
    for options in (ExecutorOptions(device="cpu", engine_process=True),
                    ExecutorOptions(device="cpu", dp=2)):
        with pytest.raises(EngineError, match="no such engine directory"):
            LLM(tmp_path / "nosuch", options)


@pytest.mark.parametrize("given", [Wording(), Wording(as_flags=True),
                                   Wording(limits_as_options=True)])
def test_a_replica_words_its_messages_as_its_driver_does(tmp_path, monkeypatch, given):
    """A retest: kiln serve's engine thread told a too-long prompt of kiln.build's keyword, not
    --max_input_len; a replica process (kiln serve --dp 2) is told how its driver words options
    and limits, and runs its engine so (kiln.errors.wording)."""
    from kiln.runtime.distributed import replica_worker, replicas

    started = []

    def start(process):
        started.append(pickle.loads(process._args[3]))  # (spawned's payload)
        raise RuntimeError("not started")

    monkeypatch.setattr(replicas, "start", start)
    with worded(given), pytest.raises(RuntimeError, match="not started"):
        replicas.ReplicaPool(tmp_path, ExecutorOptions(device="cpu"), None, False, [None])
    assert [spec.wording for spec in started] == [given]

    seen = []

    class Replica:
        def __init__(self, spec, conn):
            seen.append(wording())

        def serve(self):
            pass

    monkeypatch.setattr(replica_worker, "_Replica", Replica)
    monkeypatch.setattr(replica_worker.os, "_exit", lambda code: None)
    replica_worker.main(started[0], mock.Mock())
    assert seen == [given] and wording() == Wording()


def test_an_engine_process_refuses_limits_in_the_words_of_one_process(tmp_path):
    """A retest: kiln serve --model_dir --engine_process (or --dp 2) told a load refusal to
    rebuild the engine where one process says to pass a smaller option (the build cache's engine
    is built from the options given: kiln.errors.limits_as_options)."""
    hf = hf_model("llama-gqa", tmp_path / "hf")
    # a KV cache of 3 PiB: more host memory than any machine has
    build(kiln_checkpoint(hf, tmp_path / "ckpt"), tmp_path / "engine", backend="torch",
          dtype="float32", **{**LIMITS, "max_batch_size": 10 ** 11, "max_num_tokens": 10 ** 11})
    write_char_tokenizer(tmp_path / "engine")
    advice = "; pass a smaller max_seq_len or max_batch_size"
    with limits_as_options(), pytest.raises(EngineError) as one:
        LLM(tmp_path / "engine", ExecutorOptions(device="cpu"))
    assert str(one.value).endswith(advice)
    with limits_as_options(), pytest.raises(WorkerError) as process:
        LLM(tmp_path / "engine", ExecutorOptions(device="cpu", engine_process=True))
    assert "failed: EngineError: this torch engine's limits" in str(process.value)
    assert str(process.value).endswith(advice)


class _Id(str):
    """A request id that counts the comparisons made with it."""

    compared = 0
    __hash__ = str.__hash__

    def __eq__(self, other: object) -> bool:
        _Id.compared += 1
        return str.__eq__(self, other)


class _FullPool:
    """One replica of one slot that takes every message (no process): the front holds the rest."""

    size, failed = 1, False

    def __init__(self):
        from kiln.engine import BuildLimits
        from kiln.runtime.distributed.replica_worker import ReplicaInfo

        self.infos = [ReplicaInfo(BuildLimits(1, 8, 16, 8), 100, False)]
        self.sent: list[tuple] = []

    def send(self, i, message):
        self.sent.append(message)
        return True

    def backlog(self, i):
        return 0

    def check(self):
        pass

    def receive(self, timeout):
        return []


def test_the_front_queue_keeps_its_order_and_an_abort_scans_none_of_it():
    """An abort of a request held in the front had removed it from a deque, comparing its id
    with every one ahead of it (O(n) each, O(n^2) for a server's clients leaving in any order);
    the others still go first come first served."""
    from kiln.runtime.distributed.replicas import ReplicaCore

    pool = _FullPool()
    core = ReplicaCore(pool, None, has_tokenizer=False)
    ids = [_Id(f"r{i}") for i in range(10)]
    for rid in ids:
        core.add_request([1, 2], SamplingParams(max_tokens=2), request_id=rid)
    _Id.compared = 0
    for rid in (ids[9], ids[5], ids[1], ids[3]):  # held in the front: r0 has the slot
        assert core.abort(rid).finish_reason == "abort"
    assert _Id.compared == 0
    routed = []
    while adds := [m for m in pool.sent if m[0] == "add"]:
        pool.sent.clear()
        routed.append(adds[0][1])
        core.abort(routed[-1])  # frees the slot: the next step routes the next one
        core.step()
    assert routed == ["r0", "r2", "r4", "r6", "r7", "r8"] and not core.has_work()


class _QuietPool(_FullPool):
    """Two replicas of one slot each (no process); :meth:`receive` gives ``inbox``."""

    size = 2

    def __init__(self):
        super().__init__()
        self.inbox: list[tuple[int, tuple]] = []

    def receive(self, timeout):
        out, self.inbox = self.inbox, []
        return out

    def label(self, i):
        return f"replica {i} (pid 10{i})"

    def check_alive(self):
        pass


def test_the_front_tells_each_replicas_progress_by_its_messages():
    """A replica that stops (SIGSTOP, a hung kernel) sends nothing: its clock is its last
    message while it has requests outstanding, an abort it has not answered included; an idle
    one has none, and its clock starts when it is given work again."""
    from kiln.runtime.distributed.replicas import ReplicaCore

    pool = _QuietPool()
    core = ReplicaCore(pool, None, has_tokenizer=False)
    assert core.progress() == [("replica 0 (pid 100)", None), ("replica 1 (pid 101)", None)]
    time.sleep(0.01)  # idle, which is no stall
    given = time.monotonic()
    first, second = (core.add_request([1, 2], SamplingParams(max_tokens=2)) for _ in range(2))
    [(_, heard0), (_, heard1)] = core.progress()
    assert heard0 >= given and heard1 >= given
    time.sleep(0.01)
    pool.inbox = [(0, ("step", [], []))]  # replica 0 stepped; replica 1 is silent
    core.step()
    assert core.progress()[0][1] > heard0 and core.progress()[1][1] == heard1
    core.abort(second.request_id)  # replica 1 owes its answer: still outstanding
    assert core.progress()[1][1] == heard1
    pool.inbox = [(1, ("aborted", second.request_id))]
    core.step()
    assert core.progress()[1][1] is None and core.progress()[0][1] is not None
    time.sleep(0.01)
    given = time.monotonic()
    third = core.add_request([3], SamplingParams(max_tokens=2))  # to replica 1, idle till now
    assert core.progress()[1][1] >= given
    core.abort(first.request_id)
    core.abort(third.request_id)
    assert not core.has_work() and None not in [at for _, at in core.progress()]
    # the front is idle: no step reads the answers, its engine thread's idle check does (a
    # replica stopped meanwhile would have stayed stalled for good)
    pool.inbox = [(0, ("aborted", first.request_id)), (1, ("aborted", third.request_id))]
    core.check_alive()
    assert [at for _, at in core.progress()] == [None, None]


def test_a_replica_that_steps_without_tokens_is_heard_every_progress_s(monkeypatch):
    """A long prompt's prefill steps make no token: the replica still sends a message at
    least every PROGRESS_S while it steps, and none more often."""
    from kiln.runtime.distributed import replica_worker

    replica = replica_worker._Replica.__new__(replica_worker._Replica)
    replica.conn, replica.reported = mock.Mock(), set()
    replica.core = mock.Mock(requests={}, step=mock.Mock(return_value=[]))
    clock = [100.0]
    monkeypatch.setattr(replica_worker.time, "monotonic", lambda: clock[0])
    replica.sent = clock[0]
    replica.step()
    clock[0] += replica_worker.PROGRESS_S / 2
    replica.step()
    assert replica.conn.send.call_count == 0
    clock[0] += replica_worker.PROGRESS_S / 2
    replica.step()
    replica.step()
    assert replica.conn.send.call_args_list == [mock.call(("step", [], []))]


def test_a_stopped_replica_is_told_by_its_silence_and_heard_again_once_it_goes_on(replicas):
    """SIGSTOP on a replica process with a request routed to it: its clock stops while the
    other replica finishes its own; SIGCONT, and its request ends, leaving it idle."""
    core = replicas.core
    pid = core.pool.processes[1].pid
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=5)
    os.kill(pid, signal.SIGSTOP)
    try:
        ids = [core.add_request([5, 6, 7], params).request_id for _ in range(2)]  # one each
        deadline = time.monotonic() + 30
        while not core.requests[ids[0]].finished:
            assert time.monotonic() < deadline
            core.step()
        stopped = core.progress()[1][1]
        time.sleep(0.3)
        core.step()
        assert core.progress()[0][1] is None and core.progress()[1][1] == stopped
        assert core.progress()[1][0] == f"replica 1 (pid {pid})"
    finally:
        os.kill(pid, signal.SIGCONT)
    while not core.requests[ids[1]].finished:
        assert time.monotonic() < deadline
        core.step()
    assert [at for _, at in core.progress()] == [None, None]
    for rid in ids:
        core.pop(rid)
