"""The onnx executor against docs/engine.md's graph contract (a toy graph; no builder needed):
batched, padded, windowed and chained steps match each sequence run alone from scratch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kiln.engine import BuildLimits, read_manifest
from kiln.runtime import LLM, SamplingParams
from kiln.runtime.core import EngineCore
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.loader import open_engine
from tests.helpers import raised
from tests.runtime.toy_onnx import toy_engine_dir

LIMITS = BuildLimits(max_batch_size=6, max_input_len=24, max_seq_len=40, max_num_tokens=32)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-part", "two-parts"])
def engine(request, tmp_path_factory):
    return toy_engine_dir(tmp_path_factory.mktemp("toy") / "engine", LIMITS, parts=request.param)


def alone(engine_dir, tokens):
    """Logits of the last token of ``tokens``, one prefill in a fresh executor."""
    _, ex = open_engine(engine_dir)
    return ex.step([SequenceChunk(0, tuple(tokens), 0)])[0]


def test_mixed_steps_match_sequences_run_alone(engine):
    _, ex = open_engine(engine)
    rng = random.Random(0)
    history = {s: [] for s in range(LIMITS.max_batch_size)}
    for step in range(12):
        # a few slots, some prefill chunks, some decodes, idle slots in between
        slots = sorted(rng.sample(range(LIMITS.max_batch_size), rng.randint(1, 4)))
        chunks = []
        for s in slots:
            room = LIMITS.max_seq_len - len(history[s])
            n = 1 if history[s] and rng.random() < 0.6 else rng.randint(1, min(9, room))
            n = min(n, room)
            if n > 0:
                chunks.append(SequenceChunk(s, tuple(rng.randrange(64) for _ in range(n)),
                                            len(history[s])))
        if step == 6:  # a finished sequence frees its slot; the next one starts from zero
            ex.release(slots[0])
            history[slots[0]] = []
            chunks = [c if c.slot != slots[0] else SequenceChunk(c.slot, c.tokens, 0)
                      for c in chunks]
        if not chunks:
            continue
        logits = ex.step(chunks)
        assert logits.shape == (len(chunks), 64) and logits.dtype == torch.float32
        for row, c in zip(logits, chunks, strict=True):
            history[c.slot].extend(c.tokens)
            torch.testing.assert_close(row, alone(engine, history[c.slot]), atol=2e-5, rtol=2e-5)


def test_idle_row_near_the_end_of_the_cache_does_not_clobber(engine):
    _, ex = open_engine(engine)
    full = tuple(range(LIMITS.max_seq_len - 1))  # slot 1 almost full
    ex.step([SequenceChunk(1, full[:20], 0)])
    ex.step([SequenceChunk(1, full[20:], 20)])
    ex.step([SequenceChunk(0, (5, 6, 7), 0), SequenceChunk(2, (8, 9, 10), 0)])  # 1 is idle
    got = ex.step([SequenceChunk(1, (11,), len(full))])[0]
    torch.testing.assert_close(got, alone(engine, [*full, 11]), atol=2e-5, rtol=2e-5)


def test_inflight_invariant_on_onnx(engine):
    rng = random.Random(3)
    prompts = [[rng.randrange(64) for _ in range(rng.randint(1, 24))] for _ in range(16)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 12)) for _ in prompts]
    single = LLM.from_executor(open_engine(engine)[1])  # token ids only: no tokenizer
    want = [single.generate([p], q)[0].token_ids for p, q in zip(prompts, params, strict=True)]
    batched = LLM.from_executor(open_engine(engine)[1]).generate(prompts, params)
    assert [r.token_ids for r in batched] == want
    core, arrivals, got, step = EngineCore(open_engine(engine)[1]), {}, {}, 0
    for i in range(16):
        arrivals.setdefault(rng.randrange(20), []).append(i)
    while step < 20 or core.has_work():
        for i in arrivals.get(step, []):
            got[i] = core.add_request(prompts[i], params[i])
        core.step()
        step += 1
    assert [tuple(got[i].output_ids) for i in range(16)] == want


def test_threads_and_device_options(engine):
    from kiln.runtime.loader import ExecutorOptions

    _, ex = open_engine(engine, ExecutorOptions(device="cpu", num_threads=1))
    assert ex.device == "cpu"
    assert np.isfinite(ex.step([SequenceChunk(0, (1, 2), 0)]).numpy()).all()


@pytest.mark.parametrize("asked", [None, True, False])
def test_idle_threads_spin_by_default_for_one_part_only(engine, asked, caplog):
    """A trial's 4-part engine decoded 3.4x slower spinning (each part's session has its own
    pool, and the idle ones spun on the cores the running part needed), without a word."""
    import logging

    from kiln.runtime.loader import ExecutorOptions

    parts = len(read_manifest(engine).rank_files[0])
    with caplog.at_level(logging.INFO, logger="kiln.runtime.onnx_executor"):
        _, ex = open_engine(engine, ExecutorOptions(device="cpu", cpu_spin_wait=asked))
    spins = {s.get_session_options().get_session_config_entry(f"session.{pool}.allow_spinning")
             for s in ex.sessions for pool in ("intra_op", "inter_op")}
    expected = asked if asked is not None else parts == 1
    assert spins == {"1" if expected else "0"}
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if parts > 1 and asked:
        assert warned == [f"cpu_spin_wait with an engine of {parts} parts: each part's idle "
                          f"threads spin on the cores the running part needs (decode 3-5x "
                          f"slower in our runs); leave it out, or pass --no_cpu_spin_wait"]
    else:
        assert warned == []
    if parts > 1 and asked is None:
        assert "onnx executor: 2 parts, so idle CPU threads sleep (no spin-wait)" in caplog.messages


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint):
    """A real ``kiln build`` onnx engine of the tiny Llama (GQA), and its oracle."""
    from kiln.builder import build
    from kiln.runtime.reference_executor import ReferenceExecutor

    out = tmp_path_factory.mktemp("built") / "engine"
    build(tiny_checkpoint, out, backend="onnx", max_batch_size=LIMITS.max_batch_size,
          max_input_len=LIMITS.max_input_len, max_seq_len=LIMITS.max_seq_len,
          max_num_tokens=LIMITS.max_num_tokens)
    from kiln.engine import read_manifest
    assert read_manifest(out).plugins["gqa"]  # the steps below run GroupQueryAttention's rules
    return out, ReferenceExecutor.from_checkpoint(tiny_checkpoint, LIMITS).decoder


def test_built_engine_matches_the_oracle_in_mixed_steps(built):
    from kiln.runtime.reference_executor import ReferenceExecutor

    engine, decoder = built
    _, ex = open_engine(engine)
    oracle = ReferenceExecutor(decoder, LIMITS)
    rng = random.Random(5)
    lengths = [0] * LIMITS.max_batch_size
    for _ in range(10):
        chunks = []
        for s in sorted(rng.sample(range(LIMITS.max_batch_size), rng.randint(1, 5))):
            n = min(1 if lengths[s] and rng.random() < 0.6 else rng.randint(2, 9),
                    LIMITS.max_seq_len - lengths[s])
            if n > 0:
                chunks.append(SequenceChunk(s, tuple(rng.randrange(128) for _ in range(n)),
                                            lengths[s]))
                lengths[s] += n
        if chunks:
            torch.testing.assert_close(ex.step(chunks), oracle.step(chunks), atol=1e-4,
                                       rtol=1e-4)


def test_built_engine_greedy_is_batch_invariant(built):
    engine, decoder = built
    rng = random.Random(11)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(1, 24))] for _ in range(16)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(2, 10)) for _ in prompts]
    want = [tuple(decoder.generate(p, q.max_tokens)) for p, q in zip(prompts, params,
                                                                    strict=True)]
    got = LLM.from_executor(open_engine(engine)[1]).generate(prompts, params)
    assert [r.token_ids for r in got] == want
    core, got, step = EngineCore(open_engine(engine)[1]), {}, 0
    arrivals = sorted((rng.randrange(15), i) for i in range(16))
    while arrivals or core.has_work():  # admitted mid-flight, at random steps
        while arrivals and arrivals[0][0] <= step:
            i = arrivals.pop(0)[1]
            got[i] = core.add_request(prompts[i], params[i])
        core.step()
        step += 1
    assert [tuple(got[i].output_ids) for i in range(16)] == want


@pytest.mark.parametrize("edit, said", [
    (lambda m: m.update(dtype="float16"), "a KV cache dtype of float32, and its config.json "
                                          "says dtype float16"),
    (lambda m: m["decoder"].update(vocab_size=m["decoder"]["vocab_size"] + 1),
     "a vocabulary (logits) of {vocab}, and its config.json says decoder.vocab_size {more}"),
    (lambda m: m["limits"].update(max_seq_len=m["limits"]["max_seq_len"] * 2),
     "a KV cache length of {seq}, and its config.json says limits.max_seq_len {twice}"),
])
def test_a_manifest_edited_away_from_its_graphs_is_one_line_at_load(built, tmp_path, edit, said):
    """A retest's engine config edited to float16 or a larger vocabulary had run into an ONNX
    Runtime traceback at the first step; a larger max_seq_len was named without the file."""
    import json
    import shutil

    from kiln.engine import EngineError

    engine = tmp_path / "engine"
    shutil.copytree(built[0], engine)
    manifest = json.loads((engine / "config.json").read_text())
    vocab, seq = manifest["decoder"]["vocab_size"], manifest["limits"]["max_seq_len"]
    edit(manifest)
    (engine / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError) as info:
        open_engine(engine)
    assert str(info.value) == (
        "the engine's graphs have " + said.format(vocab=vocab, more=vocab + 1, seq=seq,
                                                  twice=2 * seq)
        + ": the engine dir is inconsistent; restore the build's config.json if it was edited, "
          "or rebuild with kiln build")


def test_a_graph_file_corrupted_in_place_is_one_line_naming_it(built, tmp_path):
    """Loading checks file sizes, not contents (kiln verify reads them): a graph whose bytes
    changed but not its size is named, with the commands that check and fix it."""
    import shutil

    from kiln.engine import EngineError

    engine = tmp_path / "engine"
    shutil.copytree(built[0], engine)
    graph = engine / "rank0.onnx"
    data = bytearray(graph.read_bytes())
    data[100:400] = bytes(b ^ 0x5A for b in data[100:400])
    graph.write_bytes(bytes(data))
    with pytest.raises(EngineError) as info:
        open_engine(engine)
    message = str(info.value)
    assert message.startswith(f"{graph}: ONNX Runtime cannot load it (") and "\n" not in message
    assert message.endswith(f"the file is corrupt or modified: check it with kiln verify "
                            f"{engine}, and rebuild the engine with kiln build")


def test_a_weights_file_cut_short_without_sizes_in_the_manifest_is_one_line(built, tmp_path):
    """Retest 45b: an older engine's manifest has no sizes to check at load; its weights file
    cut short had been ONNX Runtime's 59-line traceback (exit 1)."""
    import json
    import shutil

    from kiln.engine import EngineError

    engine = tmp_path / "engine"
    shutil.copytree(built[0], engine)
    manifest = json.loads((engine / "config.json").read_text())
    del manifest["sizes"], manifest["manifest_sha256"]  # (as an older build wrote it)
    (engine / "config.json").write_text(json.dumps(manifest))
    with open(engine / "rank0.onnx.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(EngineError) as info:
        open_engine(engine)
    message = str(info.value)
    assert message.startswith(f"{engine / 'rank0.onnx'}: ONNX Runtime cannot load it (") \
        and "Deserialize tensor" in message and "\n" not in message
    assert message.endswith(f"its weights file is cut short, corrupt or modified: check it "
                            f"with kiln verify {engine}, and rebuild the engine with kiln build")


def test_a_kv_cache_beyond_the_host_memory_is_refused_before_allocating(engine, monkeypatch):
    """A build's --max_batch_size 100000 made a 36.6 GiB cache, which numpy refused at load
    with a traceback (a new user's trial); now it is one EngineError naming the fix."""
    from kiln.engine import EngineError
    from kiln.runtime import onnx_executor

    monkeypatch.setattr(onnx_executor, "available_memory", lambda: 1000)
    monkeypatch.setattr(onnx_executor.np, "zeros", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(EngineError, match=r"max_batch_size 6\) need a KV cache of \d+ [KM]iB "
                                          r"of host memory, and 1 KiB is available; rebuild "
                                          r"with a smaller max_seq_len or max_batch_size"):
        open_engine(engine)
    monkeypatch.undo()
    assert open_engine(engine)[1] is not None


def _qdq_projection(m: int, k: int, n: int):
    """(model bytes, x, the exact product) of an int8_sq projection's Q/DQ form."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    w_scale, x_scale = np.full(n, 0.01, np.float32), np.array(0.02, np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        initializer=[numpy_helper.from_array(a, name) for a, name in (
            (w, "w"), (w_scale, "ws"), (x_scale, "s"), (np.array(0, np.int8), "z"),
            (np.zeros(n, np.int8), "wz"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # older ONNX Runtime builds read it too
    q = np.clip(np.round(x / x_scale), -128, 127)
    return model.SerializeToString(), x, (q * x_scale) @ (w.astype(np.float64) * w_scale)


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_activations_stay_int8_on_cpus_without_vnni(monkeypatch, vnni):
    """ONNX Runtime's default on x86 rewrites an int8_sq projection's int8 activations to
    uint8, whose kernels saturate 16-bit pair sums on CPUs without VNNI (errors of ~70 on
    products of ~350 here): there kiln's sessions keep int8, which is exact. With VNNI the
    fast uint8 kernels are exact and stay."""
    import onnxruntime as ort

    from kiln.runtime import onnx_executor

    monkeypatch.setattr(onnx_executor, "int8_must_stay_int8", lambda: not vnni)
    so = onnx_executor.session_options(1)
    if vnni:
        with pytest.raises(RuntimeError):  # not set: ONNX Runtime's default
            so.get_session_config_entry("session.qdqisint8allowed")
    else:
        assert so.get_session_config_entry("session.qdqisint8allowed") == "1"
    if vnni and onnx_executor.VNNI_FLAGS.isdisjoint(onnx_executor.cpu_flags()):
        return  # this CPU's uint8 kernels saturate: what the branch above avoids
    model, x, want = _qdq_projection(4, 256, 64)
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": x})[0] - want).max() < 1e-4



def test_each_run_goes_through_a_call_that_ctrl_c_cancels(engine, monkeypatch):
    """A window's run is one native call (seconds for a long prompt on a CPU): the executor
    hands it to kiln.interrupts.interruptible with a cancel that ends that very run."""
    from kiln.runtime import onnx_executor
    from kiln.runtime.errors import StepInterrupted

    _, ex = open_engine(engine)
    calls = []

    def cancelled_at_once(call, cancel):
        calls.append(call)
        cancel()  # as Ctrl-C would, before the run starts
        return call()

    monkeypatch.setattr(onnx_executor, "interruptible", cancelled_at_once)
    with pytest.raises(StepInterrupted, match="interrupted during its run"):  # ONNX Runtime's
        ex.step([SequenceChunk(0, (1, 2, 3), 0)])  # own error, "terminate flag", named so
    assert len(calls) == 1  # the first part's run was the one cancelled
    monkeypatch.undo()
    fresh = ex.step([SequenceChunk(0, (1, 2, 3), 0)])  # a cancelled run leaves no mark
    assert torch.equal(fresh, alone(engine, (1, 2, 3)).unsqueeze(0))


def _char_tokenizer(directory):
    """Tokenizer files of one token per printable character (ids 1-95), a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    directory.mkdir()
    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        '{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}')
    (directory / "generation_config.json").write_text("{}")
    return directory


def test_a_tokenizer_of_another_model_is_named_for_text_prompts(tmp_path, caplog):
    """A retest's engine held another model's tokenizer: its text prompt was refused with
    "pass ids of the model's tokenizer", which it had not given ids."""
    from click.testing import CliRunner

    from kiln.cli.main import main
    from kiln.runtime.errors import RequestError

    tok = _char_tokenizer(tmp_path / "tok")  # ids to 95; the model: 64
    engine = toy_engine_dir(tmp_path / "engine", LIMITS, vocab=64, tokenizer_dir=tok)
    said = ("the engine's tokenizer encodes it to token id 95, past the model's vocabulary of 64 "
            "(decoder.vocab_size): the engine dir's tokenizer files are not its model's; build "
            "it again from a checkpoint converted from the model's own Hugging Face dir")
    with caplog.at_level("WARNING", logger="kiln.runtime.llm"):
        llm = LLM(engine)
    assert f"{engine}: its tokenizer has 96 tokens, past the model's vocab_size 64" in caplog.text
    with llm:
        assert llm.generate(" !", SamplingParams(max_tokens=2))[0].prompt_token_ids == (1, 2)
        with pytest.raises(RequestError) as err:
            llm.generate(["!", "!~"], SamplingParams(max_tokens=2))
        assert str(err.value) == f"prompts[1]: {said}"
        with pytest.raises(RequestError) as err:
            llm.chat([{"role": "user", "content": "~"}])
        assert str(err.value) == f"messages: {said}"
        with pytest.raises(RequestError) as err:
            llm.chat([[{"role": "user", "content": "!"}], [{"role": "user", "content": "~"}]])
        assert str(err.value) == f"conversation #1: {said}"
    result = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_text", "~"])
    assert result.exit_code == 2 and result.output == f"error: prompt 1: {said}\n", result.output


class _EndlessRuns:
    """A session whose runs last until their RunOptions are terminated (a long window on a
    CPU), or 20 s (then the test fails on the time): ``entered`` is set when one begins."""

    def __init__(self, session):
        import threading

        self._session, self.entered = session, threading.Event()

    def run_with_iobinding(self, binding, options):
        import time

        self.entered.set()
        deadline = time.monotonic() + 20
        while not options.terminate and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._session.run_with_iobinding(binding, options)  # fails if terminated

    def __getattr__(self, name):
        return getattr(self._session, name)


def _endless(ex) -> _EndlessRuns:
    ex.sessions = [_EndlessRuns(s) for s in ex.sessions]
    return ex.sessions[0]


def test_an_interrupted_step_raises_and_runs_again_as_if_it_had_not_run(engine):
    import threading

    from kiln.runtime.errors import StepInterrupted

    _, ex = open_engine(engine)
    sessions = list(ex.sessions)
    endless = _endless(ex)
    chunk = [SequenceChunk(0, (1, 2, 3, 4), 0)]
    errors = []
    worker = threading.Thread(target=lambda: errors.append(raised(ex.step, chunk)))
    worker.start()
    assert endless.entered.wait(10)
    ex.interrupt()
    worker.join(5)
    assert not worker.is_alive() and isinstance(errors[0], StepInterrupted), errors
    ex.sessions = sessions
    _, uninterrupted = open_engine(engine)
    decode = [SequenceChunk(0, (5,), 4)]
    assert torch.equal(ex.step(chunk), uninterrupted.step(chunk))
    # one that came between steps ends the next one at once, and that one only
    ex.interrupt()
    with pytest.raises(StepInterrupted):
        ex.step(decode)
    assert torch.equal(ex.step(decode), uninterrupted.step(decode))



@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """The toy engine, one part, with tokenizer files (an LLM needs them)."""
    root = tmp_path_factory.mktemp("toy-tok")
    return toy_engine_dir(root / "engine", LIMITS, tokenizer_dir=_char_tokenizer(root / "tok"))


@pytest.mark.parametrize("closer", ["LLM", "AsyncLLM"])
def test_closing_from_another_thread_ends_a_long_step_now(with_tokenizer, closer):
    """A closing server (or caller) had waited for the step under way to end: a prefill of
    8,000 tokens on a CPU held kiln serve's exit for 24 s after its third Ctrl-C."""
    import asyncio
    import threading
    import time

    from kiln.runtime import AsyncLLM
    from kiln.runtime.errors import EngineClosedError

    llm = LLM(with_tokenizer)
    endless = _endless(llm.executor)
    if closer == "LLM":
        outcome = []
        caller = threading.Thread(target=lambda: outcome.append(raised(
            llm.generate, [[1, 2, 3]], SamplingParams(max_tokens=2))))
        caller.start()
        assert endless.entered.wait(10)
        started = time.monotonic()
        llm.close()
        caller.join(10)
        assert isinstance(outcome[0], EngineClosedError), outcome
    else:
        async def main():
            engine_ = AsyncLLM(llm)
            request = await engine_.submit([1, 2, 3], SamplingParams(max_tokens=2))
            await asyncio.to_thread(endless.entered.wait, 10)
            began = time.monotonic()
            await asyncio.to_thread(engine_.close)
            return began, [d async for d in engine_.stream(request)]

        started, deltas = asyncio.run(main())
        assert deltas[-1].result.finish_reason == "abort"
        llm.close()
    assert time.monotonic() - started < 5
