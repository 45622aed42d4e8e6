"""kiln verify, and --verify_checksums of run and bench, on a two-stage onnx engine; kiln
verify of a kiln checkpoint (its rank files against the recorded sha256)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.builder import build
from kiln.cli.main import main
from kiln.cli.verify import manifest_problems
from kiln.engine import DIGEST_KEY, EngineError, read_manifest
from kiln.hashing import manifest_digest
from kiln.runtime.loader import ExecutorOptions, open_engine
from kiln.testing.smollm2 import smollm2_hf_dir
from tests.helpers import flip_bits
from tests.models import hf_model, kiln_checkpoint
from tests.runtime.toy_onnx import rewrite_manifest

FILES = ["rank0.onnx", "rank0.onnx.data", "rank1.onnx", "rank1.onnx.data"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    ckpt = kiln_checkpoint(hf_model("llama-gqa", root / "hf"), root / "ckpt", pp=2)
    out = build(ckpt, root / "engine", max_batch_size=2, max_seq_len=32).output_dir
    for name in ("tokenizer.json", "tokenizer_config.json"):  # what kiln run needs besides
        shutil.copy(smollm2_hf_dir() / name, out / name)
    return out


@pytest.fixture
def engine(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "engine"))


def kiln(*args: str):
    return CliRunner().invoke(main, list(args))


def flip_a_byte(path: Path) -> None:
    flip_bits(path, path.stat().st_size // 2, 0xFF)


def test_a_good_engine_prints_one_line_per_file_then_ok(engine):
    r = kiln("verify", str(engine))
    assert r.exit_code == 0, r.output
    *lines, summary = r.output.splitlines()
    assert [line.split()[:4] for line in lines] == [
        ["ok", "rank", name[4], name] for name in FILES]
    assert summary.startswith(f"{engine}: ok, the manifest unedited since the build, 4 files "
                              f"of 2 ranks")
    assert summary.endswith("present, sizes and checksums match the manifest")
    assert kiln("-q", "verify", str(engine)).output.splitlines() == [summary]


def test_a_file_the_build_wrote_beside_the_ranks_changed_or_gone_fails(engine):
    """A trial edited the chat template in a shipped engine's tokenizer_config.json and deleted
    its generation_config.json: verify said ok (it checked only the rank files)."""
    recorded = read_manifest(engine).other_files
    assert recorded, "the build records the files it writes beside the ranks"
    edited, gone = sorted(recorded)[:2] if len(recorded) > 1 else (sorted(recorded)[0], None)
    (engine / edited).write_text((engine / edited).read_text() + " ")
    if gone is not None:
        (engine / gone).unlink()
    r = kiln("verify", str(engine))
    assert r.exit_code == 2, r.output
    assert f"FAIL file  {edited}: changed since the build (sha256 differs from the manifest's)" \
        in r.output
    if gone is not None:
        assert f"FAIL file  {gone}: missing (the build wrote it)" in r.output


def test_the_engine_dir_may_be_given_as_the_other_commands_take_it(engine):
    """A trial typed kiln verify --engine_dir X, as every other command takes it."""
    assert kiln("verify", "--engine_dir", str(engine)).output == kiln("verify", str(engine)).output
    for args in ([], [str(engine), "--engine_dir", str(engine)]):
        r = kiln("verify", *args)
        assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output
        assert "give the engine dir or kiln checkpoint once: kiln verify DIR (or " \
               "--engine_dir" in r.output


def test_same_size_corruption_loads_by_default_but_fails_every_checksum_check(engine):
    flip_a_byte(engine / "rank1.onnx.data")  # a weight of the second stage: still a valid graph
    _, executor = open_engine(engine)  # presence and sizes only: the corruption goes unnoticed
    executor.close()
    with pytest.raises(EngineError, match=r"rank1\.onnx\.data: checksum mismatch"):
        open_engine(engine, ExecutorOptions(verify_checksums=True))
    r = kiln("verify", str(engine))
    assert r.exit_code == 2
    assert "FAIL rank 1  rank1.onnx.data  checksum mismatch (corrupt or modified)" in r.output
    assert r.output.splitlines()[-1] == (
        f"error: {engine}: 1 problem, first: rank1.onnx.data: checksum mismatch (corrupt or "
        f"modified); rebuild with kiln build")
    for command in ("run", "bench"):  # the flag reaches the loader through executor_options
        r = kiln(command, "--engine_dir", str(engine), "--input_text", "a",  # a token < 128
                 "--verify_checksums") if command == "run" else \
            kiln(command, "--engine_dir", str(engine), "--verify_checksums")
        assert r.exit_code == 2 and "rank1.onnx.data: checksum mismatch" in r.output, r.output


def test_size_and_presence_problems_of_any_rank(engine):
    (engine / "rank1.onnx").unlink()
    with open(engine / "rank0.onnx.data", "ab") as f:
        f.write(b"\0")
    r = kiln("verify", str(engine))
    assert r.exit_code == 2
    assert "FAIL rank 0  rank0.onnx.data  157697 bytes, the manifest says 157696 (truncated, " \
           "extended or replaced)" in r.output
    assert "FAIL rank 1  rank1.onnx       missing (listed in the manifest)" in r.output
    assert "ok   rank 1  rank1.onnx.data" in r.output
    assert "error: " in r.output and "2 problems, first: rank0.onnx.data: 157697 bytes" in \
        r.output


def test_manifest_problems(engine):
    data = json.loads((engine / "config.json").read_text())
    data.update(rank_files={"0": data["rank_files"]["0"]},  # by hand: its digest left as was
                checksums={k: v for k, v in data["checksums"].items() if k != "rank0.onnx"})
    (engine / "config.json").write_text(json.dumps(data))
    r = kiln("verify", str(engine))
    assert r.exit_code == 2 and "3 problems, first: config.json: edited since the build" in \
        r.output  # (this test's own edit), then the two the edit made
    assert "ok   rank 0  rank0.onnx " in r.output  # present, its size: no checksum to compare
    # every problem counted is said (the two the edit made had been counted, not shown)
    assert [line for line in r.output.splitlines() if line.startswith("FAIL")][1:] == [
        "FAIL manifest  rank 1: no files listed", "FAIL manifest  rank0.onnx: no checksum recorded"]
    rewrite_manifest(engine, rank_files={"0": [], "1": [], "2": ["rank0.onnx"]})
    assert manifest_problems(read_manifest(engine)) == [
        "rank 0: no files listed", "rank 1: no files listed",
        "rank 2: listed, but the mapping has 2 ranks", "rank0.onnx: no checksum recorded"]


def test_a_manifest_without_sizes_is_verified_by_checksum(engine):
    data = json.loads((engine / "config.json").read_text())
    del data["sizes"], data[DIGEST_KEY]  # as an older kiln wrote it
    (engine / "config.json").write_text(json.dumps(data))
    r = kiln("verify", str(engine))
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1].endswith(
        "ok, (the manifest records no digest of its own: built by an older kiln, or removed, so "
        "its edits cannot be told) 4 files of 2 ranks and 1 other file, 0.00 GB: present, "
        "checksums (the manifest records no sizes: built by an older kiln) match the manifest")
    flip_a_byte(engine / "rank0.onnx.data")
    assert kiln("verify", str(engine)).exit_code == 2


@pytest.mark.parametrize("edit", [
    lambda d: d["limits"].update(max_seq_len=100000),  # kiln run: refused at load
    lambda d: d["decoder"].update(num_layers=1),  # kiln run: loads; the graph has 2
    lambda d: d["decoder"].update(rope_theta=10.0),  # kiln run: runs, unaware
    lambda d: d.update(source={"model_dir": "elsewhere"}),
    lambda d: d.update(manifest_sha256=None),  # a null digest is an edit, not an older kiln's
], ids=["max_seq_len", "num_layers", "rope_theta", "source", "null_digest"])
def test_a_manifest_edited_since_the_build_fails(engine, edit):
    """The file checks trust the manifest; its own digest, written by the build, catches edits
    to it (a new-user trial's edits had all verified ok)."""
    path = engine / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=4))
    r = kiln("verify", str(engine))
    assert r.exit_code == 2, r.output
    assert r.output.splitlines()[0] == (
        "FAIL manifest  config.json: edited since the build (its content no longer matches the "
        "digest the build recorded in it), and the engine files were built for what it said "
        "then: restore the build's config.json, or rebuild with kiln build")
    assert "1 problem, first: config.json: edited since the build" in r.output


