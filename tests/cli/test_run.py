"""kiln run and kiln bench on a toy onnx engine (or a scripted mock model) with the real SmolLM2
tokenizer: output layout (text on stdout, stats on stderr), prompt files, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kiln.cli import run as run_module
from kiln.cli.bench import bench
from kiln.cli.main import main
from kiln.cli.run import run
from kiln.engine import BuildLimits
from kiln.runtime import LLM, CompletionResult, RequestTimings, StreamDelta
from tests.runtime.mocks import ScriptedExecutor
from tests.runtime.toy_onnx import rewrite_manifest, toy_engine_dir

for command in (run, bench):  # registered by kiln.cli.main in the package; idempotent here
    if command.name not in main.commands:
        main.add_command(command)

LIMITS = BuildLimits(max_batch_size=4, max_input_len=48, max_seq_len=96, max_num_tokens=64)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    from kiln.testing.smollm2 import smollm2_hf_dir

    return toy_engine_dir(tmp_path_factory.mktemp("cli") / "engine", LIMITS, vocab=49152,
                          tokenizer_dir=smollm2_hf_dir())


def kiln(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_run_prints_text_on_stdout_and_stats_on_stderr(engine):
    r = kiln("run", "--engine_dir", str(engine), "--input_text", "Hello there",
             "--max_output_len", "6", "--ignore_eos")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and r.stdout.count("\n") == 1 and "TTFT" not in r.stdout
    stats = r.stderr.strip()
    assert stats.startswith("TTFT ") and "time per output token" in stats
    assert "6 tokens, 1 request, finish: length" in stats


def test_top_k_minus_1_is_off_as_in_kiln_serve(engine):
    """A trial: kiln serve took vLLM's top_k -1, kiln run refused it."""
    texts = set()
    for k in ("-1", "0"):
        r = kiln("run", "--engine_dir", str(engine), "--input_text", "Hello there",
                 "--max_output_len", "4", "--ignore_eos", "--temperature", "1", "--seed", "5",
                 "--top_k", k)
        assert r.exit_code == 0, r.output
        texts.add(r.stdout)
    assert len(texts) == 1


@pytest.mark.parametrize("streaming", [True, False])
def test_a_reader_that_closes_the_pipe_ends_the_run_quietly(engine, streaming):
    """`kiln run ... | head -c 30`: the reader's end closed had been "error: Broken pipe",
    exit 2; now nothing is said and the exit is SIGPIPE's 141, as for other tools."""
    command = [sys.executable, "-m", "kiln.cli.main", "run", "--engine_dir", str(engine),
               "--input_text", "Hi", "--max_output_len", "40", "--ignore_eos"] \
        + ["--streaming"] * streaming
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the engine has loaded: every write finds it closed
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err.decode()) == (141, "")


