"""kiln/checkpoint.py: the rank file checks a job makes beside its work."""

from __future__ import annotations

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
