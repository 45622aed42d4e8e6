"""Bad input: typed one-line errors, raised before anything is written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from unittest import mock

import pytest

from kiln.builder import build
from kiln.builder.onnx_backend import OnnxBackend
from kiln.builder.options import MIN_BUILD_MEMORY, _check_positions
from kiln.config import PositionType
from kiln.engine import BuildLimits, EngineError
from kiln.errors import (
    CheckpointError,
    ConfigError,
    KilnError,
    OutputError,
    OutputExistsError,
    options_as_flags,
)
from tests.builder.conftest import LIMITS
from tests.helpers import flip_bits
from tests.models import hf_model_with_tokenizer, kiln_checkpoint


def fails(tmp_path, ckpt, error: type[KilnError], match: str, **options) -> None:
    """build raises ``error`` (one line, matching) and leaves nothing in ``tmp_path``."""
    before = set(tmp_path.iterdir())
    with pytest.raises(error, match=match) as info:
        build(ckpt, tmp_path / "engine", **{**LIMITS, **options})
    assert "\n" not in str(info.value)
    assert set(tmp_path.iterdir()) == before  # no engine, no temporary dir


@pytest.fixture
def ckpt_copy(checkpoint, tmp_path):
    src = checkpoint("llama-gqa")
    return shutil.copytree(src, tmp_path / "ckpt")


def test_missing_checkpoint(tmp_path):
    fails(tmp_path, tmp_path / "nope", CheckpointError, "no such kiln checkpoint directory")


def test_checkpoint_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    fails(tmp_path, tmp_path / "empty", CheckpointError, "config.json: missing")


def test_corrupt_config(ckpt_copy, tmp_path):
    (ckpt_copy / "config.json").write_text("{not json")
    fails(tmp_path, ckpt_copy, CheckpointError, "invalid JSON")


def test_truncated_rank_file(ckpt_copy, tmp_path):
    path = ckpt_copy / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    fails(tmp_path, ckpt_copy, CheckpointError,
          r"truncated\?\); write the checkpoint again \(kiln convert_checkpoint; kiln quantize "
          r"for a quantized one\), or copy it again$")


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_truncated_rank_file_says_how_to_write_it_again(ckpt_copy, tmp_path, backend):
    """kiln wrote the file: the remedy is kiln's command, not a download."""
    path = ckpt_copy / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:20])  # the header cut
    fails(tmp_path, ckpt_copy, CheckpointError, r"rank0\.safetensors: not a valid safetensors "
          r"file: .*; write the checkpoint again", backend=backend)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_tokenizer_is_refused_before_the_build(tmp_path, damage):
    """A trial's truncated tokenizer.json went into the engine (the build exited 0, kiln verify
    passed the engine's copy) and only kiln run failed."""
    ckpt_copy = kiln_checkpoint(hf_model_with_tokenizer("llama-gqa", tmp_path / "hf"),
                                tmp_path / "ckpt")
    path = ckpt_copy / "tokenizer.json"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-1000])
        problem = "changed since kiln convert_checkpoint wrote it (sha256 differs from " \
                  "config.json's)"
    else:
        path.unlink()
        problem = "missing (kiln convert_checkpoint wrote it)"
    fails(tmp_path, ckpt_copy, CheckpointError,
          f"^{path}: {re.escape(problem)}; copy the checkpoint again, or write it again with "
          f"kiln convert_checkpoint$")