def test_a_reader_that_closes_stderr_ends_the_run_quietly(engine, tmp_path):
    """`kiln run ... 2>&1 >out.txt | true`: the stats line into stderr's closed pipe had ended
    the run with exit 1 (click's own choice); the text is in the file, the exit is 141."""
    command = [sys.executable, "-m", "kiln.cli.main", "run", "--engine_dir", str(engine),
               "--input_text", "Hi", "--max_output_len", "8", "--ignore_eos"]
    with open(tmp_path / "out.txt", "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE)
        process.stderr.close()
        assert process.wait(timeout=120) == 141
    assert (tmp_path / "out.txt").read_text().strip()


def test_a_broken_pipe_that_is_not_stdout_stays_an_error():
    @click.command("broken_pipe_elsewhere")
    def broken() -> None:
        raise BrokenPipeError(32, "Broken pipe")  # a worker's pipe, say

    main.add_command(broken)
    try:
        r = CliRunner().invoke(main, ["broken_pipe_elsewhere"])
    finally:
        main.commands.pop("broken_pipe_elsewhere")
    assert (r.exit_code, r.output.strip()) == (2, "error: Broken pipe; nothing was left "
                                                   "half-written")


def test_quiet_drops_the_stats_line(engine):
    r = kiln("-q", "run", "--engine_dir", str(engine), "--input_text", "Hello there",
             "--max_output_len", "4", "--ignore_eos")
    assert r.exit_code == 0 and r.stdout.strip() and r.stderr == ""


def test_streaming_prints_the_same_text(engine):
    args = ["run", "--engine_dir", str(engine), "--input_text", "Hi", "--max_output_len", "8",
            "--ignore_eos", "--temperature", "0"]
    plain = kiln(*args).stdout
    assert kiln(*args, "--streaming").stdout == plain and plain.count("\n") == 1


def test_several_prompts_print_header_then_block_streaming_or_not(engine):
    args = ["run", "--engine_dir", str(engine), "--input_text", "Hi", "--input_text",
            "Good morning to you", "--max_output_len", "5", "--ignore_eos"]
    plain = kiln(*args)
    streamed = kiln(*args, "--streaming")
    assert plain.stdout == streamed.stdout
    lines = plain.stdout.split("\n")
    assert (lines[0], lines[2], lines[4]) == ("[1]", "[2]", "") and len(lines) == 5
    assert "10 tokens, 2 requests" in plain.stderr and "TTFT" not in plain.stdout


ANSWER = "The capital of France is Paris."


@pytest.fixture
def scripted(monkeypatch):
    """kiln run over a mock model: after the first prompt, the tokens of ANSWER then EOS (a
    longer prompt starts further into ANSWER, so it finishes first)."""
    from kiln.runtime.tokenizer import load_tokenizer
    from kiln.testing.smollm2 import smollm2_hf_dir

    tokenizer = load_tokenizer(smollm2_hf_dir())
    first = "Q: the capital of France?"

    def scripted_llm(engine_dir, options):
        executor = ScriptedExecutor(LIMITS, tokenizer.vocab_size, len(tokenizer.encode(first)),
                                    tokenizer.encode(ANSWER, add_special_tokens=False),
                                    eos=tokenizer.eos_token_ids[0])
        return LLM.from_executor(executor, tokenizer)

    monkeypatch.setattr("kiln.runtime.LLM", scripted_llm)  # kiln run imports it when run
    monkeypatch.setattr(run_module, "check_engine", lambda *a: None)  # no engine dir to read
    return first


@pytest.mark.parametrize("streaming", [False, True])
def test_blocks_stay_in_prompt_order_when_a_later_prompt_finishes_first(scripted, streaming):
    r = kiln("run", "--engine_dir", "mock", "--input_text", scripted, "--input_text",
             scripted + " Answer in one short sentence.", *(["--streaming"] * streaming))
    assert r.exit_code == 0, r.output
    header0, text0, header1, text1, end = r.stdout.split("\n")
    assert (header0, text0, header1, end) == ("[1]", ANSWER, "[2]", "")
    assert text1 and ANSWER.endswith(text1) and text1 != ANSWER
    assert "2 requests, finish: stop" in r.stderr


class _ScriptedLLM:
    """generate_stream yields ``script``'s deltas, (index, text, done) each; ``after_each`` runs
    after each delta was consumed, ``then`` is raised after the last."""

    def __init__(self, script, after_each=lambda: None, then: type[BaseException] | None = None):
        self.script, self.after_each, self.then = script, after_each, then

    def generate_stream(self, inputs, params):
        for index, text, done in self.script:
            result = CompletionResult(f"r{index}", None, (), "", (), "stop", None, None,
                                      RequestTimings(0.0, (), 1.0))
            yield StreamDelta(index, f"r{index}", text, (), finish_reason="stop" if done else None,
                              result=result if done else None)
            self.after_each()
        if self.then is not None:
            raise self.then


def test_streaming_prints_the_earliest_unfinished_block_live(monkeypatch, capsys):
    """Request 1 finishes first: it is held until request 0 is complete, then printed whole;
    request 2's text so far follows at once and the rest of it live."""
    script = [(0, "Hel", False), (1, "Wor", False), (1, "ld", True), (0, "lo", False),
              (2, "x", False), (0, "", True), (2, "y", True)]
    printed = []
    results = run_module._stream(
        _ScriptedLLM(script, after_each=lambda: printed.append(capsys.readouterr().out)),
        ["a", "b", "c"], None)
    assert [r.request_id for r in results] == ["r0", "r1", "r2"]
    assert printed == ["[1]\nHel", "", "", "lo", "", "\n[2]\nWorld\n[3]\nx", "y\n"]



@pytest.mark.parametrize("script,out", [
    ([(0, "Hel", False)], "[1]\nHel\n"),  # mid-line: the line is ended
    ([(0, "Hel", False), (0, "", True)], "[1]\nHel\n[2]\n"),  # at a line's end: as it was
])
def test_streaming_interrupted_off_a_terminal_leaves_whole_lines(capsys, script, out):
    """A pipe got ``...Hel`` and then, from stderr, ``interrupted (Ctrl-C)`` on the same line
    (a trial's ``kiln run --streaming 2>&1 | tee``)."""
    with pytest.raises(KeyboardInterrupt):
        run_module._stream(_ScriptedLLM(script, then=KeyboardInterrupt), ["a", "b"], None)
    assert capsys.readouterr().out == out


LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"


@pytest.mark.parametrize("prompts,extra,cut", [
    (["Hi"], 50, 1), (["Hi"], 0, 0),
    (["Hi", LONG], 0, 1),  # the shortest prompt has room: the longer one is still cut
    (["Hi", LONG], 60, 2),
    ([LONG * 5], 50, 0),  # over max_input_len: refused by generate(), not announced as cut
])
def test_a_max_output_len_past_the_engine_says_where_outputs_stop(engine, caplog, prompts,
                                                                  extra, cut):
    lengths = [len(LLM(engine).encode(p)) for p in prompts]
    valid = [n for n in lengths if n <= LIMITS.max_input_len]
    rooms = [LIMITS.max_seq_len - n + 1 for n in valid]  # the last output is never cached
    asked = (max(rooms) if valid else 1) + extra
    args = [a for p in prompts for a in ("--input_text", p)]
    with caplog.at_level("WARNING", logger="kiln.cli.run"):
        r = kiln("run", "--engine_dir", str(engine), *args, "--max_output_len", str(asked),
                 "--ignore_eos")
    warned = [m for m in caplog.messages if "--max_output_len" in m]
    if not valid:
        assert r.exit_code == 2 and "max_input_len" in r.stderr and warned == []
        return
    assert r.exit_code == 0, r.output
    if not cut:
        assert warned == []
        return
    assert len(warned) == 1 and f"at most {min(rooms)} new tokens" in warned[0]
    assert f"max_seq_len {LIMITS.max_seq_len}" in warned[0]
    if len(prompts) == 1:
        assert "after the prompt" in warned[0]
        assert f"({min(rooms)} tokens, 1 request, finish: length)" in r.stderr
    else:
        assert f"after {cut} of {len(prompts)} prompts" in warned[0]
        assert "after the longest" in warned[0]


def test_sampling_flags_and_seed_reproducible(engine):
    args = ["run", "--engine_dir", str(engine), "--input_text", "Hi", "--max_output_len", "8",
            "--temperature", "1.0", "--top_k", "40", "--top_p", "0.9", "--seed", "3",
            "--repetition_penalty", "1.2", "--ignore_eos"]
    assert kiln(*args).output.splitlines()[0] == kiln(*args).output.splitlines()[0]


def test_input_file_jsonl_gives_one_result_per_line(engine, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('"first"\n\n{"prompt": "second"}\n')
    r = kiln("run", "--engine_dir", str(engine), "--input_file", str(f), "--max_output_len", "3",
             "--ignore_eos")
    assert r.exit_code == 0 and r.stdout.startswith("[1]\n") and "\n[2]\n" in r.stdout
    assert "6 tokens, 2 requests" in r.stderr


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "unterminated}',
     "line 2: not JSON (Unterminated string starting at: column 12)"),
    ('"a" "b"', "line 2: not JSON (Extra data: column 5)"),
    ("5", 'line 2: expected a JSON string or {"prompt": "..."}, found a number'),
    ('["a", "b"]', 'line 2: expected a JSON string or {"prompt": "..."}, found an array'),
    ("null", 'line 2: expected a JSON string or {"prompt": "..."}, found null'),
    ('{"text": "x"}', "line 2: a JSON object needs a 'prompt' key"),
    ('{"prompt": ["x"]}', "line 2: 'prompt' must be a string, found an array"),
    ('""', "line 2: the prompt is empty"),
    ('{"prompt": ""}', "line 2: 'prompt' is empty"),
])
def test_malformed_jsonl_line_is_one_line_naming_file_and_line(engine, tmp_path, line, message):
    f = tmp_path / "prompts.jsonl"
    f.write_text(f'"fine"\n{line}\n')
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_file", str(f)])
    assert r.exit_code == 2, r.output
    assert f"{f} {message}" in r.output and "Traceback" not in r.output
    assert r.output.startswith("error: ") and len(r.output.splitlines()) == 1