def test_a_manifest_only_reformatted_still_verifies(engine):
    path = engine / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=None, sort_keys=True))
    assert kiln("verify", str(engine)).exit_code == 0


def test_a_manifest_rewritten_with_whole_floats_as_ints_still_verifies(engine):
    """100000.0 and 100000 are one JSON number, which JavaScript's JSON (and tools built on it)
    writes without its '.0': a reformat, not an edit."""
    path = engine / "config.json"
    text = path.read_text()
    rewritten = re.sub(r"(?<=[:\[, ])(-?\d+)\.0(?=[,\]}\s])", r"\1", text)
    assert rewritten != text  # rope_theta 10000.0 among them
    path.write_text(rewritten)
    assert kiln("verify", str(engine)).exit_code == 0
    data = json.loads(rewritten)
    data["decoder"]["rope_theta"] += 1  # and an edit still fails
    path.write_text(json.dumps(data))
    assert kiln("verify", str(engine)).exit_code == 2


def test_a_manifest_with_the_digest_of_numbers_as_written_still_verifies(engine):
    """Engines and checkpoints written before whole floats were hashed as ints."""
    path = engine / "config.json"
    data = json.loads(path.read_text())
    data[DIGEST_KEY] = manifest_digest(data, as_written=True)
    assert data[DIGEST_KEY] != manifest_digest(data)
    path.write_text(json.dumps(data))
    assert kiln("verify", str(engine)).exit_code == 0


