"""Output directories: a user's files are never deleted or overwritten, whatever the flags.

Unit tests of kiln/output_dirs.py, then the cases a new user hit through the commands: building into
the checkpoint, into its parent, converting into the HF dir, and --overwrite of a directory
holding an unrelated file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kiln
from kiln.checkpoint import TOKENIZER_FILES
from kiln.cli.main import main
from kiln.engine.manifest import DIGEST_KEY, manifest_digest
from kiln.errors import KilnError, OutputExistsError
from kiln.output_dirs import OutputError, atomic_dir, check_output
from kiln.tensorio import write_tensors
from tests.helpers import flip_bits
from tests.models import hf_model, kiln_checkpoint

LIMITS = dict(max_batch_size=2, max_input_len=8, max_seq_len=16)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def built(hf_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(pristine kiln checkpoint, pristine onnx engine dir), copied by tests that change them."""
    root = tmp_path_factory.mktemp("built")
    ckpt = kiln_checkpoint(hf_dir, root / "ckpt")
    kiln.build(ckpt, root / "engine", backend="onnx", **LIMITS)
    return ckpt, root / "engine"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def cli(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="kiln")


# --- check_output -----------------------------------------------------------------------------

def test_missing_output_is_fine(tmp_path):
    check_output(tmp_path / "new", overwrite=False, inputs=[tmp_path / "in"])


def test_existing_output_needs_overwrite(tmp_path):
    with pytest.raises(OutputExistsError, match="already exists; pass overwrite=True to"):
        check_output(tmp_path, overwrite=False)


@pytest.mark.parametrize("where,relation", [("same", "is"), ("inside", "lies inside"),
                                            ("parent", "contains")])
def test_output_may_not_overlap_an_input(tmp_path, where, relation):
    source = tmp_path / "models" / "hf"
    source.mkdir(parents=True)
    out = {"same": source, "inside": source / "out", "parent": tmp_path / "models"}[where]
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=f"{relation} the input .*choose a directory "
                                              f"outside it"):
            check_output(out, overwrite=overwrite, inputs=[source])


def test_overlap_is_found_through_relative_paths_and_symlinks(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="is the input"):
        check_output(Path("link"), overwrite=True, inputs=[Path("./real/../real")])


def test_unrelated_directory_is_never_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds 'notes.txt' and no kiln checkpoint or engine "
                                          "manifest"):
        check_output(tmp_path / "out", overwrite=True)