@pytest.mark.parametrize("name", ["prompt.txt", "prompts.jsonl"])
def test_input_file_not_utf8_is_one_line(engine, tmp_path, name):
    f = tmp_path / name
    f.write_bytes('"fine"\n"caf\u00e9"\n'.encode("latin-1"))
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_file", str(f)])
    assert r.exit_code == 2 and f"{f} line 2: not UTF-8 text (byte offset 11: invalid " \
        "continuation byte)" in r.output and "Traceback" not in r.output


def test_input_file_is_read_up_to_a_size(engine, monkeypatch):
    """A device (a new user's /dev/zero filled the memory) or an oversized file: one line."""
    from kiln.cli import run as run_cli

    monkeypatch.setattr(run_cli, "INPUT_FILE_MAX_BYTES", 3 << 20)
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_file",
                                  "/dev/zero"])
    assert r.exit_code == 2 and "/dev/zero: more than 3 MiB; --input_file takes prompts" \
        in r.output and len(r.output.splitlines()) == 1, r.output


def test_input_file_newlines_read_as_text(tmp_path):
    from kiln.cli.run import read_prompts

    f = tmp_path / "prompt.txt"
    f.write_bytes(b"one\r\ntwo\rthree\n")
    assert read_prompts((), f) == ["one\ntwo\nthree"]  # the file's last newline(s) dropped
    f.write_bytes(b"  indented\n\nkept  \n\r\n")
    assert read_prompts((), f) == ["  indented\n\nkept  "]
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(b'"a"\r\n"b"\r\n')
    assert read_prompts((), f) == ["a", "b"]
    # a leading BOM (Windows editors) is no part of the prompt: a trial's had changed the
    # answer of a .txt, and a .jsonl's had been refused as not JSON
    f.write_bytes(b'\xef\xbb\xbf"a"\r\n"b"\r\n')
    assert read_prompts((), f) == ["a", "b"]
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfThe capital of France is\r\n")
    assert read_prompts((), f) == ["The capital of France is"]


