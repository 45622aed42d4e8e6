"""``--json_output`` of kiln bench, eval and bench_serve (kiln/cli/bench.py): missing parent
directories are made at the write, the file is written atomically, and a directory is never
taken for the file."""

from __future__ import annotations

import json
import logging
import os

import pytest
from click.testing import CliRunner

from kiln.cli import bench as bench_cli
from kiln.cli.main import main
from kiln.errors import OutputError


def _invoke(*args):
    return CliRunner().invoke(main, list(args), prog_name="kiln")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from kiln.engine import BuildLimits
    from kiln.testing.smollm2 import smollm2_hf_dir
    from tests.runtime.toy_onnx import toy_engine_dir

    return toy_engine_dir(tmp_path_factory.mktemp("bench") / "engine",
                          BuildLimits(2, 8, 16, 16), vocab=49152, tokenizer_dir=smollm2_hf_dir())


def _bench(engine, *args):
    return _invoke("bench", "--engine_dir", str(engine), "--input_len", "4", "--output_len",
                   "2", "--num_requests", "2", "--warmup", "0", *args)


def test_missing_parent_directories_are_made(engine, tmp_path):
    """They had been refused ("no such directory; create it"), where --output_dir makes its
    parents."""
    out = tmp_path / "reports" / "today" / "r.json"
    result = _bench(engine, "--json_output", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["workload"]["num_requests"] == 2
    assert os.listdir(out.parent) == ["r.json"]  # no temporary file left beside it


def test_a_path_under_a_file_is_one_line_and_makes_nothing(engine, tmp_path):
    (tmp_path / "notes").write_text("mine")
    out = tmp_path / "notes" / "new" / "r.json"
    result = _bench(engine, "--json_output", str(out))
    assert result.exit_code == 2 and result.output == (
        f"error: Invalid value for --json_output: {out}: cannot be written, {tmp_path / 'notes'} "
        f"is a file, not a directory; write the report elsewhere (see kiln bench --help)\n"), \
        result.output
    assert sorted(os.listdir(tmp_path)) == ["notes"] and (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("command", [["bench", "--engine_dir", "e"],
                                     ["eval", "--engine_dir", "e", "--dataset", "x.txt"],
                                     ["bench_serve", "--serve", "http://127.0.0.1:9"]])
@pytest.mark.parametrize("name, why", [("adir", "is a directory"),
                                       ("adir/", "ends with '/', so it names a directory"),
                                       ("new/", "ends with '/', so it names a directory")])
def test_a_directory_is_refused_in_one_line(command, name, why, tmp_path):
    """A trailing slash had been dropped: `--json_output reports/` wrote a file named reports."""
    (tmp_path / "adir").mkdir()
    path = f"{tmp_path}/{name}"
    result = _invoke(*command, "--json_output", path)
    assert result.exit_code == 2 and result.output == (
        f"error: Invalid value for '--json_output': '{path}' {why}; give a file's path, not a "
        f"directory's (see kiln {command[0]} --help)\n"), result.output
    assert sorted(os.listdir(tmp_path)) == ["adir"] and os.listdir(tmp_path / "adir") == []


@pytest.mark.parametrize("seed", ["-1", str(-2**63), str(2**64 - 1)])
def test_bench_serve_takes_the_seeds_kiln_bench_takes(seed):
    """--seed -1 had been refused by bench_serve and taken by kiln bench; both read it modulo
    2**64 now (tests/serve/test_bench.py): past the flag, the unreachable server is the error."""
    result = _invoke("bench_serve", "--serve", "http://127.0.0.1:9", "--seed", seed)
    assert result.exit_code == 2 and "cannot reach" in result.output, result.output


@pytest.mark.parametrize("seed", [str(2**64), str(-2**63 - 1)])
def test_bench_serve_refuses_a_seed_out_of_kiln_bench_range(seed):
    result = _invoke("bench_serve", "--serve", "http://127.0.0.1:9", "--seed", seed)
    assert result.exit_code == 2 and result.output == (
        f"error: Invalid value for '--seed': {seed} is not in the range "
        f"-9223372036854775808<=x<=18446744073709551615. (see kiln bench_serve --help)\n"), \
        result.output


def test_bench_takes_the_seeds_kiln_run_takes(engine, tmp_path):
    """kiln run --seed -1 was taken (SamplingParams reads it modulo 2**64) and kiln bench
    --seed -1 refused; -1 draws 2**64 - 1's prompts (tests/runtime/test_bench.py)."""
    for seed in ("-1", str(2**64 - 1)):  # the last one's warm-up draws with seed + 7 - 2**64
        out = tmp_path / f"{seed}.json"
        result = _invoke("bench", "--engine_dir", str(engine), "--input_len", "4",
                         "--output_len", "2", "--num_requests", "2", "--warmup", "1",
                         "--seed", seed, "--json_output", str(out))
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["workload"]["seed"] == int(seed)
    result = _invoke("bench", "--engine_dir", "e", "--seed", str(2**64))
    assert result.exit_code == 2 and result.output == (
        f"error: Invalid value for '--seed': {2**64} is not in the range "
        f"-9223372036854775808<=x<=18446744073709551615. (see kiln bench --help)\n"), \
        result.output


def test_a_failed_write_leaves_nothing_and_removes_the_parents_it_made(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError, match=r"r.json: cannot be written \(No space left on "
                                          r"device\); nothing was left half-written"):
        bench_cli.write_report(tmp_path / "a" / "b" / "r.json", "{}")
    assert os.listdir(tmp_path) == []


def test_a_directory_that_appeared_at_the_path_is_not_replaced(tmp_path):
    (tmp_path / "r.json").mkdir()
    (tmp_path / "r.json" / "keep").write_text("mine")
    with pytest.raises(OutputError, match=r"r.json: cannot be written \(Is a directory\)"):
        bench_cli.write_report(tmp_path / "r.json", "{}")
    assert (tmp_path / "r.json" / "keep").read_text() == "mine"
    assert os.listdir(tmp_path) == ["r.json"]


@pytest.mark.parametrize("args, said", [
    (["--concurrency", "2"], None),
    (["--concurrency", "1000"], "--concurrency 1000: the engine runs at most 2 requests at once "
                                "(its max_batch_size); the others wait in its queue, and their "
                                "wait counts in their TTFT"),
    (["--concurrency", "5", "--dp", "2"], "--concurrency 5: the engine runs at most 4 requests "
                                          "at once (2 replicas of max_batch_size 2); the others"),
])
def test_a_concurrency_past_the_engine_s_slots_is_said(engine, tmp_path, caplog, args, said):
    """A retest's --concurrency 1000 on an engine of 8 slots ran without a word (the report
    says "concurrency 1000"); retest 44c's --dp 2 had been told of a max_batch_size of 4."""
    with caplog.at_level(logging.WARNING, logger="kiln"):
        result = _bench(engine, *args, "--json_output", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if "--concurrency" in r.getMessage()]
    assert len(warned) == (said is not None) and all(w.startswith(said) for w in warned), warned


def test_lengths_past_the_engine_say_what_fits(engine):
    """Retest 44c: the defaults (128 each) on a small engine had been refused with no values
    that fit."""
    result = _invoke("bench", "--engine_dir", str(engine), "--input_len", "4", "--num_requests",
                     "2", "--warmup", "0")
    assert result.exit_code == 2 and result.output == (
        "error: Invalid value for --output_len: input_len + output_len - 1 = 131 exceeds the "
        "engine's max_seq_len 16; pass an --input_len and --output_len (128 each by default) "
        "that add up to at most 17 (see kiln bench --help)\n"), result.output
