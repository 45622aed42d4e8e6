"""kiln quantize on tiny random models: each format's checkpoint against a model quantized by
hand (float64, from the stored tensors and the documented format), smoothing folds that leave
the float function unchanged, tp 1 == tp 2, layer-by-layer statistics == whole-model ones, and
the gate's figures == the reference decoder's on the written checkpoint."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

import kiln
from kiln.checkpoint import load_config, load_merged
from kiln.datasets import load_texts
from kiln.errors import CheckpointError
from kiln.hashing import DIGEST_KEY, sha256_file
from kiln.quantization.config import KV_SCALES
from kiln.quantization.data import load_tokenizer_of, split_calibration, token_samples
from kiln.quantization.quantize import ACCURACY_FILE
from kiln.quantization.transforms import LayerStats, fold_smoothing, input_groups
from kiln.reference import ReferenceDecoder
from kiln.roles import QUANTIZED_ROLES, parse_tensor
from kiln.tensorio import read_header
from kiln.testing.english import english_file
from tests.helpers import flip_bits
from tests.models import PROMPT, hf_model_with_tokenizer, kiln_checkpoint

CALIB = dict(calib_size=8, calib_max_seq_length=36)  # the gate scores 2 x 35 tokens


def quantize(ckpt, out, **options):
    """kiln.quantize with this file's small samples (calib_size only where there is
    calibration text: without it, kiln refuses a setting that does nothing)."""
    calib = CALIB if options.get("calib_dataset") else {"calib_max_seq_length": 24}
    return kiln.quantize(ckpt, out, progress=False, **{**calib, **options})


def hand_dequantize(stored: torch.Tensor, scale: torch.Tensor, qformat: str) -> torch.Tensor:
    """float64 [out, in] from the documented storage (docs/checkpoint.md, Quantization)."""
    scale = scale.double()
    if qformat.startswith("int4"):
        low, high = (stored & 0xF).long(), (stored >> 4).long()
        values = torch.empty(stored.shape[0], stored.shape[1] * 2, dtype=torch.long)
        values[:, 0::2], values[:, 1::2] = low, high  # feature 2j low nibble, 2j+1 high
        values = torch.where(values >= 8, values - 16, values).double()
        group = values.shape[1] // scale.shape[1]
        return values * scale.repeat_interleave(group, dim=1)
    values = stored.double()
    return values * (scale[:, None] if scale.dim() == 1 else scale)


def hand_fake_quant(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    s = float(scale)
    if dtype == "int8":
        return torch.round(x / s).clamp(-128, 127) * s  # torch.round: half to even
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s


class HandDecoder(ReferenceDecoder):
    """The float64 decoder with linears and the KV cache quantized by hand."""

    def __init__(self, config, tensors, qformat, act_dtype, kv_dtype):
        floats = {}
        for name, t in tensors.items():
            role, _, kind = parse_tensor(name)
            if kind is None and role in QUANTIZED_ROLES:
                floats[name] = hand_dequantize(t, tensors[name[:-6] + "weight_scale"], qformat)
            elif kind is None:
                floats[name] = t.double()
        super().__init__(config, floats, dtype=torch.float64)
        self.t, self.act_dtype, self.kv_dtype = tensors, act_dtype, kv_dtype

    def linear(self, x, role, layer, bias=None):
        prefix = role.name(layer)[:-6]
        if prefix + "pre_quant_scale" in self.t:
            x = x * self.t[prefix + "pre_quant_scale"].double()
        if self.act_dtype is not None:
            x = hand_fake_quant(x, self.t[prefix + "input_scale"], self.act_dtype)
        b = None if bias is None else self._get(bias, layer)
        return torch.nn.functional.linear(x, self._get(role, layer), b)

    def _cache_entry(self, i, kind, x):
        scale = self.t.get(f"layers.{i}.attn.{kind}_scale")
        return x if scale is None else hand_fake_quant(x, scale, self.kv_dtype)


FORMAT_CASES = [("int8_wo", {}), ("int4_wo", {"group_size": 32}),
                ("fp8", {"kv_cache_dtype": "fp8"}), ("fp8", {"weight_scales": "per_channel"}),
                ("int8_sq", {"kv_cache_dtype": "int8"}), ("int4_awq", {"group_size": 32})]


@pytest.mark.parametrize("qformat,extra", FORMAT_CASES, ids=lambda v: str(v))
def test_checkpoint_equals_the_model_quantized_by_hand(checkpoint, texts, tmp_path, qformat,
                                                       extra):
    src = checkpoint("llama-gqa")
    out = quantize(src, tmp_path / "q", qformat=qformat, calib_dataset=str(texts["calib"]),
                   no_accuracy_gate=True, **extra)
    config = load_config(out)
    quant = config.quantization
    calibrated = quant.info.needs_calibration or quant.kv_cache_dtype is not None
    assert quant.qformat == qformat and (quant.calibration is not None) == calibrated
    tensors = load_merged(out)
    hand = HandDecoder(config.decoder, tensors, qformat, quant.activation_dtype,
                       {"fp8": "fp8", "int8": "int8", None: None}[quant.kv_cache_dtype])
    prompt = torch.tensor([PROMPT])
    expected = hand.forward(prompt)
    got = ReferenceDecoder.from_checkpoint(out).forward(prompt)
    assert torch.isfinite(got).all()
    assert (got.double() - expected).abs().max() <= 1e-4  # float32 vs float64 arithmetic
    source = ReferenceDecoder.from_checkpoint(src).forward(prompt)
    assert 0 < (got - source).abs().max() <= 0.1  # quantized, and still the same model
    if not quant.info.smoothing:  # weights are the rounding of the source's, per the docs
        float_weights = load_merged(src)
        for name in (n for n in tensors if parse_tensor(n)[2] is None and
                     parse_tensor(n)[0] in QUANTIZED_ROLES):
            w = float_weights[name].double()
            back = hand_dequantize(tensors[name], tensors[name[:-6] + "weight_scale"], qformat)
            if qformat.startswith("int4"):  # each value is its weight rounded at its group's
                # scale (the group's extreme / -8, docs/checkpoint.md)
                scale = tensors[name[:-6] + "weight_scale"].double()
                scale = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
                assert torch.equal(back, (w / scale).round().clamp(-8, 7) * scale)
                continue
            step = back.sub(w).abs().max() / w.abs().max()
            assert step <= {"int8_wo": 1 / 254, "fp8": 1 / 16}[qformat] + 1e-6
    accuracy = quant.accuracy
    assert accuracy is not None and (out / ACCURACY_FILE).is_file()
    assert accuracy["samples"] == 2 and accuracy["tokens"] == 2 * 35
    # what it wrote beside config.json, with sha256s, for --overwrite (kiln.output_dirs)
    written = {p.name: sha256_file(p) for p in out.iterdir()
               if p.name != "config.json" and not p.name.startswith("rank")}
    assert load_config(out).other_files == written and ACCURACY_FILE in written
    # and its rank files, which kiln build checks (tests/builder/test_errors.py)
    assert config.rank_checksums == {p.name: sha256_file(p) for p in out.glob("rank*")}


def test_a_quantized_rank_file_changed_since_is_refused_by_the_build(checkpoint, texts,
                                                                     tmp_path):
    out = quantize(checkpoint("llama-gqa"), tmp_path / "q", qformat="int8_wo",
                   calib_dataset=str(texts["calib"]), no_accuracy_gate=True)
    flip_bits(out / "rank0.safetensors", -3, 0x01)
    with pytest.raises(CheckpointError, match="rank0.safetensors: its bytes are not those kiln "
                                              "quantize wrote"):
        kiln.build(out, tmp_path / "e", max_batch_size=2, max_input_len=16, max_seq_len=32)
    assert not (tmp_path / "e").exists()


def test_a_damaged_source_checkpoint_is_refused_not_quantized(checkpoint, texts, tmp_path):
    """A trial quantized a checkpoint kiln build had refused, and the output's fresh checksums
    hid the damage from the next build."""
    src = shutil.copytree(checkpoint("llama-gqa"), tmp_path / "src")
    flip_bits(src / "rank0.safetensors", -5, 0x20)
    with pytest.raises(CheckpointError, match="src/rank0.safetensors: its bytes are not those "
                                              "kiln convert_checkpoint wrote"):
        quantize(src, tmp_path / "q", qformat="int8_wo", calib_dataset=str(texts["calib"]),
                 no_accuracy_gate=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_damaged_source_tokenizer_is_refused_not_copied(tmp_path):
    """A trial's quantize copied a truncated tokenizer.json and recorded its sha256 as good:
    kiln verify then passed the quantized checkpoint."""
    src = kiln_checkpoint(hf_model_with_tokenizer("llama-gqa", tmp_path / "hf"),
                          tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="src/tokenizer.json: changed since kiln "
                                              "convert_checkpoint wrote it"):
        kiln.quantize(src, tmp_path / "q", qformat="int8_wo", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "src"]


def test_a_source_damaged_into_nan_is_named_before_the_accuracy_gate(checkpoint, texts,
                                                                     tmp_path):
    """The damage, not the NaN perplexity it causes, is what the user needs to hear."""
    src = shutil.copytree(checkpoint("llama-gqa"), tmp_path / "src")
    with open(src / "rank0.safetensors", "r+b") as f:  # the last tensor's last values: NaN as
        f.seek(-4, 2)  # one float32, or two 16-bit floats
        f.write(b"\xc0\x7f\xc0\x7f")
    # (the NaN itself, met as the tensor is read, or the checksum, whichever comes first)
    with pytest.raises(CheckpointError, match=r"src/rank0\.safetensors: (its bytes are not those "
                                              r"kiln convert_checkpoint wrote|\S+ holds NaN/Inf "
                                              r"values)"):
        quantize(src, tmp_path / "q", qformat="int8_wo", calib_dataset=str(texts["calib"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # recording no checksums (an older kiln's checkpoint), the NaN itself is named
    config = json.loads((src / "config.json").read_text())
    del config["rank_checksums"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"src/rank0\.safetensors: \S+ holds NaN/Inf "
                                              r"values .*; the file is damaged"):
        quantize(src, tmp_path / "q", qformat="int8_wo", calib_dataset=str(texts["calib"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_nan_in_the_head_of_a_checkpoint_without_checksums_is_named_before_any_layer(
        checkpoint, texts, tmp_path, monkeypatch):
    """Quantize reads the head after every layer; with no checksums to catch the damage first
    (an older kiln's checkpoint), a NaN there had been met only then (~30 s on SmolLM2)."""
    src = shutil.copytree(checkpoint("llama-gqa"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["rank_checksums"], config[DIGEST_KEY]  # as an older kiln wrote it
    (src / "config.json").write_text(json.dumps(config))
    head = read_header(src / "rank0.safetensors")[0]["lm_head.weight"]
    with open(src / "rank0.safetensors", "r+b") as f:
        f.seek(head.begin + head.nbytes // 2)  # a middle row
        f.write(b"\xc0\x7f\xc0\x7f")  # NaN as one float32, or two 16-bit floats
    layers = []
    monkeypatch.setattr("kiln.quantization.quantize._Job._layer",
                        lambda self, i, *a: layers.append(i))
    with pytest.raises(CheckpointError, match=r"src/rank0\.safetensors: lm_head\.weight holds "
                                              r"NaN/Inf values \(first at row \d+\); the file "
                                              r"is damaged"):
        quantize(src, tmp_path / "q", qformat="int8_wo", calib_dataset=str(texts["calib"]))
    assert layers == [] and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("variant", ["llama-mha-headdim-bias", "falcon-7b-mqa",
                                     "falcon-rw-alibi", "mpt"])
def test_smoothing_folds_leave_the_float_function_unchanged(checkpoint, variant):
    """Any positive per-channel s, folded into norms and pre_quant_scales: same logits, 1e-5."""
    src = checkpoint(variant)
    config = load_config(src).decoder
    weights = {n: t.double() for n, t in load_merged(src).items()}
    folded = dict(weights)
    generator = torch.Generator().manual_seed(0)
    for layer in range(config.num_layers):
        for group in input_groups(config):
            k = weights[group.linears[0].name(layer)].shape[1]
            s = torch.exp(torch.randn(k, generator=generator, dtype=torch.float64))
            folded.update(fold_smoothing(folded, layer, group, s))
    prompt = torch.tensor([PROMPT])
    before = ReferenceDecoder(config, weights, dtype=torch.float64).forward(prompt)
    after = ReferenceDecoder(config, folded, dtype=torch.float64).forward(prompt)
    changed = sum(not torch.equal(weights[n], folded[n]) for n in weights)
    assert changed >= 4 * config.num_layers
    assert (before - after).abs().max() <= 1e-5


@pytest.mark.parametrize("variant,qformat,extra", [
    ("llama-gqa", "int8_sq", {"kv_cache_dtype": "fp8"}),
    ("llama-i128", "int4_awq", {"group_size": 32}),
    ("llama-i128", "int4_awq", {"group_size": 32, "quantize_lm_head": True})])
def test_tp1_and_tp2_quantized_checkpoints_give_the_same_logits(checkpoint, texts, tmp_path,
                                                                 variant, qformat, extra):
    outs = [quantize(checkpoint(variant, tp=tp), tmp_path / f"tp{tp}", qformat=qformat,
                     calib_dataset=str(texts["calib"]), no_accuracy_gate=True, **extra)
            for tp in (1, 2)]
    merged = [load_merged(o) for o in outs]
    assert merged[0].keys() == merged[1].keys()
    assert all(torch.equal(merged[0][n], merged[1][n]) for n in merged[0])
    logits = [ReferenceDecoder.from_checkpoint(o).forward(torch.tensor([PROMPT])) for o in outs]
    assert torch.equal(logits[0], logits[1])
    assert load_config(outs[1]).mapping.tp_size == 2


def test_the_default_sample_length_is_the_models_context_where_shorter(checkpoint, texts,
                                                                      tmp_path):
    """Without calib_max_seq_length a sample is 512 tokens, or max_position_embeddings where
    that is shorter (64 here); asked for past it, the length is refused (test_errors.py)."""
    src = checkpoint("llama-gqa")
    assert load_config(src).decoder.max_position_embeddings == 64
    out = kiln.quantize(src, tmp_path / "q", qformat="fp8", calib_dataset=str(texts["calib"]),
                        calib_size=6, no_accuracy_gate=True, progress=False)
    assert load_config(out).quantization.calibration["seq_length"] == 64


def test_layer_by_layer_statistics_equal_whole_model_ones(checkpoint, texts, tmp_path):
    """Static scales of a tp 2 x pp 2 checkpoint == max|x| / 448 over the whole float model's
    forward of the same calibration samples."""
    src = checkpoint("llama-gqa", tp=2, pp=2)
    out = quantize(src, tmp_path / "q", qformat="fp8", kv_cache_dtype="fp8",
                   calib_dataset=str(texts["calib"]), no_accuracy_gate=True)
    calib, _ = split_calibration(load_texts(texts["calib"]), load_tokenizer_of(src),
                                 CALIB["calib_size"], CALIB["calib_max_seq_length"])
    stats = LayerStats()
    ReferenceDecoder.from_checkpoint(src, observer=stats.observe).forward(calib.tokens)
    tensors = load_merged(out)
    checked = 0
    for name, tensor in tensors.items():
        role, layer, kind = parse_tensor(name)
        if kind == "input_scale":
            amax = stats.amax[role.name(layer)].amax()
        elif kind in KV_SCALES:
            amax = stats.amax[f"layers.{layer}.attn.{kind[0]}"]
        else:
            continue
        torch.testing.assert_close(tensor, amax / 448, rtol=1e-5, atol=0)
        checked += 1
    assert checked == 2 * (4 + 2)


@pytest.mark.parametrize("lm_head", [False, True])
def test_gate_figures_equal_the_reference_on_the_written_checkpoint(checkpoint, texts, tmp_path,
                                                                    lm_head):
    src = checkpoint("llama-gqa")
    out = quantize(src, tmp_path / "q", qformat="int4_wo", group_size=32,
                   eval_dataset=str(texts["eval"]), no_accuracy_gate=True,
                   quantize_lm_head=lm_head)
    assert load_merged(out)["lm_head.weight"].dtype == (torch.uint8 if lm_head else torch.float32)
    accuracy = load_config(out).quantization.accuracy
    samples = token_samples(load_texts(texts["eval"]), load_tokenizer_of(src), 24).tokens
    nll = {}
    for which, ckpt in (("source", src), ("quantized", out)):
        logits = ReferenceDecoder.from_checkpoint(ckpt).forward(samples)
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        nll[which] = -logp.gather(-1, samples[:, 1:, None]).mean()
    for which in nll:
        assert math.isclose(accuracy[f"perplexity_{which}"], float(nll[which].exp()),
                            rel_tol=1e-5)
    assert accuracy["tokens"] == samples.shape[0] * 23 and accuracy["samples"] == len(samples)
    assert 0 < accuracy["top1_agreement"] <= 1 and accuracy["kl_divergence"] >= 0
    assert load_config(out).quantization.calibration is None  # weight-only: nothing calibrated


def eval_file(case: str, texts: dict, tmp_path) -> tuple[Path, Path]:
    """(--calib_dataset, --eval_dataset) for one case of the test below."""
    if case == "english":
        return english_file("calibration"), english_file("evaluation")
    calib, other = texts["calib"], texts["eval"]
    if case == "other":
        return calib, other
    whole, others = calib.read_text(), other.read_text()
    paragraphs = whole.split("\n\n")  # 40, one line of 30 words each
    text = {"copy": whole, "crlf": whole.replace("\n", "\r\n"),
            "half": "\n\n".join(paragraphs[:20]), "tail": "\n\n".join(paragraphs[20:]),
            "half shared": "\n\n".join(paragraphs[:10] + [others]),
            "under half shared": "\n\n".join(paragraphs[:9] + [others])}[case]
    path = tmp_path / "eval.txt"
    path.write_bytes(text.encode())
    return calib, path


def samples_reading_all_of(path: Path, ckpt: Path) -> int:
    """The --calib_size whose samples (of CALIB's length) read all but the last one's worth of
    ``path``'s tokens."""
    from kiln.quantization.data import encode_stream

    tokens = len(encode_stream(load_texts(str(path)), load_tokenizer_of(ckpt), None))
    return tokens // CALIB["calib_max_seq_length"]


@pytest.mark.parametrize("qformat,case,shared", [
    ("fp8", "copy", (40, 40)),  # the calibration text again, from another path
    ("fp8", "half", (20, 20)),
    ("fp8", "crlf", (40, 40)),
    ("fp8", "half shared", (10, 20)),
    ("fp8", "under half shared", (9, 19)),  # warned of from half (a trial's 40% was not)
    ("fp8", "other", None),
    ("fp8", "english", None),  # kiln.testing.english's two sets: no paragraph in both
    ("int8_wo", "copy", None),  # nothing calibrated: any text is unseen
    ("fp8 head", "copy", (2, 40)),  # calibration reads the first paragraphs only
    ("fp8 head", "tail", None),  # trial 37: the tail of a file whose head alone was read
])
def test_a_gate_on_the_calibration_text_is_said_to_flatter(checkpoint, texts, tmp_path, caplog,
                                                           qformat, case, shared):
    """Trial D gave one file as --calib_dataset and --eval_dataset and was told nothing: the
    gate then scores what calibration saw. A byte-identical check then missed half of the
    calibration file, and the file with CRLF line endings; a share under half (a trial's one
    file given as both, --calib_size 4 reading 40% of it) was told nothing."""
    calib, evaluation = eval_file(case, texts, tmp_path)
    ckpt = checkpoint("llama-gqa")
    head = qformat == "fp8 head"  # CALIB's 8 samples; the others read the whole file
    size = {} if head or qformat == "int8_wo" else {"calib_size": samples_reading_all_of(calib,
                                                                                          ckpt)}
    with caplog.at_level(logging.WARNING, "kiln.quantization.quantize"):
        quantize(ckpt, tmp_path / "q", qformat=qformat.split()[0], no_accuracy_gate=True,
                 eval_dataset=str(evaluation), calib_dataset=str(calib), **size)
    said = [r.getMessage() for r in caplog.records if "flatters" in r.getMessage()]
    if shared is None:
        assert said == []
        return
    n, lines = shared
    assert said == [f"eval_dataset {evaluation}: {n} of its {lines} lines are in the text "
                    f"calibration read from calib_dataset: the "
                    f"accuracy gate scores text calibration has seen, which flatters the "
                    f"quantized checkpoint; give other text, or leave eval_dataset out (a "
                    f"fifth of the calibration text read is then held out for the gate)"]


def test_an_eval_dataset_needs_no_held_out_calibration_text(checkpoint, texts, tmp_path,
                                                             caplog):
    """Trial 37: with --eval_dataset scoring the gate, a calibration text that held
    --calib_size samples was refused for the held-out samples it would not read; and a
    weight-only format, which reads no calibration text, was refused for all of them."""
    ckpt = checkpoint("llama-gqa")
    calib, evaluation = texts["calib"], texts["eval"]
    size = samples_reading_all_of(calib, ckpt)  # too many to hold a quarter more out
    with pytest.raises(kiln.errors.DatasetError, match="held-out samples? for the accuracy gate"):
        quantize(ckpt, tmp_path / "a", qformat="fp8", no_accuracy_gate=True,
                 calib_dataset=str(calib), calib_size=size)
    quantize(ckpt, tmp_path / "b", qformat="fp8", no_accuracy_gate=True,
             calib_dataset=str(calib), calib_size=size, eval_dataset=str(evaluation))
    assert load_config(tmp_path / "b").quantization.calibration["samples"] == size
    with caplog.at_level(logging.WARNING, "kiln.quantization.quantize"):
        quantize(ckpt, tmp_path / "c", qformat="int8_wo", no_accuracy_gate=True,
                 calib_dataset=str(calib), calib_size=10 * size, eval_dataset=str(evaluation))
    assert f"calib_dataset {calib} is not read: int8_wo calibrates nothing, and " \
           f"eval_dataset scores the accuracy gate" in caplog.text