def test_foreign_json_config_is_not_a_kiln_manifest(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(OutputError, match="no kiln checkpoint or engine manifest"):
        check_output(tmp_path / "out", overwrite=True)


def test_a_file_is_not_an_output_dir(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output(tmp_path / "out", overwrite=True)


def test_empty_directory_may_be_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    check_output(tmp_path / "out", overwrite=True)


@pytest.mark.parametrize("which", ["cwd", "home", "root"])
def test_root_home_and_cwd_are_never_replaced(tmp_path, monkeypatch, which):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    path = {"cwd": Path("."), "home": Path("~"), "root": Path("/")}[which]
    name = {"cwd": "the current directory", "home": "your home directory",
            "root": "the filesystem root"}[which]
    with pytest.raises(OutputError, match=f"is {name}; kiln never replaces it"):
        check_output(path, overwrite=True)


# --- atomic_dir -------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_output_gets_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("source_mode, umask", [(0o600, 0o022), (0o644, 0o077)])
def test_copied_tokenizer_files_get_the_users_umask_and_keep_their_times(tmp_path, source_mode,
                                                                         umask):
    """A trial's copies kept their source's bits: a 0600 tokenizer shipped unreadable to
    others, a 0644 one under umask 077 readable by all."""
    from kiln.output_dirs import copy_tokenizer

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer.json").chmod(source_mode)
    os.utime(src / "tokenizer.json", ns=(10**18, 10**18))
    old = os.umask(umask)
    try:
        copy_tokenizer(src, out)
    finally:
        os.umask(old)
    copied = (out / "tokenizer.json").stat()
    assert copied.st_mode & 0o777 == 0o666 & ~umask
    assert copied.st_mtime_ns == 10**18


def test_failed_final_rename_restores_the_old_output(built, tmp_path, monkeypatch):
    _, engine = built
    out = Path(shutil.copytree(engine, tmp_path / "engine"))
    before = snapshot(out)
    rename = Path.rename

    def failing(self, target):
        if self.name.startswith(".engine.tmp-"):
            raise OSError("disk full")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_replacement_is_logged_at_the_default_level(built, tmp_path, caplog):
    _, engine = built
    out = Path(shutil.copytree(engine, tmp_path / "engine"))
    with caplog.at_level(logging.WARNING, logger="kiln.output_dirs"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
    assert f"replaced {out} (kiln engine dir)" in caplog.text


# --- through the commands ---------------------------------------------------------------------

def test_build_into_its_own_checkpoint_is_refused(built, tmp_path):
    ckpt = Path(shutil.copytree(built[0], tmp_path / "ckpt"))
    before = snapshot(ckpt)
    result = cli("build", "--checkpoint_dir", str(ckpt), "--output_dir", str(ckpt),
                 "--overwrite", "--max_batch_size", "2", "--max_seq_len", "16")
    assert result.exit_code == 2, result.output
    assert "is the input" in result.output and len(result.output.splitlines()) == 1
    assert snapshot(ckpt) == before


def test_build_into_the_checkpoints_parent_is_refused(built, tmp_path):
    parent = tmp_path / "work"
    ckpt = Path(shutil.copytree(built[0], parent / "ckpt"))
    (parent / "notes.txt").write_text("keep me")
    before = snapshot(parent)
    result = cli("build", "--checkpoint_dir", str(ckpt), "--output_dir", str(parent),
                 "--overwrite", "--max_batch_size", "2", "--max_seq_len", "16")
    assert result.exit_code == 2 and "contains the input" in result.output
    assert snapshot(parent) == before


def test_convert_into_the_hf_dir_is_refused(hf_dir, tmp_path):
    src = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    before = snapshot(src)
    for out in (src, src / "kiln"):
        result = cli("convert_checkpoint", "--model_dir", str(src), "--output_dir", str(out),
                     "--overwrite")
        assert result.exit_code == 2, result.output
        assert "the input" in result.output
    assert snapshot(src) == before


def test_overwrite_of_a_directory_with_a_users_file_is_refused(built, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = cli("build", "--checkpoint_dir", str(built[0]), "--output_dir", str(out),
                 "--overwrite", "--max_batch_size", "2", "--max_seq_len", "16")
    assert result.exit_code == 2 and "'notes.txt'" in result.output
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_users_file_inside_a_kiln_engine_dir_is_kept(built, tmp_path):
    out = Path(shutil.copytree(built[1], tmp_path / "engine"))
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    result = cli("build", "--checkpoint_dir", str(built[0]), "--output_dir", str(out),
                 "--overwrite", "--max_batch_size", "2", "--max_seq_len", "16")
    assert result.exit_code == 2
    assert "is a kiln engine dir but also holds 'notes.txt'" in result.output
    assert snapshot(out) == before


def test_kiln_output_is_replaced(built, tmp_path, caplog):
    out = Path(shutil.copytree(built[1], tmp_path / "engine"))
    old = (out / "rank0.onnx").stat().st_ino
    result = cli("build", "--checkpoint_dir", str(built[0]), "--output_dir", str(out),
                 "--overwrite", "--max_batch_size", "2", "--max_seq_len", "16")
    assert result.exit_code == 0, result.output
    assert f"replaced {out} (kiln engine dir)" in caplog.text
    assert (out / "rank0.onnx").stat().st_ino != old  # a new file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_engine_file_edited_at_its_recorded_size_is_not_replaced(built, tmp_path):
    """Sizes alone had taken a same-size edit for kiln's (checkpoints refuse one since their
    rank_checksums are checked): an engine file is kiln's with the sha256 the manifest records."""
    out = Path(shutil.copytree(built[1], tmp_path / "engine"))
    flip_bits(out / "rank0.onnx", -3, 0x01)
    before = snapshot(out)
    result = cli("build", "--checkpoint_dir", str(built[0]), "--output_dir", str(out),
                 "--overwrite", "--max_batch_size", "2", "--max_seq_len", "16")
    assert result.exit_code == 2, result.output
    assert "also holds 'rank0.onnx', which kiln did not write" in result.output
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", ["engine", "checkpoint"])
def test_a_users_file_under_a_rank_file_s_name_is_not_kiln_s(built, hf_dir, tmp_path, kind):
    """A trial's ``echo mine > eng/rank0.onnx`` (and ``> ckpt/rank0.safetensors``): --overwrite
    took any file the manifest names for kiln's and deleted it. A rank file must have the size
    an engine manifest records, or be a safetensors file in a checkpoint."""
    out = Path(shutil.copytree(built[1] if kind == "engine" else built[0], tmp_path / kind))
    name = "rank0.onnx" if kind == "engine" else "rank0.safetensors"
    (out / name).write_text("my thesis")
    before = snapshot(out)
    source = ["build", "--checkpoint_dir", str(built[0]), "--max_batch_size", "2",
              "--max_seq_len", "16"] if kind == "engine" else \
        ["convert_checkpoint", "--model_dir", str(hf_dir)]
    result = cli(*source, "--output_dir", str(out), "--overwrite")
    assert result.exit_code == 2, result.output
    assert f"also holds '{name}', which kiln did not write" in result.output
    assert snapshot(out) == before


@pytest.mark.parametrize("damage", ["other tensors", "truncated", "edited at its size"])
def test_a_safetensors_file_of_other_tensors_under_a_checkpoint_rank_name_is_not_kiln_s(
        built, hf_dir, tmp_path, damage):
    """A trial saved its own adapter (a valid safetensors file of one tensor) as
    ``ckpt/rank0.safetensors``: --overwrite replaced it, as any safetensors file of that name
    passed for kiln's; so was another's same-size edit of embed.weight. Now it must hold the
    rank's tensors, end where its header says, and (rank_checksums) be the bytes kiln wrote."""
    out = Path(shutil.copytree(built[0], tmp_path / "ckpt"))
    path = out / "rank0.safetensors"
    if damage == "other tensors":
        write_tensors(path, {"my_adapter": torch.ones(3, 4)})
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:  # a weight's low bit: the header and size kiln wrote, other bytes (rank_checksums)
        flip_bits(path, -3, 0x01)
    before = snapshot(out)
    result = cli("convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir", str(out),
                 "--overwrite")
    assert result.exit_code == 2, result.output
    assert "also holds 'rank0.safetensors', which kiln did not write" in result.output
    # the way out where kiln verify said "damaged; write the checkpoint again" (retest 38)
    assert f"(if kiln verify called them damaged, delete {out} yourself)" in result.output
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", ["engine", "checkpoint"])
def test_a_manifest_edited_since_kiln_wrote_it_is_not_replaced(built, hf_dir, tmp_path, kind):
    """A trial's note added to an engine's config.json (which kiln verify had flagged), and to
    a checkpoint's, was lost to --overwrite, where an edited tokenizer file was refused."""
    out = Path(shutil.copytree(built[1] if kind == "engine" else built[0], tmp_path / kind))
    manifest = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**manifest, "my_note": "keep me",
                                                 "ppl": float("nan")}))  # had raised
    before = snapshot(out)
    result = _replace(built, hf_dir, kind, out)
    assert result.exit_code == 2, result.output
    since = "the build" if kind == "engine" else "kiln wrote it"
    assert f"{out}: is a kiln {'engine dir' if kind == 'engine' else 'checkpoint'} whose " \
           f"config.json was edited since {since}" in result.output
    assert snapshot(out) == before


def test_an_output_inside_a_build_cache_entry_is_refused(built, tmp_path):
    """A trial built another model into ``$KILN_CACHE_DIR/engines/NAME/engine`` with
    --overwrite; the cache then served it for the first model's key."""
    entry = tmp_path / "cache" / "engines" / "smollm2-abc"
    engine = Path(shutil.copytree(built[1], entry / "engine"))
    (entry / "entry.json").write_text(json.dumps({"kiln_build_cache": 1}))
    before = snapshot(entry)
    for out in (engine, engine / "sub"):
        with pytest.raises(OutputError, match=f"lies inside {entry}, an entry of kiln's build "
                                              f"cache"):
            check_output(out, overwrite=True, writes="kiln engine dir")
    with pytest.raises(OutputError, match=f"is {entry}, an entry of kiln's build cache"):
        check_output(entry, overwrite=True, writes="kiln engine dir")  # (a retest: the entry
        # itself had been told it holds 'engine', 'entry.json' and no manifest)
    assert snapshot(entry) == before
    check_output(tmp_path / "cache" / "engines" / ".smollm2-abc.tmp-1-x" / "engine", False)


def test_an_over_long_name_is_refused_before_anything_is_made(tmp_path):
    out = tmp_path / "new" / ("a" * 256)
    with pytest.raises(OutputError, match="is 256 bytes; file systems take at most 255"):
        check_output(out, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_a_long_name_s_temporary_dirs_fit_the_file_system(tmp_path):
    """A trial's 245-character name: its temporary dir's name ran past 255 bytes, and the
    command failed naming that dir, leaving the parent it had made."""
    target = tmp_path / "p" / ("é" * 100 + "a" * 50)  # 250 bytes
    with atomic_dir(target, overwrite=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_failure_to_make_the_temporary_dir_removes_the_parents_made(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(tmp_path / "a" / "b" / "out", overwrite=False):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["build", "convert_checkpoint"])
def test_overwrite_never_replaces_the_other_kind_of_kiln_output(built, hf_dir, tmp_path,
                                                                 command):
    """A trial's typo: kiln build --overwrite replaced a quantized checkpoint (minutes of
    calibration) with an engine; a convert replaced an engine with a checkpoint."""
    victim = built[0] if command == "build" else built[1]
    out = Path(shutil.copytree(victim, tmp_path / "out"))
    before = snapshot(out)
    source = ["--checkpoint_dir", str(built[0]), "--max_batch_size", "2", "--max_seq_len", "16"] \
        if command == "build" else ["--model_dir", str(hf_dir)]
    result = cli(command, *source, "--output_dir", str(out), "--overwrite")
    assert result.exit_code == 2, result.output
    kind, writes = ("kiln checkpoint", "kiln engine dir") if command == "build" \
        else ("kiln engine dir", "kiln checkpoint")
    assert result.output.strip() == (
        f"error: {out}: is a {kind}, and this command writes a {writes}; --overwrite replaces "
        f"only its own kind: choose another --output_dir (or delete that one yourself)")
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["chat_template.jinja", "rank5.onnx", "tokenizer.json"])
def test_a_kiln_named_file_added_after_the_build_is_not_replaced(built, tmp_path, name):
    """A chat template copied in after the build (as kiln run --chat's refusal suggests), a
    rank file the manifest does not name, a tokenizer file changed since: not kiln's."""
    out = Path(shutil.copytree(built[1], tmp_path / "engine"))
    written = (out / "config.json").stat().st_mtime_ns
    (out / name).write_text("mine")
    os.utime(out / name, ns=(written + 10**9, written + 10**9))
    result = cli("build", "--checkpoint_dir", str(built[0]), "--output_dir", str(out),
                 "--overwrite", "--max_batch_size", "2", "--max_seq_len", "16")
    assert result.exit_code == 2
    assert f"also holds '{name}', which kiln did not write (or which changed after it wrote " \
           "the directory)" in result.output
    assert (out / name).read_text() == "mine"


def _replace(built, hf_dir, kind: str, out: Path):
    """Run the command that writes ``kind`` ("engine" or "checkpoint") onto ``out``."""
    if kind == "engine":
        return cli("build", "--checkpoint_dir", str(built[0]), "--output_dir", str(out),
                   "--overwrite", "--max_batch_size", "2", "--max_seq_len", "16")
    return cli("convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir", str(out),
               "--overwrite")


@pytest.mark.parametrize("kind", ["engine", "checkpoint"])
@pytest.mark.parametrize("case", ["unwritten tokenizer name", "rank past the mapping",
                                  "edited tokenizer file"])
def test_a_kiln_named_file_dated_before_the_manifest_is_not_kiln_s(built, hf_dir, tmp_path,
                                                                   kind, case):
    """A trial's data loss: --overwrite deleted a user's special_tokens_map.json and
    rank3.safetensors in a tp 1 checkpoint, named as kiln names its files and dated before
    its manifest (cp -p, tar, mv keep old times). The manifest now records the files kiln
    wrote beside it, with their sha256; a checkpoint's rank files follow from its mapping."""
    out = Path(shutil.copytree(built[1] if kind == "engine" else built[0], tmp_path / kind))
    recorded = json.loads((out / "config.json").read_text())["other_files"]
    assert set(recorded) == {p.name for p in out.iterdir()
                             if p.name in TOKENIZER_FILES} and recorded
    if case == "unwritten tokenizer name":
        name = next(n for n in TOKENIZER_FILES if n not in recorded)
    elif case == "rank past the mapping":
        name = "rank3.onnx" if kind == "engine" else "rank3.safetensors"
    else:
        name = sorted(recorded)[0]
    (out / name).write_text("mine")
    os.utime(out / name, ns=(1_500_000_000 * 10**9,) * 2)  # 2017: long before the manifest
    result = _replace(built, hf_dir, kind, out)
    assert result.exit_code == 2, result.output
    assert f"also holds '{name}', which kiln did not write" in result.output
    assert (out / name).read_text() == "mine"


def _rewrite_manifest(path: Path, data: dict) -> None:
    """Write a manifest as kiln would have written ``data`` (an engine's with its digest: the
    rule under test, not the edit check, is what refuses or accepts)."""
    if DIGEST_KEY in data:
        data = {**data, DIGEST_KEY: manifest_digest(data)}
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", ["engine", "checkpoint"])
@pytest.mark.parametrize("case", ["folder under a rank name", "link under a rank name",
                                  "other_files not a mapping"])
def test_a_folder_link_or_edited_record_is_never_taken_for_kiln_s(built, hf_dir, tmp_path,
                                                                 kind, case):
    """A trial's folder named rank0.safetensors, holding its notes, was deleted by
    --overwrite; other_files edited into a list fell back to the timestamp rule."""
    out = Path(shutil.copytree(built[1] if kind == "engine" else built[0], tmp_path / kind))
    rank = sorted(p.name for p in out.iterdir() if p.name.startswith("rank"))[0]
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    if case == "folder under a rank name":
        name = rank
        (out / rank).unlink()
        (out / rank).mkdir()
        (out / rank / "notes.txt").write_text("mine")
    elif case == "link under a rank name":
        name = rank
        (out / rank).unlink()
        (out / rank).symlink_to(mine)
    else:
        manifest = out / "config.json"
        data = json.loads(manifest.read_text())
        name = sorted(data["other_files"])[0]
        _rewrite_manifest(manifest, {**data, "other_files": sorted(data["other_files"])})
        (out / name).write_text("mine")
        os.utime(out / name, ns=(1_500_000_000 * 10**9,) * 2)
    result = _replace(built, hf_dir, kind, out)
    assert result.exit_code == 2, result.output
    assert f"also holds '{name}', which kiln did not write" in result.output
    assert mine.read_text() == "mine" and (out / name).exists()


@pytest.mark.parametrize("kind", ["engine", "checkpoint"])
def test_an_older_kilns_output_without_other_files_keeps_the_name_and_time_rule(
        built, hf_dir, tmp_path, kind):
    """An older kiln's manifest records no other files: a kiln name no newer than the manifest
    is taken as kiln's (and replaced), a newer one is refused."""
    out = Path(shutil.copytree(built[1] if kind == "engine" else built[0], tmp_path / kind))
    manifest = out / "config.json"
    data = json.loads(manifest.read_text())
    tokenizer = out / sorted(data.pop("other_files"))[0]
    _rewrite_manifest(manifest, data)
    newer = manifest.stat().st_mtime_ns + 10**9
    os.utime(tokenizer, ns=(newer, newer))
    assert _replace(built, hf_dir, kind, out).exit_code == 2
    os.utime(tokenizer, ns=(newer - 2 * 10**9,) * 2)
    result = _replace(built, hf_dir, kind, out)
    assert result.exit_code == 0, result.output
    assert "other_files" in json.loads(manifest.read_text())


# --- found by a new user's trial --------------------------------------------------------------

def test_a_symlinked_output_dir_is_named_as_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="is a symbolic link; kiln does not replace links"):
        check_output(tmp_path / "latest", overwrite=True)


def test_protected_dirs_are_refused_without_suggesting_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="is the current directory; kiln never replaces it"):
        check_output(Path("."), overwrite=False)


