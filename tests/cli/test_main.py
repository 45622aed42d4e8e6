"""The kiln command group: help, aliases, one-line errors with exit code 2, --debug."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kiln.cli.main import main
from kiln.errors import CheckpointError
from tests.models import hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "model")


def _invoke(*args):
    return CliRunner().invoke(main, list(args), prog_name="kiln")


@pytest.mark.parametrize("args", [[], ["convert_checkpoint"], ["convert-checkpoint"]])
def test_help(args):
    result = _invoke(*args, "--help")
    assert result.exit_code == 0 and "Usage: kiln" in result.output


def test_convert_with_dashed_alias(hf_dir, tmp_path):
    result = _invoke("-q", "convert-checkpoint", "--model_dir", str(hf_dir),
                     "--output_dir", str(tmp_path / "out"), "--tp_size", "2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "rank1.safetensors").is_file()


def test_bad_input_is_one_line_exit_2(tmp_path):
    result = _invoke("convert_checkpoint", "--model_dir", str(tmp_path / "missing"),
                     "--output_dir", str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no such directory" in lines[0]


def test_debug_shows_the_exception(tmp_path):
    result = _invoke("--debug", "convert_checkpoint", "--model_dir", str(tmp_path / "missing"),
                     "--output_dir", str(tmp_path / "out"))
    assert isinstance(result.exception, CheckpointError)


def test_unknown_dtype_is_a_usage_error(hf_dir, tmp_path):
    result = _invoke("convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir",
                     str(tmp_path / "out"), "--dtype", "float8")
    assert result.exit_code == 2 and "float8" in result.output
