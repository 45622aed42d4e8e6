"""files_read: the files of an HF checkpoint that conversion reads, and no other (the build
cache keys engines on exactly these files' hashes)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import kiln
from kiln.converters.source import files_read
from kiln.errors import UnsafeCheckpointError
from tests.models import hf_model

_OPENED: list[str] | None = None  # the audit hook records opens while this is a list


def _record_opens(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode()))


sys.addaudithook(_record_opens)  # hooks cannot be removed: it records only inside _opened()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "model")
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "tokenizer_config.json").write_text("{}")
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
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        files_read(model)
    assert [p.name for p in files_read(model, allow_pickle=True)] == ["config.json",
                                                                      "pytorch_model.bin"]