def test_empty_output_dir_is_refused():
    with pytest.raises(OutputError, match="^output_dir is empty"):
        check_output("", overwrite=False)


def test_an_unwritable_parent_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("kiln.output_dirs.os.access", lambda path, mode: False)
    with pytest.raises(OutputError, match=f"cannot be written, {tmp_path} is not a writable"):
        check_output(tmp_path / "new" / "deeper", overwrite=False)


def test_an_output_under_a_file_says_it_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=f"{tmp_path / 'notes.txt'} is a file, not a dir"):
        check_output(tmp_path / "notes.txt" / "sub", overwrite=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_failed_write_removes_the_parents_it_created(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(tmp_path / "a" / "b" / "out", overwrite=False):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_temporary_dirs_of_a_killed_run_are_removed_by_the_next(tmp_path, caplog):
    stale = tmp_path / ".out.tmp-999999999-abcd"  # no such process
    stale.mkdir()
    (stale / "rank0.onnx.data").write_bytes(b"x" * 10)
    live = tmp_path / f".out.tmp-{os.getpid()}-efgh"  # a writer still running: kept
    live.mkdir()
    with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and live.exists()
    assert "left by a kiln process that is no longer running" in caplog.text


def test_a_target_that_cannot_be_moved_aside_leaves_no_trash(built, tmp_path, monkeypatch):
    out = Path(shutil.copytree(built[1], tmp_path / "engine"))
    rename = Path.rename

    def failing(self, target):
        if self == out:
            raise PermissionError(1, "Operation not permitted", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(PermissionError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]


def test_a_ctrl_c_while_the_old_output_is_removed_still_removes_it(built, tmp_path,
                                                                    monkeypatch):
    """A trial's Ctrl-C just after the new output's rename left ``.engine.old-<pid>-*/old``
    half deleted beside it, and the next run called its writer killed."""
    out = Path(shutil.copytree(built[1], tmp_path / "engine"))
    rmtree = shutil.rmtree
    interrupted = []

    def interrupted_once(path, *args, **kwargs):
        if ".old-" in str(path) and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
    assert interrupted and [p.name for p in tmp_path.iterdir()] == ["engine"]
    assert (out / "config.json").read_text() == "{}"  # the new output, in place


@pytest.mark.parametrize("removed", ["stale", "failed"])
def test_a_ctrl_c_while_a_temporary_dir_is_removed_still_removes_it(tmp_path, monkeypatch,
                                                                     removed):
    """A dead writer's leftover (``stale``), and the temporary dir of a write that failed,
    are removed whole even when a Ctrl-C comes while they are (as the old output is)."""
    stale = tmp_path / ".out.tmp-999999999-abcd"  # no such process
    stale.mkdir()
    (stale / "rank0.onnx.data").write_bytes(b"x" * 10)
    rmtree = shutil.rmtree
    interrupted = []

    def interrupted_once(path, *args, **kwargs):
        if (".tmp-999999999" in str(path)) == (removed == "stale") and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "config.json").write_text("{}")
            if removed == "failed":
                raise RuntimeError("the write failed")
    assert interrupted and list(tmp_path.iterdir()) == []


def test_an_os_error_is_one_line_and_exit_2(built, tmp_path, monkeypatch):
    def failing(*args):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "engine"))

    monkeypatch.setattr("kiln.builder.api.copy_tokenizer", failing)
    result = cli("build", "--checkpoint_dir", str(built[0]), "--output_dir",
                 str(tmp_path / "engine"), "--max_batch_size", "2", "--max_seq_len", "16")
    assert result.exit_code == 2
    assert result.output == (f"error: {tmp_path / 'engine'}: Input/output error; nothing "
                             f"was left half-written\n")
    assert list(tmp_path.iterdir()) == []


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as a write() says it: no path


