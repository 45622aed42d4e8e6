"""kiln bench --baseline hf: the same prompts through HF generate() on a torch engine's weights."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from kiln.builder.api import build
from kiln.cli.main import main
from kiln.testing.smollm2 import smollm2_hf_dir
from tests.models import hf_model, kiln_checkpoint


def test_bench_reports_kiln_over_hf(tmp_path):
    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    shutil.copy(smollm2_hf_dir() / "tokenizer.json", ckpt / "tokenizer.json")  # text I/O only
    build(ckpt, tmp_path / "engine", backend="torch", max_batch_size=4, max_seq_len=32,
          dtype="float32")
    result = CliRunner().invoke(main, ["bench", "--engine_dir", str(tmp_path / "engine"),
                                       "--input_len", "6", "--output_len", "4", "--num_requests",
                                       "3", "--warmup", "0", "--device", "cpu", "--baseline", "hf",
                                       "--baseline_batch_size", "2"])
    assert result.exit_code == 0, result.output
    lines = {line.split("  ")[0]: line for line in result.output.splitlines()}
    hf_rate = float(lines["HF generate tokens/s"].split()[3])
    ratio = float(lines["kiln / HF"].split()[3].rstrip("x"))
    assert hf_rate > 0 and ratio > 0
    assert "(batch 2, cpu)" in lines["HF generate tokens/s"]
    wide = CliRunner().invoke(main, ["bench", "--engine_dir", str(tmp_path / "engine"),
                                     "--input_len", "6", "--output_len", "2", "--num_requests",
                                     "3", "--warmup", "0", "--device", "cpu", "--baseline", "hf"])
    assert wide.exit_code == 0, wide.output
    assert "(batch 3, cpu)" in wide.output  # the batch that ran: all 3, not the default 64
    out = tmp_path / "report.json"
    one_at_a_time = CliRunner().invoke(main, [
        "bench", "--engine_dir", str(tmp_path / "engine"), "--input_len", "6", "--output_len",
        "2", "--num_requests", "3", "--concurrency", "1", "--warmup", "0", "--device", "cpu",
        "--baseline", "hf", "--json_output", str(out)])
    assert one_at_a_time.exit_code == 0, one_at_a_time.output
    assert "(batch 1, cpu)" in one_at_a_time.output  # as kiln ran them: one at a time
    report = json.loads(out.read_text())["baseline"]
    assert report["name"] == "hf" and report["batch_size"] == 1
    assert report["output_tokens_per_s"] > 0 and report["kiln_over_baseline"] > 0


def test_baseline_on_a_non_torch_engine_is_refused_before_any_work(tmp_path, monkeypatch):
    from kiln.engine import BuildLimits
    from tests.runtime.toy_onnx import toy_engine_dir

    engine = toy_engine_dir(tmp_path / "engine", BuildLimits(2, 8, 16, 16))
    def no_work(*args, **kwargs):
        raise AssertionError("the engine was loaded before the options were checked")

    monkeypatch.setattr("kiln.runtime.llm.open_engine", no_work)
    result = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--baseline", "hf"])
    assert result.exit_code == 2
    assert "was built with --backend onnx; build one with kiln build --backend torch" in result.output


def _bench(engine, *args):
    return CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--input_len", "4",
                                     "--output_len", "2", "--num_requests", "2", *args],
                              prog_name="kiln")


def test_json_output_never_overwrites_a_users_file_or_writes_into_the_engine(tmp_path):
    from kiln.engine import BuildLimits
    from kiln.testing.smollm2 import smollm2_hf_dir
    from tests.runtime.toy_onnx import toy_engine_dir

    engine = toy_engine_dir(tmp_path / "engine", BuildLimits(2, 8, 16, 16), vocab=49152,
                            tokenizer_dir=smollm2_hf_dir())
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    manifest = (engine / "config.json").read_text()
    for target, message in ((notes, "exists and is not a kiln bench report"),
                            (engine / "config.json", "is inside the engine dir"),
                            (engine / "report.json", "is inside the engine dir")):
        result = _bench(engine, "--json_output", str(target))
        assert result.exit_code == 2 and message in result.output, result.output
    assert notes.read_text() == "mine" and (engine / "config.json").read_text() == manifest
    report = tmp_path / "report.json"
    for _ in range(2):  # a report kiln wrote may be replaced
        result = _bench(engine, "--json_output", str(report))
        assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["workload"]["num_requests"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "notes.txt", "report.json"]
    # one the user has changed (a value edited, a note added) is the user's; so is any path
    # in a dir kiln writes whole
    edited = json.loads(report.read_text())
    edited["workload"]["seed"] = 1
    report.write_text(json.dumps(edited, indent=2) + "\n")
    other = toy_engine_dir(tmp_path / "other", BuildLimits(2, 8, 16, 16), vocab=49152)
    entry = tmp_path / "cache" / "0123"  # a build cache entry: entry.json beside its engine
    toy_engine_dir(entry / "engine", BuildLimits(2, 8, 16, 16), vocab=49152)
    (entry / "entry.json").write_text("{}")
    for target, message in ((report, "exists and is not a kiln bench report as kiln writes"),
                            (other / "r.json", f"is inside an engine dir {other}, which kiln"),
                            (entry / "r.json", f"is inside a build cache entry {entry}")):
        result = _bench(engine, "--json_output", str(target))
        assert result.exit_code == 2 and message in result.output, result.output
    assert json.loads(report.read_text()) == edited and not (other / "r.json").exists()
    assert not (entry / "r.json").exists()


def test_json_output_larger_than_a_report_is_not_read(tmp_path, monkeypatch):
    """An existing --json_output file over the report size cap is refused unread, even one
    that parses as a report (padded); a report within the cap may be replaced."""
    import dataclasses

    import click
    import pytest

    from kiln.cli import bench as bench_cli
    from kiln.runtime.bench import BenchReport

    monkeypatch.setattr(bench_cli, "_REPORT_MAX_BYTES", 1024)
    report = tmp_path / "report.json"
    bench_cli.write_report(report, json.dumps(
        dict.fromkeys(f.name for f in dataclasses.fields(BenchReport))))
    bench_cli._check_json_output(report, None)  # a report: may be replaced
    report.write_text(report.read_text() + " " * 1024)
    with pytest.raises(click.BadParameter, match="exists and is not a kiln bench report"):
        bench_cli._check_json_output(report, None)


def test_bench_freezes_the_loaded_objects_before_its_measured_run(tmp_path, monkeypatch):
    """kiln bench owns its process: once the engine is loaded and warm, the collector's full
    passes skip what is alive (kiln.runtime.core.freeze_loaded_objects), before the timed run."""
    from kiln.engine import BuildLimits
    from kiln.runtime import bench
    from kiln.testing.smollm2 import smollm2_hf_dir
    from tests.runtime.toy_onnx import toy_engine_dir

    engine = toy_engine_dir(tmp_path / "engine", BuildLimits(2, 8, 16, 16), vocab=49152,
                            tokenizer_dir=smollm2_hf_dir())
    events = []
    monkeypatch.setattr("kiln.runtime.core.freeze_loaded_objects",
                        lambda: events.append("freeze") or 0)
    real = bench.run_benchmark
    monkeypatch.setattr(bench, "run_benchmark",
                        lambda *a, **k: events.append("workload") or real(*a, **k))
    result = _bench(engine, "--warmup", "1")
    assert result.exit_code == 0, result.output
    assert events == ["workload", "freeze", "workload"]  # warm-up, freeze, the measured run
