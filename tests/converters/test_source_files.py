"""files_read: the files of an HF checkpoint that conversion reads, and no other (the build
cache keys engines on exactly these files' hashes)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import kiln
from kiln.checkpoint import load_config
from kiln.converters.source import files_read, open_source
from kiln.errors import CheckpointError, UnsafeCheckpointError
from tests.helpers import with_bom
from tests.models import hf_model, hf_model_with_tokenizer

_OPENED: list[str] | None = None  # the audit hook records opens while this is a list


def _record_opens(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode()))


sys.addaudithook(_record_opens)  # hooks cannot be removed: it records only inside _opened()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = hf_model_with_tokenizer("llama-gqa", tmp_path_factory.mktemp("hf") / "model")
    (path / "README.md").write_text("# a model card\n")
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "optimizer.pt").write_bytes(b"not read")
    (path / "training_args.bin").write_bytes(b"not read")
    (path / "model.safetensors.index.json").write_text("{}")
    return path


def test_files_read_are_config_weights_and_tokenizer(hf_dir):
    names = [p.name for p in files_read(hf_dir)]
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]


def test_conversion_opens_no_file_of_the_checkpoint_but_those(hf_dir, tmp_path):
    global _OPENED
    _OPENED = []
    try:
        kiln.convert_checkpoint(hf_dir, tmp_path / "ckpt", progress=False)
    finally:
        opened, _OPENED = _OPENED, None
    inside = {Path(p).resolve() for p in opened if Path(p).resolve().is_relative_to(hf_dir)}
    assert inside, "the audit hook saw no open of the checkpoint's files"
    assert inside <= {p.resolve() for p in files_read(hf_dir)}


def test_pickle_weights_count_only_when_allowed(tmp_path, hf_dir):
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(hf_dir / "config.json", model)
    (model / "pytorch_model.bin").write_bytes(b"weights")
    (model / "training_args.bin").write_bytes(b"not weights")
    with pytest.raises(UnsafeCheckpointError, match="pass allow_pickle=True to load"):
        files_read(model)
    assert [p.name for p in files_read(model, allow_pickle=True)] == ["config.json",
                                                                      "pytorch_model.bin"]


def test_no_weights_and_a_damaged_pickle_say_how_to_fix_them(tmp_path, hf_dir):
    """A retest's two messages said what was wrong and not what to do (one of them torch's)."""
    model = tmp_path / "none"
    model.mkdir()
    shutil.copy(hf_dir / "config.json", model)
    with pytest.raises(CheckpointError) as err:
        open_source(model)
    assert str(err.value) == (f"{model}: no *.safetensors weight files found (nor *.bin, *.pt, "
                              f"*.pth pickles); pass the directory holding the model's weights, "
                              f"or fetch the checkpoint again if they are missing")
    (model / "pytorch_model.bin").write_bytes(b"garbage, not a zip archive")
    with pytest.raises(CheckpointError) as err:
        open_source(model, allow_pickle=True)
    said = str(err.value)
    assert said.startswith(f"{model / 'pytorch_model.bin'}: cannot load as a weights-only torch "
                           f"pickle (") and "\n" not in said
    assert said.endswith("); the file is damaged or not torch.save's: fetch the checkpoint "
                         "again"), said


# --- the weight files transformers loads: model.safetensors, else what its index names -------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The llama-gqa model saved in three shards with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    whole = hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "whole")
    path = tmp_path_factory.mktemp("hf") / "sharded"
    AutoModelForCausalLM.from_pretrained(whole).save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    return path


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def test_a_shard_the_index_names_but_missing_is_named(sharded, tmp_path):
    """It had been 'missing [lm_head.weight] ... check config.json against the weights'."""
    model = _copy(sharded, tmp_path / "model")
    gone = sorted(model.glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(CheckpointError) as e:
        kiln.convert_checkpoint(model, tmp_path / "out", progress=False)
    assert str(e.value) == (
        f"{model / 'model.safetensors.index.json'}: names {gone.name}, which is not in {model}; "
        f"the download is incomplete: fetch the checkpoint again")


@pytest.mark.parametrize("stray", ["consolidated.safetensors", "model.safetensors"])
def test_only_the_weights_transformers_loads_are_read(sharded, tmp_path, caplog, stray):
    """A Mistral repo's consolidated.safetensors beside its indexed shards (the same tensors)
    had been refused as a duplicate; a model.safetensors is what transformers loads first."""
    model = _copy(sharded, tmp_path / "model")
    whole = _copy(sharded, tmp_path / "whole")
    tensors = {}
    for shard in sorted(whole.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, model / stray, metadata={"format": "pt"})
    shards = sorted(p.name for p in model.glob("model-*.safetensors"))
    read = [p.name for p in files_read(model) if p.suffix == ".safetensors"]
    assert read == (shards if stray.startswith("consolidated") else [stray])
    with caplog.at_level("INFO", logger="kiln.converters.source"):
        out = kiln.convert_checkpoint(model, tmp_path / "out", progress=False)
    assert f"not {stray}" in caplog.text or stray == "model.safetensors"
    assert sorted(load_config(out).source["files"]) == read
    reference = kiln.convert_checkpoint(sharded, tmp_path / "reference", progress=False)
    assert (out / "rank0.safetensors").read_bytes() == \
        (reference / "rank0.safetensors").read_bytes()


def test_an_index_with_a_utf8_bom_is_read(sharded, tmp_path):
    """An index saved by a Windows editor (a byte-order mark) had been "not a readable weight
    index (Unexpected UTF-8 BOM ...)"."""
    model = _copy(sharded, tmp_path / "model")
    with_bom(model / "model.safetensors.index.json")
    shards = sorted(p.name for p in model.glob("model-*.safetensors"))
    assert [p.name for p in files_read(model) if p.suffix == ".safetensors"] == shards


def test_a_tensor_in_two_files_names_both(sharded, tmp_path):
    model = _copy(sharded, tmp_path / "model")
    (model / "model.safetensors.index.json").unlink()  # every *.safetensors is read then
    first = sorted(model.glob("model-*.safetensors"))[0]
    shutil.copy(first, model / "extra.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor '.+' is also in (extra|{first.name})"):
        kiln.convert_checkpoint(model, tmp_path / "out", progress=False)


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_the_hub_download_fetches_the_weights_transformers_loads(sharded, hf_dir, monkeypatch,
                                                                tmp_path, layout):
    """First the config, tokenizer, indexes and model.safetensors; then only the files the
    index names (a Mistral repo's consolidated.safetensors doubled the download)."""
    snapshot = sharded if layout == "sharded" else hf_dir
    calls = []

    def fake(repo_id, revision=None, allow_patterns=None):
        calls.append(list(allow_patterns))
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    source = open_source("org/model")
    assert source.repo_id == "org/model"
    assert "*.safetensors" not in calls[0] and "model.safetensors.index.json" in calls[0]
    if layout == "single":
        assert len(calls) == 1
    else:
        shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
        assert len(calls) == 2 and calls[1] == calls[0] + shards