@pytest.mark.parametrize("command, patched, args", [
    ("convert_checkpoint", "kiln.converters.convert.copy_tokenizer", ["--model_dir", "{hf}"]),
    ("build", "kiln.builder.api.copy_tokenizer", ["--checkpoint_dir", "{ckpt}",
                                                  "--max_batch_size", "2", "--max_seq_len", "16"]),
    ("quantize", "kiln.quantization.quantize.copy_tokenizer",
     ["--checkpoint_dir", "{ckpt}", "--qformat", "int8_wo"]),
])
def test_a_full_disk_names_the_output_and_the_fix(built, hf_dir, tmp_path, monkeypatch, command,
                                                  patched, args):
    """A trial's full disk: "error: No space left on device; nothing was left half-written",
    with neither the directory nor what to do."""
    monkeypatch.setattr(patched, _full)
    out = tmp_path / "a" / "out"
    result = cli(command, *(a.format(hf=hf_dir, ckpt=built[0]) for a in args),
                 "--output_dir", str(out))
    assert result.exit_code == 2
    assert result.output == (f"error: {out}: cannot be written (No space left on device); "
                             f"nothing was left half-written: free space on its file system or "
                             f"choose another --output_dir\n")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_named_as_the_python_api_names_the_output(hf_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr("kiln.converters.convert.copy_tokenizer", _full)
    with pytest.raises(OutputError, match=r"out: cannot be written \(No space left on device\)"
                       r"; nothing was left half-written: free space on its file system or "
                       r"choose another output_dir$"):
        kiln.convert_checkpoint(hf_dir, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output_dir, message", [
    # a trial's "" had been told output_dir='.' contains the input
    ("", "output_dir is empty; give the directory to write"),
    (" ", "output_dir is empty; give the directory to write"),
    # a trial's "-" had written a checkpoint into a directory named "-"
    ("-", "output_dir='-': kiln reads '-' as standard input or output, not a directory; give "
          "the directory's path (./- for one named '-')"),
    (Path("-"), "output_dir='-': kiln reads '-'"),
    (None, "output_dir must be a path (a str or os.PathLike), found None"),
    (5, "output_dir must be a path (a str or os.PathLike), found int 5"),
])
@pytest.mark.parametrize("command", ["convert_checkpoint", "build", "quantize"])
def test_the_python_api_refuses_an_output_dir_that_is_no_path(built, hf_dir, tmp_path,
                                                              monkeypatch, command, output_dir,
                                                              message):
    source = {"convert_checkpoint": hf_dir}.get(command, built[0])
    options = {"quantize": {"qformat": "int8_wo"}, "build": LIMITS}.get(command, {})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError) as raised:
        getattr(kiln, command)(source, output_dir, **options)
    assert str(raised.value).startswith(message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("through", ["python", "cli"])
def test_dot_slash_dash_names_a_directory_named_dash(built, tmp_path, monkeypatch, through):
    monkeypatch.chdir(tmp_path)
    if through == "python":
        kiln.build(built[0], "./-", **LIMITS)
    else:
        result = cli("build", "--checkpoint_dir", str(built[0]), "--output_dir", "./-",
                     *(f"--{k}={v}" for k, v in LIMITS.items()))
        assert result.exit_code == 0, result.output
    assert (tmp_path / "-" / "config.json").is_file()


@pytest.mark.parametrize("command, name, error", [
    ("convert_checkpoint", "model_dir", "CheckpointError"),
    ("build", "checkpoint_dir", "ConfigError"),
    ("quantize", "checkpoint_dir", "ConfigError"),
])
@pytest.mark.parametrize("source", [5, None])
def test_the_python_api_refuses_a_source_that_is_no_path(tmp_path, command, name, error, source):
    """A trial's convert_checkpoint(5, "x") had been Python's "expected str, bytes or
    os.PathLike object", where LLM(5) names what it takes."""
    options = {"quantize": {"qformat": "int8_wo"}}.get(command, {})
    with pytest.raises(KilnError) as raised:
        getattr(kiln, command)(source, tmp_path / "out", **options)
    assert type(raised.value).__name__ == error
    found = "None" if source is None else "int 5"
    assert str(raised.value) == f"{name} must be a path (a str or os.PathLike), found {found}"
    assert list(tmp_path.iterdir()) == []


def test_a_bad_flag_value_is_one_line():
    result = cli("build", "--checkpoint_dir", "c", "--output_dir", "o", "--max_batch_size", "0")
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert result.output.startswith("error: Invalid value for '--max_batch_size'")
    assert result.output.rstrip().endswith("(see kiln build --help)")


def test_a_directory_that_refuses_new_files_is_refused_before_any_work(tmp_path, monkeypatch):
    """Permission bits do not tell (root; read-only or pseudo file systems such as /sys): the
    output's parent and a --json_output's directory are probed by creating a file in them."""
    import errno
    import tempfile

    from kiln.cli.bench import _check_json_output

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="is not a writable directory"):
        check_output(tmp_path / "out", False, inputs=[])
    import click
    with pytest.raises(click.BadParameter, match=r"not a writable directory \(Read-only file"):
        _check_json_output(tmp_path / "r.json", tmp_path / "engine")
    assert list(tmp_path.iterdir()) == []