def test_empty_prompt_file_is_refused_by_name(engine, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("")
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_file", str(f)])
    assert r.exit_code == 2 and f"{f}: the file is empty; write the prompt in it" in r.output
    assert len(r.output.splitlines()) == 1, r.output


def test_no_prompt_is_a_usage_line(engine):
    """A trial's kiln run with no prompt had been told "Invalid value for --input_text" of no
    value given."""
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine)], prog_name="kiln")
    assert r.exit_code == 2
    assert r.output.splitlines() == [
        "error: give a prompt: --input_text TEXT or --input_file FILE (see kiln run --help)"]


def test_blank_jsonl_is_refused(engine, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n  \n")
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_file", str(f)])
    assert r.exit_code == 2 and f"{f}: no prompts (every line is blank)" in r.output


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    (["--top_p", "0"], "--top_p: must be in (0, 1]"),
    (["--input_text", "word " * 60], "exceeds the engine's max_input_len 48"),
    (["--seed", str(2**64), "--temperature", "0.7"], "--seed: must be an integer in"),
    (["--seed", str(-2**64)], "--seed: must be an integer in"),
    (["--seed", str(10**20)], "--seed: must be an integer in"),
    (["--input_text", "caf\udce9"], "--input_text: 'caf\\xe9' is not UTF-8 text"),
    (["--stop", "\udce9"], "--stop: must be UTF-8 text"),
    (["--stop", "x", "--stop", ""], "Invalid value for --stop: has an empty string at index 1"),
    (["--stop_token_ids", "999999"],
     "Invalid value for --stop_token_ids: token id 999999 is outside the vocabulary "
     "[0, 49152); pass ids of the model's tokenizer"),
])
def test_bad_input_is_one_line_and_exit_2(engine, args, message):
    base = ["run", "--engine_dir", str(engine)]
    if "--input_text" not in args:
        base += ["--input_text", "Hi"]
    r = CliRunner().invoke(main, [*base, *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args,message", [
    (["--top_p", "2"], "--top_p: must be in (0, 1], found 2.0"),
    (["--temperature", "nan"], "--temperature: must be a finite number >= 0"),
])
def test_a_bad_sampling_flag_is_refused_before_the_engine_loads(engine, monkeypatch, args,
                                                                 message):
    import kiln.runtime

    def no_load(*a, **k):
        raise AssertionError("the engine was loaded")
    monkeypatch.setattr(kiln.runtime, "LLM", no_load)
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_text", "Hi",
                                  *args])
    assert r.exit_code == 2 and message in r.output and len(r.output.splitlines()) == 1, r.output


