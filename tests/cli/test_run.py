"""kiln run and kiln bench on a toy onnx engine with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.cli.bench import bench
from kiln.cli.main import main
from kiln.cli.run import run
from kiln.engine import BuildLimits
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


def test_run_prints_text_then_stats(engine):
    r = kiln("run", "--engine_dir", str(engine), "--input_text", "Hello there",
             "--max_output_len", "6", "--ignore_eos")
    assert r.exit_code == 0, r.output
    text, stats = r.output.rstrip("\n").rsplit("\n", 1)
    assert text.strip()
    assert stats.startswith("TTFT ") and "time per output token" in stats
    assert "6 tokens, 1 request, finish: length" in stats


def test_streaming_prints_the_same_text(engine):
    args = ["run", "--engine_dir", str(engine), "--input_text", "Hi", "--max_output_len", "8",
            "--ignore_eos", "--temperature", "0"]
    plain = kiln(*args).output.splitlines()[0]
    streamed = kiln(*args, "--streaming").output.splitlines()[0]
    assert streamed == plain


def test_sampling_flags_and_seed_reproducible(engine):
    args = ["run", "--engine_dir", str(engine), "--input_text", "Hi", "--max_output_len", "8",
            "--temperature", "1.0", "--top_k", "40", "--top_p", "0.9", "--seed", "3",
            "--repetition_penalty", "1.2", "--ignore_eos"]
    assert kiln(*args).output.splitlines()[0] == kiln(*args).output.splitlines()[0]


def test_input_file_jsonl_gives_one_result_per_line(engine, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('"first"\n{"prompt": "second"}\n')
    r = kiln("run", "--engine_dir", str(engine), "--input_file", str(f), "--max_output_len", "3",
             "--ignore_eos")
    assert r.exit_code == 0 and r.output.startswith("[0] ") and "\n[1] " in r.output
    assert "6 tokens, 2 requests" in r.output


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "SamplingParams.temperature must be >= 0"),
    (["--top_p", "0"], "SamplingParams.top_p must be in (0, 1]"),
    (["--input_text", "word " * 60], "exceeds the engine's max_input_len 48"),
])
def test_bad_input_is_one_line_and_exit_2(engine, args, message):
    base = ["run", "--engine_dir", str(engine)]
    if "--input_text" not in args:
        base += ["--input_text", "Hi"]
    r = CliRunner().invoke(main, [*base, *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


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
    assert report["ttft_ms"]["p99"] >= report["ttft_ms"]["p50"] > 0


def test_bench_refuses_lengths_beyond_the_engine(engine):
    r = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--input_len", "40",
                                  "--output_len", "80"])
    assert r.exit_code == 2 and "max_seq_len 96" in r.output