def _nan_without_checksums(ckpt: Path) -> None:
    """The last values of rank 0's last tensor made NaN, in a checkpoint whose config records
    no checksums (as an older kiln's)."""
    with open(ckpt / "rank0.safetensors", "r+b") as f:  # NaN as one float32 or two 16-bit
        f.seek(-4, 2)
        f.write(b"\xc0\x7f\xc0\x7f")
    config = json.loads((ckpt / "config.json").read_text())
    del config["rank_checksums"]
    (ckpt / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_nan_weights_are_refused_where_no_checksum_says_so(ckpt_copy, tmp_path, backend):
    """A trial's checkpoint (no checksums, as an older kiln's) with NaN weights built, exit
    0, into an engine whose logits were NaN."""
    _nan_without_checksums(ckpt_copy)
    fails(tmp_path, ckpt_copy, CheckpointError,
          r"rank0\.safetensors: \S+ holds NaN/Inf values \(first at (row|element) \d+\); the "
          r"file is damaged: write the checkpoint again", backend=backend)



@pytest.fixture(scope="module")
def past_float16(tmp_path_factory):
    """A float32 checkpoint with one weight past float16's range (row 3 of layer 0's down)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("past_float16")
    hf = hf_model_with_tokenizer("llama-gqa", root / "hf")
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][3, 0] = 1e6
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    return kiln_checkpoint(hf, root / "ckpt", dtype="float32")


@pytest.mark.parametrize("backend", ["onnx", "torch", "tensorrt"])
def test_weights_past_the_build_dtype_are_refused(past_float16, tmp_path, backend):
    """Retest 48: --dtype float16 cast a float32 weight of 1e6 to inf, on every backend, into
    an engine kiln verify passed and whose logits were NaN at run; convert's --dtype
    float16 refuses it. Now the build too, naming the dtypes that hold it."""
    fails(tmp_path, past_float16, CheckpointError,
          r"rank0\.safetensors: layers\.0\.mlp\.down\.weight overflows float16: values "
          r"beyond \+-6\.55e\+04 \(first at row 3\) become inf; build with --dtype float32 "
          r"or bfloat16 \(onnx engines take no bfloat16\)$", backend=backend, dtype="float16",
          **({"targets": ("sm86",)} if backend == "tensorrt" else {}))
    if backend == "torch":  # as the message says (onnx engines take no bfloat16)
        build(past_float16, tmp_path / "bf16", **LIMITS, backend=backend, dtype="bfloat16")


def test_rank_file_missing(ckpt_copy, tmp_path):
    (ckpt_copy / "rank0.safetensors").unlink()
    fails(tmp_path, ckpt_copy, CheckpointError, "rank0.safetensors: missing")


def test_a_rank_file_changed_since_it_was_written_is_refused(ckpt_copy, tmp_path):
    """One byte of a weight flipped (a bad copy, a disk error): the header still reads, the
    tensors still build, and only the checksum convert recorded tells (a trial built an engine
    from a rank file with NaN bytes written into it)."""
    flip_bits(ckpt_copy / "rank0.safetensors", -7, 0x40)
    fails(tmp_path, ckpt_copy, CheckpointError,
          r"rank0.safetensors: its bytes are not those kiln convert_checkpoint wrote \(sha256 "
          r"[0-9a-f]{12}\.\.\., recorded [0-9a-f]{12}\.\.\.\): the file was changed or damaged")


def test_rank_files_copied_over_each_other_are_named(checkpoint, tmp_path):
    """Same names and shapes (two tensor-parallel ranks): only the checksums tell, and the
    message says whose bytes the file holds."""
    ckpt = shutil.copytree(checkpoint("llama-gqa", tp=2), tmp_path / "ckpt")
    shutil.copy(ckpt / "rank1.safetensors", ckpt / "rank0.safetensors")
    fails(tmp_path, ckpt, CheckpointError, "rank0.safetensors: holds the bytes kiln "
          "convert_checkpoint wrote to rank1.safetensors", backend="torch")


@pytest.mark.parametrize("value, match", [
    ("xyz", "rank_checksums must map each rank file to its sha256 \\(64 hex digits\\), "
            "found 'xyz'"),
    (None, "rank_checksums must map each rank file to its sha256 .*, found None"),
    ({"rank0.safetensors": 5}, "rank_checksums must map each rank file .*found "
                               "\\{'rank0.safetensors': 5\\}"),
    ({}, "rank_checksums lists no file, and the mapping's rank files are rank0.safetensors"),
    ("extra", "rank_checksums lists rank0.safetensors, rank1.safetensors, and the mapping's"),
], ids=["text", "null", "int", "empty", "extra"])
def test_recorded_checksums_that_are_not_sha256s_of_the_rank_files_are_refused(
        ckpt_copy, tmp_path, value, match):
    """A hand edit of config.json (a trial's: a traceback after the whole build for an int, a
    Python message for null): one line naming the key, before any work. With the config's
    digest (what kiln writes) the edit is named first, and its fix is to undo it; without,
    the key's own fix."""
    config = json.loads((ckpt_copy / "config.json").read_text())
    if value == "extra":
        value = {**config["rank_checksums"], "rank1.safetensors": "0" * 64}
    config["rank_checksums"] = value
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    fails(tmp_path, ckpt_copy, CheckpointError,
          f"config.json: edited since kiln wrote it .*, and as edited: {match}.*; undo the edit$")
    del config["manifest_sha256"]
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    fails(tmp_path, ckpt_copy, CheckpointError, f"config.json: {match}.*remove the key")


def test_a_checksum_recorded_in_capitals_is_the_same_checksum(ckpt_copy, tmp_path):
    """Windows' Get-FileHash prints capitals; a trial's correct edit was refused as damage."""
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["rank_checksums"] = {k: v.upper() for k, v in config["rank_checksums"].items()}
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    build(ckpt_copy, tmp_path / "engine", **LIMITS)


def test_a_checkpoint_without_recorded_checksums_builds(ckpt_copy, tmp_path, caplog):
    """Checkpoints written before kiln recorded them: built unchecked, said at INFO."""
    config = json.loads((ckpt_copy / "config.json").read_text())
    del config["rank_checksums"]
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with caplog.at_level("INFO", logger="kiln.checkpoint"):
        build(ckpt_copy, tmp_path / "engine", **LIMITS)
    assert "records no rank file checksums" in caplog.text


def test_rank_file_of_another_model(checkpoint, ckpt_copy, tmp_path):
    shutil.copy(checkpoint("mpt") / "rank0.safetensors", ckpt_copy / "rank0.safetensors")
    fails(tmp_path, ckpt_copy, CheckpointError, "do not match config.json")


@pytest.mark.parametrize("setting", ["hidden_size", "intermediate_size", "vocab_size"])
def test_a_config_edited_to_other_sizes_than_its_tensors_is_refused(ckpt_copy, tmp_path,
                                                                     setting):
    """A trial's config.json edited to hidden_size 96 over 64-wide weights built, verified and
    ran, its manifest recording 96."""
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["decoder"][setting] += 32
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    fails(tmp_path, ckpt_copy, CheckpointError,
          f"rank0.safetensors: .* is \\[.*\\], where config.json implies .*{setting} "
          f"{config['decoder'][setting]}.*re-run kiln convert_checkpoint")


def test_input_longer_than_sequence(checkpoint, tmp_path):
    fails(tmp_path, checkpoint("llama-gqa"), ConfigError, "max_input_len .* exceeds max_seq_len",
          max_input_len=40)


def test_a_given_input_length_past_the_default_sequence_names_the_default(checkpoint, tmp_path):
    """A retest's --max_input_len 300 of a model of 256 positions had been told to raise
    --max_seq_len, not that 256 was its default, nor that past it takes allow_long_context."""
    ckpt = checkpoint("llama-gqa")  # max_position_embeddings 64, no rope scaling
    before = set(tmp_path.iterdir())
    with pytest.raises(ConfigError) as info:
        build(ckpt, tmp_path / "engine", max_input_len=100)
    assert str(info.value) == (
        f"max_input_len=100 exceeds max_seq_len 64, the model's max_position_embeddings "
        f"({ckpt / 'config.json'}); lower max_input_len, or pass max_seq_len=100 or more with "
        f"allow_long_context=True")
    assert set(tmp_path.iterdir()) == before


def test_sequence_beyond_positions(checkpoint, tmp_path):
    ckpt = checkpoint("llama-gqa")  # max_position_embeddings 64, no rope scaling
    fails(tmp_path, ckpt, ConfigError, "allow_long_context", max_seq_len=128)
    result = build(ckpt, tmp_path / "engine", max_seq_len=128, allow_long_context=True)
    assert result.manifest.limits.max_seq_len == 128


def test_default_sequence_below_two_is_refused(ckpt_copy, tmp_path):
    """A trial's config.json edited to max_position_embeddings 1 had built an engine of
    max_seq_len 1 (every run gave one token); the default is refused in one line, exit 2."""
    from click.testing import CliRunner

    from kiln.cli.main import main

    config = json.loads((ckpt_copy / "config.json").read_text())
    config["decoder"]["max_position_embeddings"] = 1
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    fails(tmp_path, ckpt_copy, ConfigError,
          f"max_seq_len defaults to the checkpoint's max_position_embeddings 1 "
          f"\\({re.escape(str(ckpt_copy / 'config.json'))}\\), below the 2 kiln builds .*; "
          f"pass max_seq_len \\(with allow_long_context=True\\) or fix",
          max_seq_len=None, max_input_len=None)
    result = CliRunner().invoke(main, ["build", "--checkpoint_dir", str(ckpt_copy),
                                       "--output_dir", str(tmp_path / "engine")])
    assert result.exit_code == 2, result.output
    assert "pass --max_seq_len (with --allow_long_context)" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_long_context_warning_names_the_option_as_its_user_gave_it(caplog):
    """The warning of a build past the model's positions named the CLI's flag from Python."""
    limits = BuildLimits(max_batch_size=1, max_seq_len=128, max_input_len=16, max_num_tokens=16)
    decoder = mock.Mock(max_position_embeddings=64, rope_scaling=None,
                        position_type=PositionType.ROPE)
    _check_positions(limits, decoder, allow=True)
    with options_as_flags():
        _check_positions(limits, decoder, allow=True)
    assert [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records] == [
        "(allow_long_context=True)", "(--allow_long_context)"]


def test_sequence_beyond_positions_with_rope_scaling(checkpoint, tmp_path):
    result = build(checkpoint("llama-rope-dynamic"), tmp_path / "engine", max_seq_len=32)
    assert result.manifest.limits.max_seq_len == 32  # max_position_embeddings is 8


def test_sequence_beyond_positions_alibi(checkpoint, tmp_path):
    fails(tmp_path, checkpoint("mpt"), ConfigError, "ALiBi", max_seq_len=128)


def test_unknown_backend(checkpoint, tmp_path):
    fails(tmp_path, checkpoint("llama-gqa"), EngineError, "unknown backend 'nope'; this kiln has",
          backend="nope")
    fails(tmp_path, checkpoint("llama-gqa"), EngineError,
          r"unknown backend 'onnxx' \(did you mean onnx\?\)", backend="onnxx")


def test_onnx_refuses_gpu_targets_and_tensor_parallelism(checkpoint, tmp_path):
    fails(tmp_path, checkpoint("llama-gqa"), EngineError, "cpu or cuda", targets=["sm86"])
    fails(tmp_path, checkpoint("llama-gqa", tp=2), EngineError,
          r"no collective op; use backend='torch' \(one process per rank\), backend='tensorrt' "
          r"\(NVIDIA GPUs\)")
    fails(tmp_path, checkpoint("llama-gqa"), EngineError, "no bfloat16", dtype="bfloat16")
    # a trial followed the advice to build for cuda into ONNX Runtime's NOT_IMPLEMENTED
    fails(tmp_path, checkpoint("llama-gqa"), EngineError,
          r"no bfloat16 MatMul; build with dtype='float16' or float32 \(or backend='torch'",
          dtype="bfloat16", targets=["cuda"])


def test_bad_plugin_switches(checkpoint, tmp_path):
    ckpt = checkpoint("llama-gqa")
    # named as given (it had been attention_plugin, a flag the API has no way to pass)
    fails(tmp_path, ckpt, ConfigError, r"^plugins\['attention'\] must be one of auto, enable, "
                                       r"disable, found 'on'$", plugins={"attention": "on"})
    fails(tmp_path, ckpt, ConfigError, "unknown plugins", plugins={"flash": "enable"})
    fails(tmp_path, ckpt, ConfigError, r"^plugins must be a dict of plugin name -> auto, enable "
                                       r"or disable, such as \{'attention': 'enable'\}, found "
                                       r"'attention'$", plugins="attention")
    fails(tmp_path, checkpoint("mpt"), ConfigError, r"plugins\['gated_mlp'\]='enable': .* gelu",
          plugins={"gated_mlp": "enable"})
    fails(tmp_path, checkpoint("mpt"), ConfigError, r"plugins\['rotary'\]='enable': .* alibi",
          plugins={"rotary": "enable"})


def test_bad_limits(checkpoint, tmp_path):
    fails(tmp_path, checkpoint("llama-gqa"), ConfigError, "max_batch_size must be a positive",
          max_batch_size=0)
    fails(tmp_path, checkpoint("llama-gqa"), ConfigError, "dtype must be one of",
          dtype="float8")


def test_output_exists(checkpoint, tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "keep").write_text("x")
    fails(tmp_path, checkpoint("llama-gqa"), OutputExistsError, "pass overwrite=True to")
    fails(tmp_path, checkpoint("llama-gqa"), OutputExistsError, "'keep' and no kiln", overwrite=True)
    assert [p.name for p in (tmp_path / "engine").iterdir()] == ["keep"]
    (tmp_path / "engine" / "keep").unlink()
    build(checkpoint("llama-gqa"), tmp_path / "engine", overwrite=True, **LIMITS)  # empty: fine
    build(checkpoint("llama-gqa"), tmp_path / "engine", overwrite=True, **LIMITS)  # kiln's: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_failure_mid_build_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    def broken(self, job):
        (job.out_dir / "rank0.onnx").write_text("half")
        raise EngineError("backend failed")
    build(checkpoint("llama-gqa"), tmp_path / "engine", **LIMITS)
    before = {p.name: p.read_bytes() for p in (tmp_path / "engine").iterdir()}
    monkeypatch.setattr(OnnxBackend, "build_part", broken)
    with pytest.raises(EngineError, match="backend failed"):
        build(checkpoint("llama-gqa"), tmp_path / "engine", overwrite=True, **LIMITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "engine").iterdir()} == before