def test_missing_engine_dir(tmp_path):
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(tmp_path / "nope"),
                                  "--input_text", "x"])
    assert r.exit_code == 2 and "no such engine directory" in r.output


def test_engine_from_a_newer_kiln_is_refused_before_loading(engine, tmp_path):
    import shutil

    copy = Path(shutil.copytree(engine, tmp_path / "e"))
    rewrite_manifest(copy, kiln_version="9.0.0")
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(copy), "--input_text", "x"])
    assert r.exit_code == 2 and "built by kiln 9.0.0" in r.output and "rebuild" in r.output


def test_bench_table_and_json(engine, tmp_path):
    out = tmp_path / "bench.json"
    r = kiln("bench", "--engine_dir", str(engine), "--input_len", "16", "--output_len", "6",
             "--num_requests", "6", "--concurrency", "3", "--request_rate", "50",
             "--json_output", str(out))
    assert r.exit_code == 0, r.output
    for row in ("TTFT (ms)", "TPOT (ms)", "inter-token (ms)", "output tokens/s", "requests/s"):
        assert row in r.output
    report = json.loads(out.read_text())
    assert report["output_tokens"] == 36 and report["workload"]["concurrency"] == 3
    options = report["engine"]["options"]  # how it ran, GPU options too
    assert options["device"] == "auto" and options["prefill_attention"] is None
    assert options["kv_cache_free_gpu_memory_fraction"] is None and options["dp"] == 1
    # the spin-wait as given (None: the default) and as it ran (on: a one-part onnx engine)
    assert options["cpu_spin_wait"] is None and report["engine"]["cpu_spin_wait"] is True
    assert report["ttft_ms"]["p99"] >= report["ttft_ms"]["p50"] > 0


def test_bench_says_the_gpu_memory_fraction_does_nothing_for_this_engine(engine, caplog):
    with caplog.at_level("WARNING", logger="kiln.runtime.loader"):
        r = kiln("bench", "--engine_dir", str(engine), "--input_len", "8", "--output_len", "2",
                 "--num_requests", "1", "--kv_cache_free_gpu_memory_fraction", "0.5")
    assert r.exit_code == 0, r.output
    assert caplog.messages.count("kv_cache_free_gpu_memory_fraction has no effect on an onnx "
                                 "engine: it sizes the torch backend's KV cache on a GPU") == 1


def test_prefill_attention_is_said_to_do_nothing_for_an_onnx_engine(engine, caplog):
    with caplog.at_level("WARNING", logger="kiln.runtime.loader"):
        r = kiln("run", "--engine_dir", str(engine), "--input_text", "x", "--max_output_len",
                 "2", "--prefill_attention", "kiln")
    assert r.exit_code == 0, r.output
    assert caplog.messages.count("prefill_attention has no effect on an onnx engine: it "
                                 "chooses the torch backend's attention kernel on a GPU") == 1


@pytest.mark.parametrize("command", ["run", "bench", "serve", "eval"])
def test_prefill_attention_takes_auto_kiln_or_cudnn(engine, command):
    r = CliRunner().invoke(main, [command, "--engine_dir", str(engine), "--prefill_attention",
                                  "flash"])
    assert r.exit_code == 2
    assert "'flash' is not one of 'auto', 'kiln', 'cudnn'" in r.output


@pytest.mark.parametrize("rate", ["nan", "inf"])
def test_bench_refuses_a_request_rate_that_is_not_finite(engine, rate):
    r = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--request_rate", rate])
    assert r.exit_code == 2 and "Traceback" not in r.output
    told = "nan is not in the range x>0." if rate == "nan" else "not a finite number"
    assert "Invalid value for" in r.output and "--request_rate" in r.output and told in r.output


def test_bench_says_how_long_a_slow_request_rate_takes(caplog):
    from kiln.cli.bench import _check_request_rate

    with caplog.at_level("WARNING", logger="kiln.cli.bench"):
        _check_request_rate(15 / 3600, 16)  # an hour of arrivals: said nothing
        _check_request_rate(1e-9, 1)  # one request arrives at once
        assert not caplog.messages
        _check_request_rate(15 / 86400, 16)
    assert caplog.messages == ["--request_rate 0.000173611: 16 requests arrive over ~24.0 "
                               "hours on average, and the benchmark lasts that long"]
    for rate in (1e-9, 1e-300, 5e-324):  # a typo, and past what time.sleep takes
        with pytest.raises(click.BadParameter, match=r"requests (would arrive over ~.* years|"
                                                     r"would never all arrive); give at least "
                                                     r"5.79e-06 requests/s"):
            _check_request_rate(rate, 16)