def test_an_engine_of_another_kiln_version_fails_as_kiln_run_would(engine, monkeypatch):
    import kiln as package

    monkeypatch.setattr(package, "__version__", "9.9.0")
    r = kiln("verify", str(engine))
    assert r.exit_code == 2, r.output
    built = read_manifest(engine).kiln_version
    assert f"FAIL manifest  engine built by kiln {built}, this is kiln 9.9.0: rebuild the " \
           f"engine with this kiln (kiln build)" in r.output


def test_a_missing_dir_is_one_line_exit_2_naming_both_kinds(tmp_path):
    """verify takes engines and kiln checkpoints: a missing dir's line names both."""
    r = kiln("verify", str(tmp_path / "missing"))
    assert r.exit_code == 2
    assert r.output.splitlines() == [
        f"error: {tmp_path / 'missing'}: no such directory; pass an engine dir (the output_dir "
        f"of kiln build) or a kiln checkpoint (the output_dir of kiln convert_checkpoint)"]


def test_a_file_is_one_line_naming_both_kinds_or_its_directory(tmp_path, engine):
    """A trial's kiln verify somefile.txt had been told to pass an engine dir alone."""
    (tmp_path / "somefile.txt").write_text("x")
    r = kiln("verify", str(tmp_path / "somefile.txt"))
    assert r.exit_code == 2
    assert r.output.splitlines() == [
        f"error: {tmp_path / 'somefile.txt'}: is a file, not an engine dir or a kiln "
        f"checkpoint; pass an engine dir (the output_dir of kiln build) or a kiln checkpoint "
        f"(the output_dir of kiln convert_checkpoint)"]
    r = kiln("verify", str(engine / "rank0.onnx"))
    assert r.exit_code == 2
    assert r.output.splitlines() == [
        f"error: {engine / 'rank0.onnx'}: is a file, not an engine dir or a kiln checkpoint; "
        f"pass the directory that holds it ({engine})"]


def test_something_that_is_neither_file_nor_directory_is_named_as_what_it_is(tmp_path):
    """A trial's kiln verify /dev/null had been told "no such engine directory": it exists."""
    os.mkfifo(tmp_path / "pipe")
    either = ("not an engine dir or a kiln checkpoint; pass an engine dir (the output_dir of "
              "kiln build) or a kiln checkpoint (the output_dir of kiln convert_checkpoint)")
    for path, kind in ((tmp_path / "pipe", "a named pipe"), ("/dev/null", "a character device")):
        r = kiln("verify", str(path))
        assert r.exit_code == 2
        assert r.output.splitlines() == [f"error: {path}: is {kind}, {either}"]