def test_proc_is_named_a_pseudo_file_system_not_missing():
    """A trial's --json_output /proc/rep.json: "/proc is not a writable directory (No such
    file or directory)", though /proc exists (procfs answers ENOENT to a new file)."""
    from kiln.output_dirs import cannot_create_in

    if not Path("/proc/self").is_dir():
        pytest.skip("no procfs here")
    assert cannot_create_in(Path("/proc")) == "it takes no new files: a pseudo file system, " \
                                              "as /proc is"


def test_a_checkpoint_as_kiln_wrote_it_is_replaced(built, hf_dir, tmp_path):
    """Its rank files hashed against rank_checksums (the refusals above), then replaced."""
    out = Path(shutil.copytree(built[0], tmp_path / "ckpt"))
    result = cli("convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir", str(out),
                 "--overwrite")
    assert result.exit_code == 0, result.output


def test_overwrite_takes_kilns_own_config_saved_with_a_byte_order_mark(built, tmp_path):
    """A trial's engine dir and checkpoint whose config.json an editor had saved with a BOM
    (every kiln command reads it): --overwrite had called them a user's files."""
    from kiln.output_dirs import describe_replaceable

    for source, kind in zip(built, ("kiln checkpoint", "kiln engine dir"), strict=True):
        out = Path(shutil.copytree(source, tmp_path / source.name))
        path = out / "config.json"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert describe_replaceable(out) == kind
    result = cli("build", "--checkpoint_dir", str(built[0]), "--output_dir",
                 str(tmp_path / "engine"), "--overwrite", "--backend", "onnx",
                 "--max_batch_size", "2", "--max_input_len", "8", "--max_seq_len", "16")
    assert result.exit_code == 0, result.output


def test_refusals_name_the_python_keywords_from_python_and_the_flags_from_the_cli(hf_dir,
                                                                                   tmp_path):
    """A trial's kiln.convert_checkpoint(...) had been told to pass --overwrite and to choose
    another --output_dir."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"already exists; pass overwrite=True to "):
        kiln.convert_checkpoint(hf_dir, out)
    with pytest.raises(OutputError, match=r"move them away or choose another output_dir$"):
        kiln.convert_checkpoint(hf_dir, out, overwrite=True)
    with pytest.raises(OutputError, match=r"^output_dir=.* is the input "):
        kiln.convert_checkpoint(hf_dir, hf_dir, overwrite=True)
    result = cli("convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir", str(out))
    assert result.output == f"error: {out}: already exists; pass --overwrite to replace it " \
        f"(only a directory kiln wrote is replaced)\n"
    result = cli("convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir", str(out),
                 "--overwrite")
    assert result.output.rstrip().endswith("move them away or choose another --output_dir")
    result = cli("convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir", str(hf_dir),
                 "--overwrite")
    assert result.output.startswith(f"error: --output_dir {hf_dir} is the input ")