@pytest.mark.parametrize(("args", "flag"), [(["--num_requests", "99999999999"], "--num_requests"),
                                            (["--warmup", "99999999"], "--warmup")])
def test_bench_refuses_a_workload_host_memory_cannot_hold(engine, args, flag):
    # it had run silently until the OOM killer ended it
    r = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--input_len", "16",
                                  "--output_len", "8", *args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and f"Invalid value for {flag}" in lines[0], lines
    assert "of host memory, and" in lines[0] and f"lower {flag}" in lines[0]


def test_a_workloads_host_memory_estimate_bounds_what_its_requests_hold(tmp_path):
    import tracemalloc

    from kiln.runtime import ExecutorOptions
    from kiln.runtime.bench import Workload, run_benchmark

    def peak(workload: Workload) -> int:
        tracemalloc.start()
        try:
            run_benchmark(llm.core, workload)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # per request: what 3,072 requests hold past 1,024 (the step arrays and the vocabulary list
    # the prompts are drawn from are in both; past 1,024 requests their timings outweigh them),
    # 64 at once (fewer steps to trace)
    limits = BuildLimits(max_batch_size=64, max_input_len=16, max_seq_len=40, max_num_tokens=256)
    from kiln.testing.smollm2 import smollm2_hf_dir

    engine = toy_engine_dir(tmp_path / "engine", limits, vocab=49152,
                            tokenizer_dir=smollm2_hf_dir())
    with LLM(engine, ExecutorOptions(device="cpu", num_threads=1)) as llm:
        run_benchmark(llm.core, Workload(8, 2, 4))  # first-use allocations are not a workload's
        small, large = Workload(12, 24, 1024), Workload(12, 24, 3072)
        held = peak(large) - peak(small)
    estimate = large.host_bytes() - small.host_bytes()
    assert held <= estimate <= 2 * held, (held, estimate)


def test_bench_progress_counts_finished_requests(engine, capsys, monkeypatch):
    import kiln.progress
    from kiln.runtime import ExecutorOptions
    from kiln.runtime.bench import Workload, run_benchmark

    monkeypatch.setattr(kiln.progress, "LOG_EVERY_S", 0.0)  # captured: a log, lines at once
    with LLM(engine, ExecutorOptions(device="cpu", num_threads=1)) as llm:
        run_benchmark(llm.core, Workload(8, 2, 3), progress=True, label="warm-up")
    err = capsys.readouterr().err
    assert "warm-up" in err and "3/3" in err


def test_bench_json_output_dash_is_standard_output(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = kiln("bench", "--engine_dir", str(engine), "--input_len", "8", "--output_len", "2",
             "--num_requests", "1", "--json_output", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output_tokens"] == 2  # the JSON alone: the table is on stderr
    assert "TTFT (ms)" in r.stderr
    assert not (tmp_path / "-").exists()


def test_a_one_token_output_has_no_time_per_token_and_the_report_stays_json(engine):
    r = kiln("bench", "--engine_dir", str(engine), "--input_len", "8", "--output_len", "1",
             "--num_requests", "2", "--json_output", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert report["tpot_ms"] == report["itl_ms"] == {"mean": None, "p50": None, "p90": None,
                                                     "p99": None}
    assert report["ttft_ms"]["p50"] > 0
    (tpot,) = [line for line in r.stderr.splitlines() if line.startswith("TPOT (ms)")]
    assert tpot.split()[2:] == ["-"] * 4


def test_bench_refuses_lengths_beyond_the_engine(engine):
    r = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--input_len", "40",
                                  "--output_len", "80"])
    assert r.exit_code == 2 and "max_seq_len 96" in r.output


def test_a_request_ending_in_error_is_reported_and_exits_2(monkeypatch):
    """Non-finite logits end that request with an error; kiln run says why, the other
    request's text is still printed, and the exit status is 2."""
    from tests.runtime.mocks import NonFiniteExecutor

    def poisoned_llm(engine_dir, options):
        return LLM.from_executor(NonFiniteExecutor(LIMITS, 64, poison=7, after=3), None)

    monkeypatch.setattr("kiln.runtime.LLM", poisoned_llm)
    monkeypatch.setattr(run_module, "read_prompts", lambda *a: [[7, 1, 2, 3], [5, 1]])
    monkeypatch.setattr(run_module, "check_engine", lambda *a: None)  # no engine dir to read
    result = kiln("run", "--engine_dir", "mock", "--input_text", "x", "--max_output_len", "4")
    assert result.exit_code == 2
    assert "error: request" in result.stderr and "not finite (NaN or Inf)" in result.stderr
    # a trial's damaged engine file had been sent to its (good) checkpoint and a float32 build
    assert "check its files with kiln verify ENGINE_DIR and the checkpoint it was built from" \
        in result.stderr
    assert result.stdout.startswith("[1]\n")


@pytest.mark.parametrize("args,said", [
    (["--input_text", "x", "--input_text", ""], "prompt 2: the prompt is empty; give at least "
                                               "one token"),  # counted from 1, as given
    (["--input_text", "word " * 5000], "prompt 1: prompt of 5001 tokens exceeds the engine's "
                                       "max_input_len 48; shorten it"),
    # the chat template's tokens had hidden the empty message: it ran
    (["--chat", "--input_text", ""], "prompt 1: the prompt is empty; give at least one token"),
    (["--chat", "--input_text", "x", "--input_text", ""], "prompt 2: the prompt is empty; "
                                                         "give at least one token"),
], ids=["empty", "too long", "empty chat", "empty second chat"])
def test_a_prompt_the_engine_would_refuse_is_refused_before_the_load(engine, monkeypatch, args,
                                                                     said):
    def no_load(*args, **kwargs):
        raise AssertionError("the engine was loaded before its prompts were checked")

    monkeypatch.setattr("kiln.runtime.LLM", no_load)
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), *args])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.startswith(f"error: {said}"), r.output


