"""kiln/checkpoint.py: the rank file checks a job makes beside its work."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest

from kiln.checkpoint import load_config, rank_files_checked
from kiln.errors import CheckpointError
from tests.helpers import flip_bits
from tests.models import hf_model, kiln_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint")
    return kiln_checkpoint(hf_model("llama-gqa", root / "hf"), root / "ckpt")


def _until_done(check) -> None:
    """``check(wait=False)`` until the hashes are done (it raises then, or stays quiet)."""
    for _ in range(500):
        check(wait=False)
        time.sleep(0.01)


def test_a_check_that_does_not_wait_raises_once_the_hashes_are_done(ckpt, tmp_path):
    """quantize calls it after each layer, to stop at a damaged source before its end."""
    damaged = shutil.copytree(ckpt, tmp_path / "damaged")
    flip_bits(damaged / "rank0.safetensors", -5, 0x20)
    with rank_files_checked(damaged, load_config(damaged)) as check:
        with pytest.raises(CheckpointError, match="rank0.safetensors: its bytes are not"):
            _until_done(check)


def test_a_good_checkpoint_is_checked_once(ckpt, caplog):
    with caplog.at_level("INFO", "kiln.checkpoint"):
        with rank_files_checked(ckpt, load_config(ckpt)) as check:
            check(wait=False)
            check()
            check(wait=False)
            check()
    assert sum("match the sha256 recorded" in r.message for r in caplog.records) == 1


def test_an_edited_config_is_warned_of_and_read_as_it_is(ckpt, tmp_path, caplog):
    """Build and quantize had read an edited checkpoint config without comment (only kiln
    verify and --overwrite looked at its digest)."""
    edited = shutil.copytree(ckpt, tmp_path / "my ckpt")
    data = json.loads((edited / "config.json").read_text())
    data["decoder"]["max_position_embeddings"] = 48
    (edited / "config.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, "kiln.checkpoint"):
        assert load_config(edited).decoder.max_position_embeddings == 48
        assert load_config(ckpt).decoder.max_position_embeddings != 48
    assert caplog.messages == [
        f"{edited / 'config.json'}: edited since kiln wrote it (it no longer matches the digest "
        f"recorded in it); read as it is now. kiln verify '{edited}' says whether the rest is as "
        f"kiln wrote it; to keep an edit made on purpose, remove manifest_sha256 from it"]
    del data["manifest_sha256"]  # kept on purpose: no more warning
    (edited / "config.json").write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "kiln.checkpoint"):
        load_config(edited)
    assert caplog.messages == []


def test_an_edit_that_breaks_the_config_is_named_as_the_edit(tmp_path):
    """A trial's tp_size 2 -> 1 had been told that rank_checksums disagreed with the mapping,
    and to remove the key (kiln verify, build): the edit is the cause."""
    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt", tp=2)
    data = json.loads((ckpt / "config.json").read_text())
    data["mapping"]["tp_size"] = 1
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as raised:
        load_config(ckpt)
    assert str(raised.value) == (
        f"{ckpt / 'config.json'}: edited since kiln wrote it (it no longer matches the digest "
        f"recorded in it), and as edited: rank_checksums lists rank0.safetensors, "
        f"rank1.safetensors, and the mapping's rank files are rank0.safetensors; undo the edit")
    del data["manifest_sha256"]  # an edit kept on purpose: the inconsistency alone is named
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="remove the key to build it unchecked$"):
        load_config(ckpt)


def test_a_rank_file_missing_many_tensors_lists_five_and_counts_the_rest(ckpt):
    from kiln.checkpoint import check_tensor_names

    config = load_config(ckpt)
    expected = sorted(config.rank_tensor_names(0))
    with pytest.raises(CheckpointError) as err:
        check_tensor_names(ckpt / "rank0.safetensors", config, 0, expected[:1])
    assert f"missing {expected[1:6]} and {len(expected) - 6} more; re-run" in \
        str(err.value)