def test_quantized_checkpoint(ckpt_copy, tmp_path):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["quantization"] = {"scheme": "w8a8_int8"}
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    fails(tmp_path, ckpt_copy, CheckpointError, "quantization must be null or an object with a "
                                                "qformat")


def test_unknown_build_option_is_named(checkpoint, tmp_path):
    fails(tmp_path, checkpoint("llama-gqa"), ConfigError, r"unknown options \['max_batch'\]",
          max_batch=4)


def test_cli_defaults_are_build_options_defaults():
    """One definition: kiln build's flag defaults are BuildOptions' (the API takes them too)."""
    import dataclasses

    from kiln.builder.options import BuildOptions
    from kiln.cli.build import build as command

    defaults = {f.name: f.default for f in dataclasses.fields(BuildOptions)}
    given = {p.name: p.default for p in command.params
             if p.name in defaults and isinstance(p.default, (str, int))}  # not unset / None
    assert {"backend", "max_batch_size", "workers"} <= set(given)
    assert given == {name: defaults[name] for name in given}


@pytest.mark.parametrize(("options", "flags", "python_text", "cli_text"), [
    (dict(max_seq_len=128), ["--max_seq_len", "128"],
     "lower max_seq_len or pass allow_long_context=True to build anyway",
     "lower --max_seq_len or pass --allow_long_context to build anyway"),
    (dict(max_input_len=40, max_seq_len=32), ["--max_input_len", "40", "--max_seq_len", "32"],
     "raise max_seq_len or lower max_input_len", "raise --max_seq_len or lower --max_input_len"),
    # (each worker's half of the least budget kiln takes: less than one layer needs)
    (dict(max_build_memory=MIN_BUILD_MEMORY, workers=2),
     ["--max_build_memory", str(MIN_BUILD_MEMORY), "--workers", "2"],
     "raise max_build_memory or lower workers (2)",
     "raise --max_build_memory or lower --workers (2)"),
    (dict(dtype="bfloat16"), ["--dtype", "bfloat16"],
     "build with dtype='float16' or float32 (or backend='torch' for",
     "build with --dtype float16 or float32 (or --backend torch for"),
    (dict(backend="tensorrt", targets=["sm90"]), ["--backend", "tensorrt", "--target", "sm90"],
     "build with backend='torch' for Hopper", "build with --backend torch for Hopper"),
    (dict(plugins={"gqa": "enable"}, targets=["cuda"]),
     ["--gqa_plugin", "enable", "--target", "cuda"],
     "plugins['gqa']='enable': an ONNX Runtime CPU op; this build is for onnx cuda; use auto or "
     "disable", "--gqa_plugin enable: an ONNX Runtime CPU op; this build is for onnx cuda; use "
     "auto or disable"),
    # as vLLM refuses max_num_batched_tokens < max_num_seqs (a trial's 1 had built)
    (dict(max_num_tokens=1), ["--max_num_tokens", "1"],
     "max_num_tokens 1 is below max_batch_size 2: a step could not decode a token of each "
     "sequence; raise max_num_tokens to at least 2 or lower max_batch_size",
     "max_num_tokens 1 is below max_batch_size 2: a step could not decode a token of each "
     "sequence; raise --max_num_tokens to at least 2 or lower --max_batch_size"),
])
def test_advice_names_keywords_from_python_and_flags_from_the_cli(checkpoint, tmp_path, options,
                                                                    flags, python_text, cli_text):
    """A trial's kiln.build(...) had been told to pass --allow_long_context, raise
    --max_build_memory, build with --backend torch: flags it had no way to pass."""
    from click.testing import CliRunner

    from kiln.cli.main import main

    ckpt = checkpoint("llama-gqa")
    with pytest.raises(KilnError) as info:
        build(ckpt, tmp_path / "engine", **{"max_batch_size": 2, **options})
    assert python_text in str(info.value)
    result = CliRunner().invoke(main, ["build", "--checkpoint_dir", str(ckpt), "--output_dir",
                                       str(tmp_path / "engine"), "--max_batch_size", "2",
                                       *flags])
    assert result.exit_code == 2 and cli_text in result.output, result.output


