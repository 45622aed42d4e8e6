"""The build command (parse, validate, call kiln.builder.build) and what an engine dir holds."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import onnx
import pytest
from click.testing import CliRunner

from kiln.cli.build import build
from kiln.cli.context import CliContext, MemorySize
from kiln.engine import read_manifest, verify_files
from kiln.errors import OutputExistsError
from tests.builder.conftest import engine_runner
from tests.builder.reference_steps import SCHEDULE


def invoke(*args: str):
    return CliRunner().invoke(build, list(args), obj=CliContext(debug=False, verbosity=0))


def test_cli_builds(checkpoint, tmp_path):
    ckpt = shutil.copytree(checkpoint("llama-gqa"), tmp_path / "ckpt")
    (ckpt / "tokenizer.json").write_text("{}")  # stands in for a real tokenizer file
    result = invoke("--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e"),
                    "--max_seq_len", "32", "--max_input_len", "8", "--max_batch_size", "2",
                    "--norm_plugin", "disable", "--target", "cpu", "--max_build_memory", "4GB")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "e")
    assert "built" in result.stderr and "total" in result.stderr  # the timing summary
    manifest = read_manifest(tmp_path / "e")
    assert manifest.plugins["norm"] is False and manifest.plugins["attention"] is True
    assert (manifest.limits.max_seq_len, manifest.limits.max_input_len,
            manifest.limits.max_batch_size, manifest.limits.max_num_tokens) == (32, 8, 2, 8)
    assert (tmp_path / "e" / "tokenizer.json").read_text() == "{}"


@pytest.mark.parametrize("verbosity,level", [(0, logging.WARNING), (1, logging.INFO)])
def test_cli_build_reports_once(checkpoint, tmp_path, caplog, verbosity, level):
    """The summary and the plugin choice appear once, with and without -v (the level kiln's
    main sets for it)."""
    with caplog.at_level(level, logger="kiln"):
        result = CliRunner().invoke(build, ["--checkpoint_dir", str(checkpoint("llama-gqa")),
                                            "--output_dir", str(tmp_path / "e"),
                                            "--max_seq_len", "32"],
                                    obj=CliContext(debug=False, verbosity=verbosity))
    assert result.exit_code == 0, result.output
    logged = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("built ") for m in logged + result.stderr.splitlines()) == 1
    assert f"built {tmp_path / 'e'} (onnx for cpu, 2 files, 1 part): " in result.stderr
    assert [m for m in logged if m.startswith("plugins ")] == (
        ["plugins fused: gated_mlp, gqa, norm, residual_norm; "
         "replaced by gqa: attention, kv_cache, rotary"] if verbosity else [])


@pytest.mark.parametrize("args,message", [
    (["--attention_plugin", "on"], "'on' is not one of 'auto', 'enable', 'disable'"),
    (["--max_build_memory", "lots"], "not a size like 20GB"),
    (["--max_build_memory", "1.5"], "'1.5' is not a whole number of bytes; give bytes"),
    (["--target", "gpu"], "expected compute capabilities"),
    (["--backend", "nope"], "'nope' is not one of"),
    (["--max_seq_len", "0"], "0 is not in the range x>=2"),
    (["--max_seq_len", "1"], "1 is not in the range x>=2"),  # it had built
    (["--max_seq_len", "-1"], "-1 is not in the range x>=2"),
    (["--max_batch_size", "0"], "0 is not in the range x>=1"),
    (["--max_num_tokens", "0"], "0 is not in the range x>=1"),
    (["--max_input_len", "0"], "0 is not in the range x>=1"),
])
def test_cli_rejects_bad_options(tmp_path, args, message):
    result = invoke("--checkpoint_dir", str(tmp_path), "--output_dir", str(tmp_path / "e"), *args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "e").exists()


def test_cli_user_errors_are_kiln_errors(checkpoint, tmp_path):
    (tmp_path / "e").mkdir()
    result = invoke("--checkpoint_dir", str(checkpoint("llama-gqa")), "--output_dir",
                    str(tmp_path / "e"))
    assert isinstance(result.exception, OutputExistsError)  # the kiln group prints one line


@pytest.mark.parametrize("text,size", [("20GB", 20 * 10**9), ("512MiB", 512 * 2**20),
                                       ("1.5e9", 1_500_000_000), ("4096", 4096), ("2g", 2 * 10**9)])
def test_memory_sizes(text, size):
    assert MemorySize().convert(text, None, None) == size


def test_engine_dir_contents(checkpoint, tmp_path):
    from kiln.builder import build as api_build
    ckpt = checkpoint("falcon-rw-alibi")
    result = api_build(ckpt, tmp_path / "e", max_batch_size=4, max_seq_len=32,
                       max_num_tokens=24)
    engine = tmp_path / "e"
    manifest = read_manifest(engine)
    source = json.loads((ckpt / "config.json").read_text())
    assert manifest.decoder.to_dict() == source["decoder"]
    assert manifest.source["checkpoint_dir"] == str(ckpt)
    assert manifest.targets == ("cpu",) and set(manifest.backend_version) == {"onnx", "onnxruntime"}
    assert manifest.limits.max_num_tokens == 24 and manifest.limits.max_input_len == 32
    verify_files(engine, manifest, 0)
    assert set(result.seconds) == {"plan", "parts", "total"} and result.peak_rss > 0
    graph = onnx.load(str(engine / "rank0.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input][:4] == ["input_ids", "position_ids", "past_len",
                                                      "last_index"]
    assert [o.name for o in graph.graph.output] == ["logits"] + [
        f"present_{kind}_{i}" for i in range(2) for kind in ("key", "value")]
    assert engine_runner(engine).step(SCHEDULE[0]).shape == (2, manifest.decoder.vocab_size)


def test_node_names_follow_the_scheme(checkpoint, tmp_path):
    from kiln.builder.graph.context import GraphSpec, PartSpec
    from kiln.builder.graph.decoder import write_part
    from kiln.checkpoint import load_config
    from kiln.plugins import PLUGINS
    ckpt = checkpoint("llama-gqa")
    config = load_config(ckpt)
    standard = dict.fromkeys(PLUGINS, True) | {"gqa": False, "residual_norm": False}
    spec = GraphSpec(config.decoder, config.mapping, "float32", 32, standard)
    path = write_part(spec, PartSpec(0, range(2), True, True), ckpt / "rank0.safetensors",
                      tmp_path)
    names = {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}
    for expected in ("/model/embed/Gather", "/model/layers.0/attn/qkv/MatMul",
                     "/model/layers.1/attn/o/MatMul", "/model/layers.0/attn/q_rotary/RotaryEmbedding",
                     "/model/layers.0/attn/kv_cache/TensorScatter",
                     "/model/layers.0/attn/sdpa/Attention",
                     "/model/layers.1/attn_norm/RMSNormalization",
                     "/model/layers.0/mlp/GatedMLP", "/model/final_norm/RMSNormalization",
                     "/model/lm_head/MatMul", "/model/shared/mask/causal/LessOrEqual"):
        assert expected in names, expected
    assert len(names) == len(onnx.load(str(path), load_external_data=False).graph.node)


def test_onnx_cuda_target_is_provider_independent(checkpoint, reference_logits, tmp_path):
    """Target cuda: basic optimizations only, so the graph also runs on the CPU provider."""
    from kiln.builder import build as api_build
    api_build(checkpoint("llama-gqa"), tmp_path / "e", targets=["cuda"], max_batch_size=4,
              max_input_len=16, max_seq_len=32)
    graph = onnx.load(str(tmp_path / "e" / "rank0.onnx"), load_external_data=False)
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # no CPU-only contrib ops
    runner = engine_runner(tmp_path / "e")
    for chunks, want in zip(SCHEDULE, reference_logits("llama-gqa"), strict=True):
        assert float(abs(runner.step(chunks) - want).max()) <= 1e-4


def test_an_onnx_build_shows_its_phase_live(checkpoint, tmp_path, capsys, monkeypatch):
    """With progress on a terminal, each part names its running phase on a live line, which
    the runner's one-line report replaces when the part is done."""
    from kiln.builder import build as api_build
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stream, as a terminal
    api_build(checkpoint("llama-gqa"), tmp_path / "e", max_seq_len=32, progress=True)
    err = capsys.readouterr().err
    assert "rank 0 layers 0-1: graph" in err and "rank 0 layers 0-1: optimize" in err
    api_build(checkpoint("llama-gqa"), tmp_path / "quiet", max_seq_len=32)
    assert ": optimize" not in capsys.readouterr().err