def test_a_typo_names_the_near_dir(tmp_path):
    (tmp_path / "ckpt").mkdir()
    r = kiln("verify", str(tmp_path / "ckp"))
    assert r.exit_code == 2
    assert f"{tmp_path / 'ckp'}: no such directory; did you mean {tmp_path / 'ckpt'}? " \
           f"pass an engine dir" in r.output


def test_a_dir_without_a_config_names_both_kinds_or_the_one_inside(tmp_path):
    """A trial gave the parent of its checkpoint and was told only about engine dirs."""
    r = kiln("verify", str(tmp_path))
    assert r.exit_code == 2
    assert r.output.splitlines() == [
        f"error: {tmp_path / 'config.json'}: missing, so {tmp_path} is neither an engine dir nor "
        f"a kiln checkpoint; pass an engine dir (the output_dir of kiln build) or a kiln "
        f"checkpoint (the output_dir of kiln convert_checkpoint)"]
    inside = tmp_path / "smollm2"
    inside.mkdir()
    (inside / "config.json").write_text(json.dumps(
        {"format_version": 1, "kiln_version": "0", "decoder": {}, "mapping": {}}))
    r = kiln("verify", str(tmp_path))
    assert r.exit_code == 2 and r.output.rstrip().endswith(f"did you mean {inside}?")


@pytest.mark.parametrize("damage,problem", [
    ("delete", "tokenizer.json: missing; the engine dir needs the tokenizer files"),
    ("corrupt", "tokenizer.json: unreadable ("),
])
def test_an_engine_whose_tokenizer_does_not_load_fails_like_kiln_run_would(engine, damage,
                                                                           problem):
    if damage == "delete":
        (engine / "tokenizer.json").unlink()
    else:
        (engine / "tokenizer.json").write_text("{not json")
    for args in (("verify",), ("-q", "verify")):
        r = kiln(*args, str(engine))
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert f"FAIL tokenizer  {problem}" in r.output
        assert f"error: {engine}: 1 problem, first: {problem}" in r.output


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt", pp=2)
    shutil.copy(smollm2_hf_dir() / "tokenizer.json", ckpt / "tokenizer.json")
    config = json.loads((ckpt / "config.json").read_text())  # as if convert had copied it
    config["other_files"] = {"tokenizer.json": hashlib.sha256(
        (ckpt / "tokenizer.json").read_bytes()).hexdigest()}
    config[DIGEST_KEY] = manifest_digest(config)  # as convert writes it
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_a_checkpoint_is_verified_against_its_recorded_checksums(checkpoint):
    """A copied checkpoint can be checked before a build (a trial found kiln verify refusing
    checkpoints, with no word that kiln build checks them)."""
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert [line.split()[:4] for line in lines[:2]] == [
        ["ok", "rank", "0", "rank0.safetensors"], ["ok", "rank", "1", "rank1.safetensors"]]
    assert lines[2].startswith(f"{checkpoint}: ok, 2 rank files and 1 other file of a kiln "
                               f"checkpoint") and lines[2].endswith(
        "config.json unedited since kiln wrote it, checksums match config.json")
    assert kiln("-q", "verify", str(checkpoint)).output.splitlines() == lines[2:]


def test_a_damaged_or_swapped_checkpoint_file_fails_verify(checkpoint):
    flip_a_byte(checkpoint / "rank1.safetensors")
    (checkpoint / "tokenizer.json").write_text("{}")
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2
    lines = r.output.splitlines()
    assert lines[1].startswith("FAIL rank 1  rank1.safetensors  its bytes are not those kiln "
                               "convert_checkpoint wrote (sha256 ")
    assert lines[2] == "FAIL file  tokenizer.json: changed since kiln wrote it (sha256 differs " \
                       "from config.json's)"
    assert lines[3].startswith(f"error: {checkpoint}: 2 problems, first: rank1.safetensors: "
                               f"its bytes are not those")
    (checkpoint / "rank0.safetensors").unlink()
    assert "FAIL rank 0  rank0.safetensors  missing (listed in config.json); copy it again, or " \
           "write the checkpoint again with kiln convert_checkpoint" \
           in kiln("verify", str(checkpoint)).output  # the repair named (retest 38: none was)


