"""``kiln eval`` on SmolLM2 (float32 onnx engine built with --gather_context_logits): the
perplexity equals HF transformers' sliding-window perplexity (the snippet of
https://huggingface.co/docs/transformers/perplexity) on the same text, max_length and stride;
and its bad inputs are one line, exit 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import kiln
from kiln.cli.main import main
from kiln.evaluation import evaluate
from kiln.testing.english import english_paragraphs
from tests.runtime.test_smollm2_onnx import shared_dir

pytestmark = pytest.mark.slow

MAX_LENGTH, STRIDE = 96, 40  # windows are chunk-prefilled: max_num_tokens 64 < 96
RTOL = 1e-4


@pytest.fixture(scope="module")
def engine(smollm2_dir, tmp_path_factory):
    from kiln.builder import build

    with shared_dir(tmp_path_factory, "smollm2-onnx") as root:  # shares its checkpoint
        if not (root / "engine-gather" / "config.json").is_file():
            if not (root / "ckpt" / "config.json").is_file():
                kiln.convert_checkpoint(smollm2_dir, root / "ckpt", overwrite=True,
                                        progress=False)
            build(root / "ckpt", root / "engine-gather", backend="onnx", max_batch_size=4,
                  max_seq_len=128, max_input_len=96, max_num_tokens=64, overwrite=True,
                  gather_context_logits=True)
        return root / "engine-gather"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "english.txt"
    path.write_text("\n\n".join(english_paragraphs("evaluation")[:10]) + "\n")
    return path


def _hf_perplexity(smollm2_dir, text: str) -> tuple[float, int]:
    """The HF docs' loop, verbatim in substance (batch 1)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    encodings = tokenizer(text, return_tensors="pt")
    seq_len = encodings.input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, STRIDE):
        end_loc = min(begin_loc + MAX_LENGTH, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), seq_len


def test_kiln_eval_equals_hf_sliding_window_perplexity(engine, smollm2_dir, text_file, tmp_path):
    want, seq_len = _hf_perplexity(smollm2_dir, text_file.read_text().strip())
    assert seq_len > 2 * MAX_LENGTH  # several windows
    out = tmp_path / "ppl.json"
    result = CliRunner().invoke(main, ["eval", "--engine_dir", str(engine), "--dataset",
                                       str(text_file), "--max_length", str(MAX_LENGTH),
                                       "--stride", str(STRIDE), "--json_output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    got = report["perplexity"]
    assert math.isfinite(got) and abs(got - want) <= RTOL * want, (got, want)
    assert report["tokens"] == seq_len - 1 and report["seconds"] > 0
    assert report["max_length"] == MAX_LENGTH and report["stride"] == STRIDE
    assert report["dataset"] == "english.txt" and len(report["dataset_sha256"]) == 64
    assert report["engine_dir"] == str(engine)
    assert f"perplexity {got:.6f}" in result.output
    # a second run may replace its own report; defaults: max_length = max_input_len (96)
    default = evaluate(engine, text_file)
    assert (default.max_length, default.stride) == (96, 48) and default.perplexity > 1


@pytest.mark.parametrize(("args", "expected"), [
    (["--dataset", "{tmp}/missing.txt"], "no such file or directory"),
    (["--dataset", "{tmp}/empty.txt"], "holds no text"),
    (["--dataset", "{tmp}/one.txt"], "perplexity needs at least 2 tokens"),
    (["--dataset", "{text}", "--max_length", "8", "--stride", "9"], "9 exceeds --max_length 8"),
    (["--dataset", "{text}", "--max_length", "97"], "max_length 97 exceeds the engine's "
                                                    "max_input_len 96"),
    (["--dataset", "{text}", "--json_output", "{text}"], "is not a kiln eval report"),
])
def test_bad_inputs_are_one_line_exit_2(engine, text_file, tmp_path, args, expected):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "one.txt").write_text("Hi")
    args = [a.format(tmp=tmp_path, text=text_file) for a in args]
    result = CliRunner().invoke(main, ["eval", "--engine_dir", str(engine), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