def test_a_blank_prompt_runs_with_chat_as_without(engine):
    """Whitespace is text, which the model reads as tokens: only an empty prompt is refused,
    with --chat or without."""
    for chat in ([], ["--chat"]):
        r = kiln("run", "--engine_dir", str(engine), "--input_text", " \n", "--max_output_len",
                 "2", "--ignore_eos", *chat)
        assert r.exit_code == 0 and "2 tokens, 1 request" in r.stderr, (chat, r.output)


def test_chat_without_a_chat_template_is_refused_before_the_load(engine, tmp_path,
                                                                 monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the engine was loaded before --chat was checked")

    bare = Path(shutil.copytree(engine, tmp_path / "engine"))
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    monkeypatch.setattr("kiln.runtime.LLM", no_load)
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(bare), "--input_text", "x",
                                  "--chat"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output == (f"error: --chat: {bare} has no chat template (tokenizer_config.json "
                        f"chat_template or chat_template.jinja); run without --chat, or copy "
                        f"the model's template into that directory\n")


def test_stop_token_ids_outside_the_vocabulary_are_refused_before_the_load(engine,
                                                                           monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the engine was loaded before --stop_token_ids was checked")

    monkeypatch.setattr("kiln.runtime.LLM", no_load)
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_text", "x",
                                  "--stop_token_ids", "5", "--stop_token_ids", "49152"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert ("Invalid value for --stop_token_ids: token id 49152 is outside the vocabulary "
            "[0, 49152); pass ids of the model's tokenizer") in r.output


def test_input_file_dash_reads_one_prompt_from_stdin(engine, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Hello there")
    args = ["run", "--engine_dir", str(engine), "--max_output_len", "4", "--ignore_eos"]
    from_file = CliRunner().invoke(main, [*args, "--input_file", str(f)])
    piped = CliRunner().invoke(main, [*args, "--input_file", "-"], input="Hello there")
    assert from_file.exit_code == piped.exit_code == 0, piped.output
    assert piped.stdout == from_file.stdout and piped.stdout.strip()
    echoed = CliRunner().invoke(main, [*args, "--input_file", "-"], input="Hello there\n")
    assert echoed.stdout == from_file.stdout  # echo's newline is not part of the prompt
    empty = CliRunner().invoke(main, [*args, "--input_file", "-"], input="")
    assert empty.exit_code == 2 and "stdin: empty; pipe the prompt in" in empty.output
    twice = CliRunner().invoke(main, [*args, "--input_file", "-", "--input_file", "-"],
                               input="Hello there")
    assert twice.exit_code == 2 and "- (standard input) given more than once" in twice.output


def test_input_file_repeats_in_order_after_the_texts(tmp_path):
    from kiln.cli.run import read_prompts

    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "b.jsonl").write_text('"second"\n"third"\n')
    assert read_prompts(("zero",), (tmp_path / "a.txt", tmp_path / "b.jsonl")) == \
        ["zero", "first", "second", "third"]


def test_a_seed_out_of_range_names_no_none(engine):
    """A flag cannot give None: a trial read "... or None" in the CLI's message."""
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_text", "x",
                                  "--seed", str(2**64)])
    assert r.exit_code == 2 and "None" not in r.output, r.output
    assert ("--seed: must be an integer in [-9223372036854775808, 18446744073709551615], found "
            "18446744073709551616") in r.output


