"""kiln eval (kiln/cli/eval.py): what it does around kiln.evaluation (the figures themselves:
tests/test_evaluation.py; --model_dir and --engine_dir: tests/cli/test_engine_source.py)."""

from __future__ import annotations

from click.testing import CliRunner

from kiln.cli.main import main
from kiln.runtime.tokenizer import ModelTokenizer


def test_a_model_dir_build_tokenizes_the_dataset_once(tiny_hf, cache, tmp_path, monkeypatch):
    """On a build-cache miss, the check before the build tokenized the dataset, and evaluate
    again after it (a large dataset's seconds spent twice)."""
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nPack my box with five "
                    "dozen liquor jugs.\n")
    encoded = []
    encode = ModelTokenizer.encode

    def counted(self, text, *args, **kwargs):
        encoded.append(text)
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(ModelTokenizer, "encode", counted)
    result = CliRunner().invoke(main, ["eval", "--model_dir", str(tiny_hf), "--dataset",
                                       str(text), "--stride", "32"], prog_name="kiln")
    assert result.exit_code == 0, result.output
    assert len(cache.entries()) == 1  # built: the check before the build ran
    assert len(encoded) == 1, encoded
