"""``kiln eval`` on SmolLM2 (float32 onnx engine built with --gather_context_logits): the
perplexity equals HF transformers' sliding-window perplexity (the windows of
https://huggingface.co/docs/transformers/perplexity, every scored token weighted once) on the
same text, max_length and stride, stride 1 included; with disjoint windows it equals the page's
snippet verbatim; and its bad inputs are one line, exit 2."""

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


def _hf_perplexity(smollm2_dir, text: str, max_length: int,
                   stride: int) -> tuple[float, float, int]:
    """The HF docs' loop (batch 1) on HF's own model: (perplexity with each window's mean loss
    weighted by the tokens it averaged, i.e. the labels after HF's shift that are not -100;
    the same with the snippet's weights ``num_valid_tokens - batch_size``; tokens)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    encodings = tokenizer(text, return_tensors="pt")
    seq_len = encodings.input_ids.size(1)
    sums = {"tokens": [0.0, 0], "snippet": [0.0, 0]}
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss.item()
        weights = {"tokens": (target_ids[:, 1:] != -100).sum().item(),
                   "snippet": (target_ids != -100).sum().item() - target_ids.size(0)}
        for name, weight in weights.items():
            sums[name][0] += neg_log_likelihood * weight
            sums[name][1] += weight
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    per_token, snippet = (math.exp(total / count) for total, count in sums.values())
    return per_token, snippet, seq_len


def test_kiln_eval_equals_hf_sliding_window_perplexity(engine, smollm2_dir, text_file, tmp_path):
    want, _, seq_len = _hf_perplexity(smollm2_dir, text_file.read_text().strip(), MAX_LENGTH,
                                      STRIDE)
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


def test_stride_1_scores_every_token_with_its_full_window(engine, smollm2_dir, text_file,
                                                          tmp_path):
    # One target per window: the snippet's weights (targets - 1) would give every window after
    # the first weight 0, and the first window's perplexity alone.
    text = tmp_path / "short.txt"
    text.write_text(text_file.read_text()[:300])
    max_length = 32
    want, first_window, seq_len = _hf_perplexity(smollm2_dir, text.read_text().strip(),
                                                 max_length, 1)
    assert seq_len > max_length + 20
    got = evaluate(engine, text, max_length=max_length, stride=1)
    assert got.windows == seq_len - max_length + 1 and got.tokens == seq_len - 1
    assert math.isfinite(got.perplexity) and abs(got.perplexity - want) <= RTOL * want, \
        (got.perplexity, want)
    assert abs(first_window - want) > 100 * RTOL * want  # the case tells the weights apart


def test_disjoint_windows_equal_the_snippet_verbatim(engine, smollm2_dir, text_file):
    per_token, want, seq_len = _hf_perplexity(smollm2_dir, text_file.read_text().strip(),
                                              MAX_LENGTH, MAX_LENGTH)
    assert per_token == want  # disjoint windows: the two weights are the same
    got = evaluate(engine, text_file, max_length=MAX_LENGTH, stride=MAX_LENGTH)
    assert got.tokens == seq_len - got.windows  # each window's first token is context only
    assert math.isfinite(got.perplexity) and abs(got.perplexity - want) <= RTOL * want, \
        (got.perplexity, want)


def test_a_figure_on_too_few_tokens_is_said_to_be_so(engine, text_file, tmp_path, caplog):
    """A trial's 3-token text gave "perplexity 758.946513" and nothing more."""
    import logging

    short = tmp_path / "short.txt"
    short.write_text("The cat sat")
    with caplog.at_level(logging.WARNING, logger="kiln.evaluation"):
        result = evaluate(engine, short)
        assert 1 <= result.tokens < 64 and math.isfinite(result.perplexity)
        evaluate(engine, text_file)  # hundreds of tokens: no word
    assert caplog.messages == [f"{short}: the perplexity rests on {result.tokens} tokens, too "
                               f"few to compare with another figure; give a longer text"]


def test_json_output_dash_puts_the_json_alone_on_stdout(engine, text_file):
    result = CliRunner().invoke(main, ["eval", "--engine_dir", str(engine), "--dataset",
                                       str(text_file), "--stride", "96", "--json_output", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the perplexity line and the summary: stderr
    assert f"perplexity {report['perplexity']:.6f}" in result.stderr
    assert report["tokens_per_s"] > 0


@pytest.mark.parametrize(("args", "expected"), [
    (["--dataset", "{tmp}/missing.txt"], "no such file or directory"),
    (["--dataset", "{tmp}/empty.txt"], "holds no text"),
    (["--dataset", "{tmp}/one.txt"], "{tmp}/one.txt: the text is 1 token long, so 0 tokens to "
                                     "score"),
    # one token scored is its probability alone (a trial's "perplexity 80.209628", exit 0)
    (["--dataset", "{tmp}/two.txt"], "{tmp}/two.txt: the text is 2 tokens long, so 1 token to "
                                     "score (the first is context only); perplexity needs at "
                                     "least 2 to score: give a text of at least 3 tokens"),
    # one wording, whether the flags or the engine's max_input_len set max_length
    (["--dataset", "{text}", "--max_length", "8", "--stride", "9"],
     "stride 9 must be in [1, max_length 8]; lower --stride"),
    (["--dataset", "{text}", "--max_length", "97"], "max_length 97 exceeds the engine's "
                                                    "max_input_len 96"),
    (["--dataset", "{text}", "--json_output", "{text}"], "is not a kiln eval report"),
])
def test_bad_inputs_are_one_line_exit_2(engine, text_file, tmp_path, monkeypatch, args,
                                        expected):
    """Refused before the engine loads (a trial waited for the load, and read its warnings)."""
    import kiln.runtime

    def not_loaded(*args, **kwargs):
        raise AssertionError("the engine was loaded before the refusal")

    monkeypatch.setattr(kiln.runtime, "LLM", not_loaded)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "one.txt").write_text("Hi")
    (tmp_path / "two.txt").write_text("Hi.")
    args = [a.format(tmp=tmp_path, text=text_file) for a in args]
    result = CliRunner().invoke(main, ["eval", "--engine_dir", str(engine), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    expected = expected.format(tmp=tmp_path)  # a file is named by the path given
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