def test_jsonl_keys_other_than_prompt_are_said_not_to_be_read(tmp_path, caplog):
    """A trial's {"prompt": "Hi", "max_tokens": 2} ran at --max_output_len without a word."""
    import logging

    from kiln.cli.run import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "max_tokens": 2, "id": 7}\n"b"\n{"prompt": "c", "n": 3}\n'
                 '{"id": 8, "prompt": "d"}\n')
    with caplog.at_level(logging.WARNING):
        assert read_prompts((), (f,)) == ["a", "b", "c", "d"]
    assert caplog.messages == [f"{f}: only each line's 'prompt' is read; 'max_tokens' (line 1), "
                               f"'id' (line 1), 'n' (line 3) are not (sampling settings are "
                               f"options, for every prompt: kiln run --help)"]
    caplog.clear()
    f.write_text('{"prompt": "a", "id": 1}\n')
    with caplog.at_level(logging.WARNING):
        read_prompts((), (f,))
    assert caplog.messages[0].endswith("'id' (line 1) is not (sampling settings are options, "
                                       "for every prompt: kiln run --help)")
    caplog.clear()
    f.write_text('{"prompt": "a"}\n"b"\n')
    with caplog.at_level(logging.WARNING):
        assert read_prompts((), (f,)) == ["a", "b"]
    assert caplog.messages == []


def test_input_file_dash_with_stdin_closed_is_one_line(monkeypatch):
    from kiln.cli.run import read_prompts

    monkeypatch.setattr("sys.stdin", None)
    with pytest.raises(click.BadParameter, match="stdin: closed; pipe the prompt in"):
        read_prompts((), Path("-"))


def test_a_jsonl_prompt_with_a_lone_surrogate_is_one_line_naming_the_line(engine, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"fine"\n{"prompt": "bad \\ud800"}\n')
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--input_file", str(f)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"{f} line 2: 'prompt' holds a lone surrogate escape" in r.output


@pytest.mark.parametrize("warmup", ["0", "2"])
def test_bench_of_an_engine_with_non_finite_logits_is_one_line_and_exits_2(monkeypatch, warmup):
    """Every request's logits turn NaN: no figures to report, so one line saying how many
    requests failed and why (not an IndexError from an empty report)."""
    from tests.runtime.mocks import NonFiniteExecutor

    class AllPoisoned(NonFiniteExecutor):  # every sequence as if it started with the poison
        def logits(self, history):
            return super().logits([self.poison, *history[1:]])

    def poisoned_llm(engine_dir, options):
        return LLM.from_executor(AllPoisoned(LIMITS, 64, poison=0, after=2), None)

    monkeypatch.setattr("kiln.runtime.LLM", poisoned_llm)
    r = CliRunner().invoke(main, ["bench", "--engine_dir", "mock", "--input_len", "8",
                                  "--output_len", "4", "--num_requests", "3",
                                  "--warmup", warmup])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.output.count("\n") == 1 and "requests failed; the first: request" in r.output
    assert "not finite (NaN or Inf)" in r.output


def _result(token_times, finish_reason="length"):
    return CompletionResult("r", None, (), "", tuple(range(len(token_times))), finish_reason,
                            None, None, RequestTimings(0.0, tuple(token_times), 1.0))


@pytest.mark.parametrize("results,line", [
    ([_result([0.25, 0.5, 0.75])],
     "TTFT 250.0 ms | time per output token 250.0 ms | 3.0 tokens/s (3 tokens, 1 request, "
     "finish: length)"),
    ([_result([0.5])],
     "TTFT 500.0 ms | time per output token - | 1.0 tokens/s (1 token, 1 request, "
     "finish: length)"),
    ([_result([], "error"), _result([], "error")],
     "TTFT - | time per output token - | 0.0 tokens/s (0 tokens, 2 requests, finish: error)"),
])
def test_stats_print_a_dash_for_a_figure_that_does_not_exist(results, line):
    assert run_module.format_stats(results) == line