@pytest.mark.parametrize("given, size", [("18GB", 18 * 10**9), ("512MiB", 512 * 2**20),
                                         (2**30, 2**30)])
def test_max_build_memory_takes_what_the_cli_takes(given, size):
    """A trial's kiln.build(..., max_build_memory="18GB") was refused ("must be a positive
    integer, found '18GB'") while kiln build --max_build_memory 18GB built."""
    from kiln.builder.options import BuildOptions

    assert BuildOptions("ckpt", "engine", max_build_memory=given).memory_budget() == size


def test_a_max_build_memory_of_no_size_says_what_sizes_are(checkpoint, tmp_path):
    fails(tmp_path, checkpoint("llama-gqa"), ConfigError,
          r"^max_build_memory '18XB' is not a size like 20GB, 512MiB or 2000000000 \(a string, "
          r"or a number of bytes\)$", max_build_memory="18XB")


@pytest.mark.parametrize("dirs, error, message", [
    (("", "engine"), ConfigError, "checkpoint_dir is empty; pass a kiln checkpoint directory"),
    ((None, "engine"), ConfigError, "checkpoint_dir must be a path (a str or os.PathLike), "
                                    "found None"),
    (("ckpt", " "), OutputError, "output_dir is empty; give the directory to write"),
    (("ckpt", "-"), OutputError, "output_dir='-': kiln reads '-' as standard input or output, "
                                 "not a directory; give the directory's path (./- for one named "
                                 "'-')"),
    (("ckpt", Path("-")), OutputError, "output_dir='-': kiln reads '-'"),
    # a retest's: accepted, as kiln build --checkpoint_dir - is not; a NUL a bare ValueError
    (("-", "engine"), ConfigError, "checkpoint_dir='-': kiln reads '-' as standard input"),
    (("ckpt", "o\0x"), OutputError, "output_dir='o\\x00x' holds a NUL character, which no "
                                    "path can hold; give the path without it"),
])
def test_build_options_made_by_hand_check_their_dirs_as_build_does(dirs, error, message):
    """A BuildOptions made by hand had taken "" as the current directory (Path("")), and
    None as Python's TypeError; kiln.build had checked them itself."""
    from kiln.builder.options import BuildOptions

    with pytest.raises(error) as raised:
        BuildOptions(*dirs)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize("given, shown", [(40, "40 is 40 bytes"), ("100MB", "'100MB' is "
                                                                           "100000000 bytes"),
                                           (0, "0 is 0 bytes"), (1, "1 is 1 byte"),
                                           (-1, "-1 is")])
def test_a_max_build_memory_no_build_fits_in_says_the_units_it_takes(checkpoint, tmp_path,
                                                                      given, shown):
    """max_build_memory=40, meant as GB, had planned a build in 40 bytes. Its form is valid:
    the fix is the minimum, not the forms a size takes; told at once for 0 and -1 too (they
    had been told "at least 1 byte", then 1 that a build needs 400 MiB)."""
    fails(tmp_path, checkpoint("llama-gqa"), ConfigError,
          rf"^max_build_memory {shown},? less than the 400 MiB any build needs \(a backend's "
          rf"libraries alone\); give 400MiB or more$", max_build_memory=given)


def test_the_least_build_memory_is_what_every_backend_needs():
    from kiln.builder.backends import _REGISTRY, backend_names

    backend_names()  # (imports them all)
    assert MIN_BUILD_MEMORY == min(backend.base_memory for backend in _REGISTRY.values())