def test_a_quantized_checkpoint_s_missing_rank_file_names_kiln_quantize(checkpoint):
    """A retest's kiln quantize output missing rank0 had been told to write it again with kiln
    convert_checkpoint (kiln build named kiln quantize)."""
    config = json.loads((checkpoint / "config.json").read_text())
    config["source"] = {**config["source"], "quantized_from": "ckpt/fp16"}
    config[DIGEST_KEY] = manifest_digest(config)  # as quantize writes it
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "rank0.safetensors").unlink()
    rank1 = checkpoint / "rank1.safetensors"
    rank1.write_bytes(rank1.read_bytes()[:100])  # its header cut (retest 44c: had named both)
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2 and "FAIL rank 0  rank0.safetensors  missing (listed in " \
        "config.json); copy it again, or write the checkpoint again with kiln quantize\n" \
        in r.output, r.output
    assert "FAIL rank 1  rank1.safetensors" in r.output and r.output.split(
        "FAIL rank 1")[1].splitlines()[0].endswith("write the checkpoint again with kiln "
                                                   "quantize"), r.output


def test_rank_files_copied_over_each_other_are_named_by_verify(checkpoint):
    shutil.copy(checkpoint / "rank1.safetensors", checkpoint / "rank0.safetensors")
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2
    assert r.output.splitlines()[0] == "FAIL rank 0  rank0.safetensors  holds the bytes kiln " \
        "convert_checkpoint wrote to rank1.safetensors (rank files copied over each other); " \
        "copy the checkpoint again, or write it again"


def test_a_checkpoint_without_recorded_checksums_is_checked_by_content(checkpoint, caplog):
    """A trial was sent to kiln verify by a NaN perplexity and told "nothing to verify"; now an
    older kiln's checkpoint gets its headers, tensor names and values checked."""
    config = json.loads((checkpoint / "config.json").read_text())
    del config["rank_checksums"], config[DIGEST_KEY]  # as an older kiln wrote it
    (checkpoint / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        r = kiln("verify", str(checkpoint))
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1].endswith("present, headers, tensor names and values read "
                                              "(no checksums recorded)")
    assert "records no rank file checksums" in caplog.text
    with open(checkpoint / "rank1.safetensors", "r+b") as f:  # the last values NaN
        f.seek(-4, 2)
        f.write(b"\xc0\x7f\xc0\x7f")
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2
    assert re.search(r"FAIL rank 1  rank1\.safetensors  \S+ holds NaN/Inf values \(first at "
                     r"(row|element) \d+\); the file is damaged", r.output), r.output
    (checkpoint / "rank0.safetensors").write_bytes(b"not a safetensors file")
    assert "FAIL rank 0  rank0.safetensors  not a valid safetensors file" in \
        kiln("verify", str(checkpoint)).output


def test_a_config_edited_past_its_tensors_fails_verify_as_it_fails_a_build(checkpoint):
    """A retest: hidden_size edited, with the digest and checksums removed as the refusals
    advise, had passed kiln verify and been refused by kiln build (their shapes)."""
    config = json.loads((checkpoint / "config.json").read_text())
    del config["rank_checksums"], config[DIGEST_KEY]
    config["decoder"]["hidden_size"] *= 2
    (checkpoint / "config.json").write_text(json.dumps(config))
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2, r.output
    assert "where config.json implies" in r.output.splitlines()[0]


def test_an_edited_checkpoint_config_is_flagged(checkpoint):
    """Its digest (written since this session, as engines' are) tells a hand edit, and the
    line says how to keep an edit made on purpose."""
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "my_note": "x"}))
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2
    assert r.output.splitlines()[0] == "FAIL manifest  config.json: edited since kiln wrote it " \
        "(it no longer matches the digest recorded in it): undo the edit; or, for an edit made " \
        "on purpose, remove manifest_sha256 from it; or write the checkpoint again into a new " \
        "directory"


def test_a_nan_in_an_edited_config_is_an_edit_not_a_traceback(checkpoint, tmp_path):
    """Python's json reads NaN, which kiln never writes: the digest had raised."""
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "eval_ppl": float("nan")}))
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.splitlines()[0].startswith("FAIL manifest  config.json: edited since kiln "
                                               "wrote it")
    assert "remove manifest_sha256 from it" in r.output


BOTH = ("rebuild an engine dir with kiln build, write a kiln checkpoint again with kiln "
        "convert_checkpoint")
