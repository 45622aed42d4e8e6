"""Bad input to kiln quantize: one line, exit 2, nothing written; the accuracy gate's refusal
writes nothing; no data at all records accuracy null with a warning."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

import kiln
from kiln.checkpoint import load_config
from kiln.cli.main import main
from kiln.errors import AccuracyGateError, ConfigError, options_as_flags
from kiln.quantization.accuracy import check_gate


def _cli(*args):
    return CliRunner().invoke(main, ["quantize", *map(str, args)], prog_name="kiln")


def _nothing_written(parent, name="q"):
    return not any(p.name.startswith((name, f".{name}")) for p in parent.iterdir())


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    return kiln.quantize(checkpoint("llama-gqa"), tmp_path_factory.mktemp("done") / "q",
                         qformat="int8_wo", progress=False)


def _cases(src, src_tp2, texts, quantized, tmp):
    calib = ["--calib_dataset", texts["calib"]]
    empty, binary = tmp / "empty.txt", tmp / "binary.txt"
    empty.write_text("  \n\n")
    tiny_eval = tmp / "tiny_eval.txt"
    tiny_eval.write_text("the model reads a layer of weights")  # 34 characters: 2 windows
    binary.write_bytes(b"\xff\xfe\x00bad")
    return {
        "wrong qformat": (["--qformat", "int3"], src, "'int3' is not one of"),
        "group size": (["--qformat", "int4_wo", "--group_size", "32"], src_tp2,
                       "does not divide the 48 input features of mlp.down per rank"),
        # click had listed 32, 64, 128 without saying which fit this model
        "group size no kernel takes": (["--qformat", "int4_wo", "--group_size", "48"], src,
                                       "--group_size 48 is not an int4 group size (32, 64, 128); "
                                       "of those, 32 divides this checkpoint's input features "
                                       "per rank (tp_size 1: attn.qkv / mlp (hidden) 64, attn.o "
                                       "64, mlp.down 96); use --group_size 32"),
        "group size on int8": (["--qformat", "int8_wo", "--group_size", "48"], src,
                              "--group_size applies to int4 formats only, not int8_wo"),
        # named as the flag (it had been group_size, kiln.quantize's keyword)
        "group size 0": (["--qformat", "int4_wo", "--group_size", "0"], src,
                         "error: --group_size must be a positive integer, found 0"),
        # the size named as the default: a trial had not typed 128
        "default group size": (["--qformat", "int4_wo"], src,
                               "error: the default --group_size 128 does not divide the 64 "
                               "input features of attn.qkv / mlp (hidden) per rank (tp_size 1); "
                               "use --group_size 32"),
        "missing file": (["--qformat", "int8_sq", "--calib_dataset", tmp / "nope.txt"], src,
                         "nope.txt"),
        "empty file": (["--qformat", "int8_sq", "--calib_dataset", empty], src, "empty.txt"),
        "unreadable file": (["--qformat", "int8_sq", "--calib_dataset", binary], src,
                            "binary.txt"),
        "too few tokens": (["--qformat", "int8_sq", *calib, "--calib_size", "5000"], src,
                           "lower --calib_size"),
        "needs data": (["--qformat", "int4_awq"], src, "int4_awq needs calibration data"),
        "kv needs data": (["--qformat", "int8_wo", "--kv_cache_dtype", "fp8"], src,
                          "--kv_cache_dtype fp8 needs calibration data"),
        # what is missing is said before what is extra (a trial was told to leave the length out)
        "needs data, length given": (["--qformat", "int8_sq", "--calib_max_seq_length", "16"],
                                     src, "int8_sq needs calibration data"),
        "already quantized": (["--qformat", "int8_wo"], quantized, "is already quantized"),
        "fp8 scales on int8": (["--qformat", "int8_wo", "--weight_scales", "per_tensor"], src,
                               "error: --weight_scales applies to fp8 only"),
        "alpha on int4": (["--qformat", "int4_wo", "--smoothquant_alpha", "0.5"], src,
                          "error: --smoothquant_alpha applies to int8_sq only"),
        "alpha nan": (["--qformat", "int8_sq", *calib, "--smoothquant_alpha", "nan"], src,
                      "nan is not in the range 0.0<=x<=1.0."),
        # a trial's settings that did nothing, written with a warning only
        "ratio inf": (["--qformat", "int8_wo", *calib, "--max_ppl_ratio", "inf"], src,
                      "max_ppl_ratio must be a finite number >= 1 (--no_accuracy_gate measures "
                      "without refusing), found inf"),
        "calib size without data": (["--qformat", "int8_wo", "--calib_size", "4"], src,
                                    "--calib_size needs --calib_dataset, which is not given; "
                                    "give it, or leave --calib_size out"),
        # a retest followed "give it" beside --eval_dataset: the text was read by nothing
        "calib size beside eval text": (["--qformat", "int8_wo", "--calib_size", "4",
                                         "--eval_dataset", str(calib[1])], src,
                                        "--calib_size does nothing here: int8_wo calibrates "
                                        "nothing, and --eval_dataset scores the accuracy gate; "
                                        "leave --calib_size out"),
        # a trial: the message had named --calib_dataset only
        "gate without text": (["--qformat", "int8_wo", "--max_ppl_ratio", "1.5",
                               "--calib_max_seq_length", "64"], src,
                              "--calib_max_seq_length and --max_ppl_ratio need text: "
                              "--calib_dataset or --eval_dataset, and neither is given; give "
                              "one, or leave them out"),
        "calibration past the context": (["--qformat", "int8_sq", *calib,
                                          "--calib_max_seq_length", "100000"], src,
                                         "calib_max_seq_length 100000 exceeds the model's "
                                         "max_position_embeddings"),
        # a trial's fp8 gated on 1 token 'passed' at 25% worse perplexity
        "gate of one token": (["--qformat", "fp8", *calib, "--calib_size", "1",
                               "--calib_max_seq_length", "2"], src,
                              "the accuracy gate would score 1 token (1 window of 2 tokens, "
                              "whose first predicts nothing), too few to decide anything (it "
                              "needs 64 scored, and 4096 for a firm answer): give more "
                              "calibration samples"),
        "gate of few eval tokens": (["--qformat", "int8_wo", "--eval_dataset", tiny_eval,
                                     "--calib_max_seq_length", "16"], src,
                                    "give longer --eval_dataset text; or pass "
                                    "--no_accuracy_gate"),
        # a trial followed the length advice here into the gate's refusal
        "eval text shorter than a sample": (["--qformat", "int8_wo", "--eval_dataset", tiny_eval,
                                             "--calib_max_seq_length", "40"], src,
                                            "The accuracy gate needs 65 tokens of it at the "
                                            "least (64 scored: a sample's first token predicts "
                                            "nothing); with fewer, pass --no_accuracy_gate"),
        # the default's value, asked for: refused as any other (left out, it is capped)
        "512 past the context": (["--qformat", "int8_sq", *calib,
                                  "--calib_max_seq_length", "512"], src,
                                 "calib_max_seq_length 512 exceeds the model's "
                                 "max_position_embeddings 64"),
    }


CASES = ["wrong qformat", "group size", "group size no kernel takes", "group size on int8",
         "group size 0", "default group size",
         "missing file", "empty file", "unreadable file",
         "too few tokens", "needs data", "kv needs data", "needs data, length given",
         "already quantized",
         "fp8 scales on int8", "alpha on int4", "alpha nan", "ratio inf", "calib size without data",
         "calib size beside eval text",
         "gate without text", "calibration past the context", "512 past the context",
         "gate of one token", "gate of few eval tokens", "eval text shorter than a sample"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(checkpoint, texts, quantized,
                                                          tmp_path, case):
    args, src, message = _cases(checkpoint("llama-gqa"), checkpoint("llama-gqa", tp=2), texts,
                                quantized, tmp_path)[case]
    result = _cli("--checkpoint_dir", src, "--output_dir", tmp_path / "q", *args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output
    assert _nothing_written(tmp_path)


def _edited_copy(src, dst, edit):
    """A copy of checkpoint ``src`` with its config.json edited on purpose (its digest and
    rank_checksums removed, as the refusals of an edit advise)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    del config["manifest_sha256"], config["rank_checksums"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("tp,edit,message", [
    (1, lambda c: c.update(dtype="float16"), "embed.weight is float32, and "
     "config.json says dtype float16: config.json was edited or belongs to another checkpoint"),
    (2, lambda c: c["mapping"].update(tp_size=1), "is [64, 32], where config.json implies "
     "[64, 64]"),
    (1, lambda c: c["decoder"].update(num_layers=1), "tensors do not match config.json: "
     "unexpected ['layers.1."),
], ids=["dtype", "tp-size", "num-layers"])
def test_a_source_whose_config_no_longer_fits_its_tensors_is_one_line(checkpoint, tmp_path, tp,
                                                                      edit, message):
    """A retest's edited dtype and tp_size had been tracebacks (exit 1) midway, after the
    calibration; kiln build refused them before any work. Checked from the headers first."""
    src = _edited_copy(checkpoint("llama-gqa", tp=tp), tmp_path / "edited", edit)
    result = _cli("--checkpoint_dir", src, "--output_dir", tmp_path / "q", "--qformat",
                  "int8_wo")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, \
        result.output
    assert _nothing_written(tmp_path)


def test_output_inside_the_input_is_refused(checkpoint):
    src = checkpoint("llama-gqa")
    result = _cli("--checkpoint_dir", src, "--output_dir", src / "q", "--qformat", "int8_wo")
    assert result.exit_code == 2 and "destroy the input" in result.output
    assert not (src / "q").exists()


def test_cuda_without_a_gpu_is_refused(checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    result = _cli("--checkpoint_dir", checkpoint("llama-gqa"), "--output_dir", tmp_path / "q",
                  "--qformat", "int8_wo", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA GPU" in result.output
    assert _nothing_written(tmp_path)


def test_gate_refusal_writes_nothing_and_says_the_figures(checkpoint, texts, tmp_path):
    src = checkpoint("mpt")  # its int4_wo perplexity ratio on this text at group 64: 1.0082
    args = ["--checkpoint_dir", src, "--qformat", "int4_wo", "--group_size", "64",
            "--eval_dataset", texts["eval"]]
    measured = _cli(*args, "--output_dir", tmp_path / "m", "--no_accuracy_gate")
    assert measured.exit_code == 0, measured.output
    accuracy = load_config(tmp_path / "m").quantization.accuracy
    assert accuracy["ppl_ratio"] > 1.0 and accuracy["max_ppl_ratio"] == 1.35  # int4_wo default
    # the result's line by default (stderr), the output dir alone on stdout
    assert "(int4_wo): accuracy perplexity" in measured.stderr
    assert f"(ratio {accuracy['ppl_ratio']:.4f})" in measured.stderr
    assert measured.stdout.strip() == str(tmp_path / "m")
    refused = _cli(*args, "--output_dir", tmp_path / "q", "--max_ppl_ratio", "1.0")
    assert refused.exit_code == 2
    line, = refused.output.strip().splitlines()
    assert "int4_wo fails the accuracy gate" in line and f"{accuracy['ppl_ratio']:.4f}" in line
    assert _nothing_written(tmp_path)
    passed = _cli(*args, "--output_dir", tmp_path / "q", "--max_ppl_ratio", "1.5")
    assert passed.exit_code == 0 and load_config(tmp_path / "q").quantization.accuracy["passed"]
    again = _cli(*args, "--output_dir", tmp_path / "q", "--overwrite")  # accuracy.json is kiln's
    assert again.exit_code == 0, again.output


def test_a_nan_figure_fails_even_without_the_gate():
    """Refused whatever the options say, so the refusal offers none of them."""
    figures = dict(perplexity_source=10.0, perplexity_quantized=math.nan, ppl_ratio=math.nan,
                   top1_agreement=0.5, kl_divergence=0.1, tokens=10)
    with pytest.raises(AccuracyGateError, match=r"\(a figure is NaN/inf\): .*; nothing written; "
                                                r"calibrate with more or other data, or choose a "
                                                r"more accurate format \(int8_wo\)$"):
        check_gate(figures, "fp8", 1.03, enforce=False)
    with pytest.raises(AccuracyGateError, match=r"; nothing written; keep the checkpoint "
                                                r"unquantized \(its own figures are finite"):
        check_gate(figures, "int8_wo", 1.03, enforce=False)
    source_nan = {**figures, "perplexity_source": math.inf}
    with pytest.raises(AccuracyGateError, match=r"\(the source model's own perplexity is "
                                                r"NaN/inf\): .*; nothing written; check the "
                                                r"source checkpoint \(kiln verify\) and convert "
                                                r"it again$"):
        check_gate(source_nan, "int4_wo", 1.03, enforce=True)
    ok = {**figures, "perplexity_quantized": 10.2, "ppl_ratio": 1.02}
    assert check_gate(ok, "fp8", 1.03, enforce=True)
    assert not check_gate({**ok, "ppl_ratio": 1.04}, "fp8", 1.03, enforce=False)


@pytest.mark.parametrize("qformat, settings, remedies", [
    # a trial's int8_wo with an int8 KV cache was told to choose a wider format than the widest
    ("int8_wo", ["--kv_cache_dtype int8"], "try without --kv_cache_dtype int8, or pass"),
    ("int8_sq", ["--smoothquant_alpha 0 (this model's default: 0.5)"],
     "try without --smoothquant_alpha 0 (this model's default: 0.5), calibrate with more or "
     "other data, choose a more accurate format (int8_wo, fp8), or pass"),
    ("int4_wo", ["--quantize_lm_head"], "try without --quantize_lm_head, choose a more accurate "
                                        "format (int8_wo, fp8, int8_sq, int4_awq), or pass"),
    # a trial: "a wider format" had not said which
    ("int4_wo", [], "nothing written; choose a more accurate format (int8_wo, fp8, int8_sq, "
                    "int4_awq), or pass"),
    ("int8_wo", [], "nothing written; pass"),  # had read "nothing written; , or pass"
    # a trial's int4_awq on little data had not been offered int4_wo, whose gate is looser
    ("int4_awq", [], "nothing written; calibrate with more or other data, choose a more "
                     "accurate format (int8_wo, fp8, int8_sq), take int4_wo (the same weight "
                     "size, no calibration; its default gate is 1.35), or pass"),
])
def test_a_gate_refusal_names_what_may_win_accuracy_back(qformat, settings, remedies):
    """(``settings`` as kiln quantize names them: flags; the Python API's are keywords.)"""
    figures = dict(perplexity_source=10.0, perplexity_quantized=11.0, ppl_ratio=1.1,
                   top1_agreement=0.9, kl_divergence=0.1, tokens=5000)
    with options_as_flags(), pytest.raises(AccuracyGateError) as raised:
        check_gate(figures, qformat, 1.01, enforce=True, settings=settings)
    assert f"{remedies} --max_ppl_ratio / --no_accuracy_gate to accept it" in str(raised.value)
    with pytest.raises(AccuracyGateError) as raised:
        check_gate(figures, qformat, 1.01, enforce=True, settings=settings)
    assert str(raised.value).endswith("pass max_ppl_ratio / no_accuracy_gate=True to accept it")


def test_no_data_records_accuracy_null_with_a_warning_at_quantize_and_build(
        checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        out = kiln.quantize(checkpoint("llama-gqa"), tmp_path / "q", qformat="int4_wo",
                            group_size=32, progress=False)
    assert load_config(out).quantization.accuracy is None
    assert any("accuracy was not measured" in r.message and r.levelno == logging.WARNING
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a -q quantize hid the first: the build says it
        kiln.build(out, tmp_path / "e", backend="onnx", max_batch_size=1, max_seq_len=16)
    assert (f"{out} was quantized (int4_wo) without measuring its accuracy (no text was given "
            f"to kiln quantize)") in caplog.text


def test_an_unenforced_gate_on_too_few_tokens_is_recorded_undecided(checkpoint, tmp_path,
                                                                     caplog):
    """A trial's --no_accuracy_gate on 7 tokens recorded passed: true (enforced, refused)."""
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("the model reads a layer of weights")
    with caplog.at_level(logging.WARNING):
        out = kiln.quantize(checkpoint("llama-gqa"), tmp_path / "q", qformat="int8_wo",
                            eval_dataset=tiny, calib_max_seq_length=16, no_accuracy_gate=True,
                            progress=False)
    accuracy = load_config(out).quantization.accuracy
    assert accuracy["passed"] is None and 0 < accuracy["tokens"] < 64
    assert f"rest on {accuracy['tokens']} tokens, too few to decide (under 64): recorded as " \
           f"undecided (passed: null)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kiln.build(out, tmp_path / "e", backend="onnx", max_batch_size=1, max_seq_len=16)
    assert f"{out}: its accuracy gate is undecided ({accuracy['tokens']} tokens scored" \
        in caplog.text


def test_short_samples_and_a_small_gate_are_warned_about(checkpoint, texts, tmp_path, caplog):
    """A trial's --calib_max_seq_length 2 ran without a word; the small-gate warning advised
    --calib_size, which does nothing to an --eval_dataset gate."""
    with caplog.at_level(logging.WARNING):
        kiln.quantize(checkpoint("llama-gqa"), tmp_path / "q", qformat="int8_wo",
                      eval_dataset=texts["eval"], calib_max_seq_length=8, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # int8_wo calibrates nothing: only the gate's figure is short-sighted
    assert any("calib_max_seq_length=8: the accuracy gate's perplexity comes from 8-token "
               "contexts" in m and "64 or more" in m for m in warned), warned
    small, = [m for m in warned if "the accuracy gate rests on" in m]
    assert small.endswith("give longer eval_dataset text") and "calib_size" not in small


def test_unknown_api_keyword_is_named(checkpoint, tmp_path):
    with pytest.raises(Exception, match=r"unknown options \['calib_sise'\]"):
        kiln.quantize(checkpoint("llama-gqa"), tmp_path / "q", qformat="int8_wo", calib_sise=3)


@pytest.mark.parametrize("option,said", [
    (dict(qformat="int4_wo", group_size="64"), "group_size must be a positive integer, found '64'"),
    (dict(qformat="int8_sq", smoothquant_alpha="0.5"), "smoothquant_alpha must be a number, "
                                                       "found '0.5'"),
    (dict(qformat="int8_wo", max_ppl_ratio="1.5"), "max_ppl_ratio must be a number, found '1.5'"),
], ids=["group_size", "alpha", "ratio"])
def test_api_options_of_the_wrong_type_are_named(checkpoint, tmp_path, option, said):
    """A string where a number goes: group_size '64' had been told that 64 is not a group size
    and to use 64; the others had been TypeError tracebacks."""
    with pytest.raises(ConfigError) as e:
        kiln.quantize(checkpoint("llama-gqa"), tmp_path / "q", **option)
    assert str(e.value) == said
    assert not (tmp_path / "q").exists()


def test_ctrl_c_during_the_layer_loop_exits_130_and_leaves_nothing(checkpoint, texts, tmp_path):
    from tests.test_interrupts import leftovers, run_cli

    patch = """
        import os, signal, time
        from kiln.quantization import layerio

        write = layerio.QuantizedWriter.write_layer

        def interrupted(self, layer, tensors):
            write(self, layer, tensors)
            print(f"signal {time.perf_counter()}", flush=True)
            os.kill(os.getpid(), signal.SIGINT)

        layerio.QuantizedWriter.write_layer = interrupted
    """
    script_end = ["--checkpoint_dir", str(checkpoint("llama-gqa")), "--output_dir",
                  str(tmp_path / "q"), "--qformat", "int8_sq", "--calib_dataset",
                  str(texts["calib"]), "--calib_size", "8", "--calib_max_seq_length", "36"]
    result, _ = run_cli(patch, ["quantize", *script_end])
    assert result.returncode == 130, result.stderr
    assert "interrupted (Ctrl-C)" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.count("signal") == 1  # stopped in the first layer
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []


def test_an_engine_built_past_a_failed_gate_says_so(checkpoint, texts, tmp_path, caplog):
    """A trial's engine from a --no_accuracy_gate checkpoint that failed it: nothing said."""
    src = checkpoint("mpt")
    out = kiln.quantize(src, tmp_path / "q", qformat="int4_wo", group_size=64,
                        eval_dataset=texts["eval"], max_ppl_ratio=1.0, no_accuracy_gate=True,
                        progress=False)
    ratio = load_config(out).quantization.accuracy["ppl_ratio"]
    with caplog.at_level(logging.WARNING):
        kiln.build(out, tmp_path / "e", backend="onnx", max_batch_size=1, max_seq_len=16)
    assert (f"{out} failed its accuracy gate (quantized with --no_accuracy_gate: ppl ratio "
            f"{ratio:.4f}, over 1.0); the engine is built from it as asked") in caplog.text


@pytest.mark.parametrize("data", ["--calib_dataset", "--eval_dataset"])
def test_a_tokenizer_past_the_model_s_vocabulary_is_one_line(checkpoint, texts, tmp_path, data):
    """A retest's checkpoint held another model's tokenizer (ids past its 256 tokens): the
    embedding lookup had been a traceback, exit 1."""
    from tokenizers import Tokenizer, models

    src = tmp_path / "src"
    shutil.copytree(checkpoint("llama-gqa"), src)
    vocab = {ch: 200 + i for i, ch in enumerate(map(chr, range(32, 127)))}  # the model has 128
    vocab.update({"\n": 300, "<unk>": 301})
    Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(
        str(src / "tokenizer.json"))
    dataset = texts["calib" if data == "--calib_dataset" else "eval"]
    given = ["--qformat", "int4_awq", "--group_size", 32, "--calib_size", 2] \
        if data == "--calib_dataset" else ["--qformat", "int8_wo", "--no_accuracy_gate"]
    result = _cli("--checkpoint_dir", src, "--output_dir", tmp_path / "q", data, dataset,
                  "--calib_max_seq_length", 16, *given)
    assert result.exit_code == 2, result.output
    said = f"error: {src}: its tokenizer encodes {dataset} to token id "
    assert result.output.startswith(said), result.output
    assert "past the model's vocabulary of 128 (decoder.vocab_size): the tokenizer files are " \
           "not this model's" in result.output and len(result.output.splitlines()) == 1
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("damage, said", [
    ("delete", "tokenizer.json: missing, so kiln cannot tokenize the calibration and evaluation "
               "text; convert the checkpoint again from a Hugging Face dir that holds the "
               "tokenizer files"),
    ("garble", "tokenizer.json: unreadable ("),
])
def test_a_checkpoint_without_a_readable_tokenizer_is_told_to_convert_again(
        checkpoint, texts, tmp_path, damage, said):
    """A retest's checkpoint without tokenizer.json had been told to rebuild an engine dir."""
    src = tmp_path / "src"
    shutil.copytree(checkpoint("llama-gqa"), src)
    if damage == "delete":
        (src / "tokenizer.json").unlink()
    else:
        (src / "tokenizer.json").write_text("{not json")
    result = _cli("--checkpoint_dir", src, "--output_dir", tmp_path / "q", "--qformat",
                  "int8_wo", "--eval_dataset", texts["eval"], "--no_accuracy_gate")
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert said in result.output and "engine dir" not in result.output, result.output
    assert "convert the checkpoint again from a Hugging Face dir" in result.output
    assert _nothing_written(tmp_path)