CHECKPOINT_REPAIR = "write the kiln checkpoint again with kiln convert_checkpoint"
ENGINE_REPAIR = "rebuild the engine dir with kiln build"


def test_a_config_with_a_byte_order_mark_is_read_as_build_and_run_read_it(checkpoint, engine):
    """A trial's checkpoint and engine whose config.json an editor saved with a BOM: build, run
    and bench read them, verify had refused them as invalid JSON."""
    for directory in (checkpoint, engine):
        path = directory / "config.json"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        r = kiln("verify", str(directory))
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[-1].startswith(f"{directory}: ok, ")


def test_a_config_of_broken_json_names_the_repair_of_its_kind(checkpoint, engine, tmp_path):
    """A trial's checkpoint with a stray comma was told to rebuild with kiln build, then of
    both commands: its rank files say it is a checkpoint, an engine's say it is an engine."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for directory, repair in ((checkpoint, CHECKPOINT_REPAIR), (engine, ENGINE_REPAIR),
                              (bare, BOTH)):
        (directory / "config.json").write_text('{"tp_size": 1,,}')
        r = kiln("verify", str(directory))
        assert r.exit_code == 2 and r.output.startswith(f"error: {directory / 'config.json'}: "
                                                        f"invalid JSON (")
        assert r.output.rstrip().endswith(f"; {repair}"), r.output


def test_an_empty_config_names_both_kinds(checkpoint):
    (checkpoint / "config.json").write_text("{}")
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2 and r.output == (
        f"error: {checkpoint / 'config.json'}: no format_version, so neither an engine manifest "
        f"nor a kiln checkpoint config; {CHECKPOINT_REPAIR}\n")


def test_a_config_without_format_version_but_an_engines_keys_names_kiln_build(engine):
    path = engine / "config.json"
    data = json.loads(path.read_text())
    del data["format_version"]
    path.write_text(json.dumps(data))
    (engine / "rank0.onnx").unlink()  # the keys alone say so
    r = kiln("verify", str(engine))
    assert r.exit_code == 2 and r.output.rstrip().endswith(f"; {ENGINE_REPAIR}"), r.output


@pytest.mark.parametrize("text", ["[]", "null", "7"])
def test_a_config_that_is_not_an_object_names_the_repair_of_its_kind(checkpoint, text):
    (checkpoint / "config.json").write_text(text)
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2 and "Traceback" not in r.output
    line, = r.output.splitlines()
    assert line.startswith(f"error: {checkpoint / 'config.json'}: holds ")
    assert line.endswith(f", not a JSON object; {CHECKPOINT_REPAIR}")


def test_a_truncated_rank_file_is_named_as_such(checkpoint):
    path = checkpoint / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    r = kiln("verify", str(checkpoint))
    assert r.exit_code == 2
    assert "FAIL rank 0  rank0.safetensors  not a valid safetensors file: tensor" in r.output
    assert "(truncated?)" in r.output



def test_a_torch_engines_packed_rank_file_names_kiln_build(tmp_path):
    """A torch engine's rank0.safetensors (the metadata kiln.engine.torch_files writes) is not
    taken for a checkpoint's."""
    import torch

    from kiln.tensorio import write_tensors

    write_tensors(tmp_path / "rank0.safetensors", {"w": torch.zeros(2)},
                  {"kiln_torch_format": "1"})
    (tmp_path / "config.json").write_text("{,}")
    r = kiln("verify", str(tmp_path))
    assert r.exit_code == 2 and r.output.rstrip().endswith(f"; {ENGINE_REPAIR}"), r.output


def test_a_hugging_face_checkpoint_is_told_what_verify_checks(tmp_path):
    """A retest's kiln verify of an HF model dir had been told how kiln run takes one."""
    hf = hf_model("llama-gqa", tmp_path / "hf")
    r = kiln("verify", str(hf))
    assert r.exit_code == 2 and r.output == (
        f"error: {hf}: is a Hugging Face checkpoint, not an engine dir or a kiln checkpoint; "
        f"kiln verify checks what kiln wrote against the checksums it recorded: verify the kiln "
        f"checkpoint kiln convert_checkpoint --model_dir {hf} writes, or its engine\n")
