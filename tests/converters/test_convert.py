"""convert_checkpoint: output format, bad input (one clear error, nothing left behind), safety."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import kiln
from kiln.checkpoint import load_config, load_rank
from kiln.errors import (
    CheckpointError,
    ConfigError,
    OutputExistsError,
    TensorMappingError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from tests.helpers import with_bom
from tests.models import hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture
def src(hf_dir, tmp_path):
    """A private copy of the HF model that a test may damage."""
    out = tmp_path / "src"
    out.mkdir()
    for f in hf_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _convert(src, out, **kw):
    return kiln.convert_checkpoint(src, out, progress=False, **kw)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_output_format(hf_dir, tmp_path):
    out = _convert(hf_dir, tmp_path / "ckpt", tp_size=2, pp_size=2, dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["mapping"] == {"tp_size": 2, "pp_size": 2}
    assert config["dtype"] == "bfloat16"
    assert config["quantization"] is None
    assert set(config["source"]["files"]) == {"model.safetensors"}
    assert len(config["source"]["files"]["model.safetensors"]) == 64  # sha256 hex
    assert config["rank_checksums"] == {  # what kiln build checks the rank files against
        f"rank{r}.safetensors": hashlib.sha256((out / f"rank{r}.safetensors").read_bytes())
        .hexdigest() for r in range(4)}
    ckpt = load_config(out)
    rank3 = load_rank(out, 3, ckpt)  # tp_rank 1 of the last stage: layer 1 + head
    assert "embed.weight" not in rank3 and "lm_head.weight" in rank3
    assert rank3["layers.1.attn.qkv.weight"].shape == (64, 64)  # (2 q heads + 1 k + 1 v) x 16
    assert all(t.dtype == torch.bfloat16 for t in rank3.values())
    assert _leftovers(tmp_path) == []


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError,
                       match=r"^model_dir='.*/nope': no such local directory \(.* has no nope\), "
                             r"and not a hub id"):
        _convert(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing, so .* is not an HF checkpoint directory"):
        _convert(src, tmp_path / "out")


def test_unsupported_architecture_lists_supported(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM.*MistralForCausalLM"):
        _convert(src, tmp_path / "out")


@pytest.mark.parametrize("tp,message", [(3, "query heads"), (8, "query heads")])
def test_tp_size_must_divide_heads(hf_dir, tmp_path, tp, message):
    with pytest.raises(ConfigError, match=message):
        _convert(hf_dir, tmp_path / "out", tp_size=tp)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_tp_size_must_divide_mlp_width(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 97  # heads divide by 2, the MLP width does not
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="MLP width"):
        _convert(src, tmp_path / "out", tp_size=2)


def test_truncated_safetensors(src, tmp_path):
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        _convert(src, tmp_path / "out")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, reason", [
    ("tokenizer.json", "garbage", "tokenizer.json: unreadable"),
    ("tokenizer_config.json", "{not json", "tokenizer_config.json: invalid JSON"),
    ("generation_config.json", "null", "generation_config.json: not a JSON object"),
])
def test_a_tokenizer_that_does_not_load_is_refused_before_anything_is_written(
        src, tmp_path, name, content, reason):
    """A trial's corrupt tokenizer.json passed convert and build with exit 0; only kiln run
    failed, advising to re-copy the checkpoint's copy, as corrupt."""
    from tests.models import hf_model_with_tokenizer

    hf_model_with_tokenizer("llama-gqa", src)
    (src / name).write_text(content)
    with pytest.raises(CheckpointError, match=f"{reason} .*: an engine needs the file to "
                                              f"load .*restore the model's own copy"):
        _convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("content, reason", [
    ({"do_sample": True, "top_p": 1.5}, r"top_p must be in \(0, 1\], found a number 1.5 \(a "
                                         r"default of the model's sampling\)"),
    ({"eos_token_id": 2.0}, "eos_token_id must be a token id .*, found a number 2.0"),
    ([1, 2], r"not a JSON object \(found an array \[1, 2\]\)"),
])
def test_a_generation_config_kiln_cannot_read_is_refused_before_anything_is_written(
        src, tmp_path, content, reason):
    """A retest's top_p 1.5 converted and built, then every run was refused as its own
    "SamplingParams.top_p" (even with --top_p given); a float EOS id ended in a TypeError."""
    from tests.models import hf_model_with_tokenizer

    hf_model_with_tokenizer("llama-gqa", src)
    (src / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=f"generation_config.json: {reason}"):
        _convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_tokenizer_larger_than_the_vocabulary_is_warned_about(src, tmp_path, caplog):
    """A retest's SmolLM2 tokenizer beside a 256-token model converted silently; its text was
    then refused at quantize and run. The model's own tokenizer (96 of 128 ids) says nothing."""
    from tokenizers import Tokenizer, models

    from tests.models import hf_model_with_tokenizer

    hf_model_with_tokenizer("llama-gqa", src)
    with caplog.at_level(logging.WARNING, logger="kiln.converters.convert"):
        _convert(src, tmp_path / "own")
    assert "past the model's vocab_size" not in caplog.text
    vocab = {f"t{i}": i for i in range(200)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(src / "tokenizer.json"))
    with caplog.at_level(logging.WARNING, logger="kiln.converters.convert"):
        _convert(src, tmp_path / "other")
    assert f"{src}: its tokenizer has 200 tokens, past the model's vocab_size 128: text that " \
           f"encodes to the last ones will be refused; the tokenizer files may be another " \
           f"model's (copy in the model's own)" in caplog.text


def test_files_with_a_utf8_bom_convert_as_without(tiny_hf, tmp_path):
    """A trial's config.json saved by a Windows editor (UTF-8 with a byte-order mark) had been
    "invalid JSON (Unexpected UTF-8 BOM ...); download the checkpoint again"."""
    src = shutil.copytree(tiny_hf, tmp_path / "src")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json",
                 "tokenizer.json"):
        with_bom(src / name)
    out, plain = _convert(src, tmp_path / "out"), _convert(tiny_hf, tmp_path / "plain")
    assert load_config(out).decoder == load_config(plain).decoder
    assert (out / "rank0.safetensors").read_bytes() == (plain / "rank0.safetensors").read_bytes()


def test_missing_and_unexpected_tensors_are_listed(src, tmp_path):
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(TensorMappingError) as err:
        _convert(src, tmp_path / "out")
    assert "missing ['model.layers.1.mlp.up_proj.weight']" in str(err.value)
    assert "unexpected ['model.layers.0.self_attn.extra.weight']" in str(err.value)


def test_many_missing_tensors_are_listed_up_to_five_and_counted(src, tmp_path):
    """A trial's checkpoint missing 90 tensors had listed all 90 in one line."""
    tensors = load_file(src / "model.safetensors")
    dropped = sorted(n for n in tensors if n.startswith("model.layers.1."))
    save_file({n: t for n, t in tensors.items() if n not in dropped}, src / "model.safetensors")
    with pytest.raises(TensorMappingError) as err:
        _convert(src, tmp_path / "out")
    assert f"missing {dropped[:5]} and {len(dropped) - 5} more; " in \
        str(err.value)


def test_unknown_dtype(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="dtype must be auto or one of"):
        _convert(hf_dir, tmp_path / "out", dtype="float8")


def test_existing_output_is_refused_then_replaced(hf_dir, tmp_path):
    out = tmp_path / "out"
    _convert(hf_dir, out)
    config = (out / "config.json").read_text()
    with pytest.raises(OutputExistsError, match="pass overwrite=True to replace it"):
        _convert(hf_dir, out, dtype="float16")
    assert (out / "config.json").read_text() == config
    _convert(hf_dir, out, overwrite=True, dtype="float16")
    assert '"dtype": "float16"' in (out / "config.json").read_text()
    assert _leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_directory_kiln_did_not_write(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="'keep.txt' and no kiln checkpoint"):
        _convert(hf_dir, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []


def test_failure_mid_write_keeps_the_old_output(hf_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _convert(hf_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr("kiln.converters.convert.copy_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        _convert(hf_dir, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_pickle_checkpoints_need_allow_pickle(hf_dir, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(load_file(hf_dir / "model.safetensors"), src / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pass allow_pickle=True to load"):
        _convert(src, tmp_path / "out")
    out = _convert(src, tmp_path / "out", allow_pickle=True)
    ref = _convert(hf_dir, tmp_path / "ref")
    assert load_file(out / "rank0.safetensors").keys() == load_file(ref / "rank0.safetensors").keys()
    for name, tensor in load_file(ref / "rank0.safetensors").items():
        assert torch.equal(load_file(out / "rank0.safetensors")[name], tensor)


def test_offline_hub_gives_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", "convert_checkpoint", "--model_dir",
         "some-org/some-model", "--output_dir", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0] and "some-org/some-model" in lines[0]
    assert lines[0].startswith("error: --model_dir some-org/some-model: no such local directory, "
                               "and the hub")
    assert not (tmp_path / "out").exists()


def test_read_error_mid_stream_is_raised_and_cleaned_up(hf_dir, tmp_path, monkeypatch):
    from kiln.converters.source import SafetensorsTensor

    calls, original = [], SafetensorsTensor.read

    def flaky(self, rows=None):
        calls.append(rows)
        if len(calls) == 5:
            raise OSError("I/O error reading the source")
        return original(self, rows)

    monkeypatch.setattr(SafetensorsTensor, "read", flaky)
    with pytest.raises(OSError, match="I/O error"):
        _convert(hf_dir, tmp_path / "out", tp_size=2)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# Non-finite weights: refused while streaming, naming the source tensor, its file and row -------

def _poison(src, name, index, value, file="model.safetensors"):
    """Set one element of tensor ``name`` in ``src/file`` (index: a tuple into the tensor)."""
    tensors = load_file(src / file)
    tensors[name][index] = value
    save_file(tensors, src / file, metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_source_is_refused(src, tmp_path, value):
    _poison(src, "model.layers.1.mlp.down_proj.weight", (5, 3), value)
    with pytest.raises(CheckpointError) as err:
        _convert(src, tmp_path / "out", tp_size=2)
    assert str(err.value) == (
        "model.layers.1.mlp.down_proj.weight in model.safetensors holds NaN/Inf values (first "
        "at row 5); the checkpoint is corrupt: re-download it")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_non_finite_names_the_piece_of_a_fused_tensor(src, tmp_path):
    # k_proj is the middle piece of the fused qkv: its own name and its own row are reported.
    _poison(src, "model.layers.0.self_attn.k_proj.weight", (9, 0), float("nan"))
    with pytest.raises(CheckpointError, match=r"^model\.layers\.0\.self_attn\.k_proj\.weight in "
                                              r"model\.safetensors holds NaN/Inf .*row 9\)"):
        _convert(src, tmp_path / "out")


def test_non_finite_vector_reports_the_element(src, tmp_path):
    _poison(src, "model.norm.weight", (17,), float("inf"))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .* \(first at element 17\)"):
        _convert(src, tmp_path / "out")


def test_non_finite_row_counts_across_chunks(src, tmp_path, monkeypatch):
    """Rows are numbered in the whole tensor, not in the chunk that holds them."""
    from kiln.tensorio import iter_row_chunks

    monkeypatch.setattr("kiln.converters.convert.iter_row_chunks",
                        lambda rows, row_bytes: iter_row_chunks(rows, row_bytes, budget=1000))
    _poison(src, "model.embed_tokens.weight", (100, 2), float("nan"))  # rows of 64 float32
    _poison(src, "model.embed_tokens.weight", (120, 2), float("nan"))
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight .*first at row 100\)"):
        _convert(src, tmp_path / "out")


@pytest.mark.parametrize("value, dtype, wider", [
    (1e38, "float16", "bfloat16 or float32"),
    (-70000.0, "float16", "bfloat16 or float32"),
    (3.4e38, "bfloat16", "float32"),  # above bfloat16's largest finite value, 3.39e38
])
def test_overflow_on_cast_is_refused_distinctly(src, tmp_path, value, dtype, wider):
    _poison(src, "model.layers.0.mlp.up_proj.weight", (11, 4), value)
    with pytest.raises(CheckpointError) as err:
        _convert(src, tmp_path / "out", dtype=dtype)
    message = str(err.value)
    assert message.startswith(f"model.layers.0.mlp.up_proj.weight in model.safetensors overflows "
                              f"{dtype}: values beyond")
    assert message.endswith(f"(first at row 11) become inf; convert with --dtype {wider}")
    assert "corrupt" not in message
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    out = _convert(src, tmp_path / "out", dtype="float32")  # the fix the message gives works
    assert load_rank(out, 0)["layers.0.mlp.gate_up.weight"][96 + 11, 4] == value  # [gate | up]


def test_non_finite_in_a_transformed_tensor(tmp_path):
    """Falcon's regrouped query_key_value is transformed whole; the source is still named."""
    src = hf_model("falcon-7b-mqa", tmp_path / "falcon")
    _poison(src, "transformer.h.1.self_attention.query_key_value.weight", (70, 1), float("nan"))
    with pytest.raises(CheckpointError, match=r"^transformer\.h\.1\.self_attention\.query_key_value"
                                              r"\.weight in model\.safetensors holds NaN/Inf values "
                                              r"\(first at row 70\)"):
        _convert(src, tmp_path / "out")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_non_finite_through_the_cli_is_one_line(src, tmp_path):
    from click.testing import CliRunner

    from kiln.cli.main import main

    _poison(src, "lm_head.weight", (3, 3), float("nan"))
    result = CliRunner().invoke(main, ["-q", "convert_checkpoint", "--model_dir", str(src),
                                       "--output_dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output == ("error: lm_head.weight in model.safetensors holds NaN/Inf values "
                             "(first at row 3); the checkpoint is corrupt: re-download it\n")
    assert not (tmp_path / "out").exists()


# config.json without architectures: model_type decides, as in transformers' AutoModel -------

@pytest.mark.parametrize("variant, architecture", [
    ("llama-gqa", "LlamaForCausalLM"), ("mistral-window", "MistralForCausalLM"),
    ("mpt", "MptForCausalLM"), ("falcon-7b-mqa", "FalconForCausalLM")])
def test_model_type_without_architectures(tmp_path, variant, architecture):
    from transformers import AutoModelForCausalLM

    src = hf_model(variant, tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    assert config["architectures"] == [architecture]
    reference = _convert(src, tmp_path / "with")
    del config["architectures"]
    (src / "config.json").write_text(json.dumps(config))
    assert type(AutoModelForCausalLM.from_pretrained(src)).__name__ == architecture  # HF's rule
    out = _convert(src, tmp_path / "without")
    assert load_config(out).decoder == load_config(reference).decoder
    assert load_config(out).source["architecture"] == architecture
    got, want = load_file(out / "rank0.safetensors"), load_file(reference / "rank0.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())


@pytest.mark.parametrize("change, match", [
    ({"architectures": None, "model_type": "gpt2"}, r"architecture <none> \(model_type gpt2\) "
                                                    r"is not supported.*model_type is falcon, "
                                                    r"llama, mistral, mpt\)"),
    ({"architectures": [], "model_type": None}, r"<none> \(model_type <none>\)"),
    # A listed architecture is what the checkpoint is: model_type does not override it.
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
])
def test_model_type_fallback_refusals(src, tmp_path, change, match):
    config = json.loads((src / "config.json").read_text())
    config.update(change)
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(UnsupportedArchitectureError, match=match):
        _convert(src, tmp_path / "out")


def test_finite_weights_whose_sum_overflows_convert(src, tmp_path):
    """The check's fast sum overflows float16 here (6144 x 1000); min/max clears the tensor."""
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"].fill_(1000.0)  # [64, 96]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = _convert(src, tmp_path / "out", dtype="float16")
    down = load_rank(out, 0)["layers.0.mlp.down.weight"]
    assert down.dtype == torch.float16 and bool((down == 1000.0).all())


def test_options_have_one_definition(hf_dir, tmp_path):
    """convert_checkpoint's keywords and kiln convert_checkpoint's flags are ConvertOptions'."""
    import dataclasses

    from kiln.cli.main import convert_checkpoint as command
    from kiln.converters.options import ConvertOptions

    defaults = {f.name: f.default for f in dataclasses.fields(ConvertOptions)}
    given = {p.name: p.default for p in command.params
             if p.name in defaults and isinstance(p.default, (str, int))}
    assert {"dtype", "tp_size", "pp_size"} <= set(given)
    assert given == {name: defaults[name] for name in given}
    with pytest.raises(ConfigError, match=r"unknown options \['tp'\]"):
        _convert(hf_dir, tmp_path / "out", tp=2)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_signal_inside_the_read_queue_does_not_hang_the_cleanup(monkeypatch):
    """A trial's SIGHUP during a conversion hung it (1 in ~20 signals): the signal's exception
    landed inside ``Queue.get`` while the reading loop held the queue's lock, which was never
    released, and the cleanup's drain of the queue waited for it forever. Simulated: a get
    that leaves the lock held and raises. The interrupt must come out within about
    PREFETCH_JOIN_S, the reader thread (stuck on the lock) left behind as a daemon."""
    import queue
    import threading
    import time

    from kiln.converters import convert

    class Interrupted(queue.Queue):
        def get(self, block=True, timeout=None):
            super().get(block, timeout)
            self.mutex.acquire()  # the signal's exception after the lock, before the `with`
            raise KeyboardInterrupt

    monkeypatch.setattr(convert, "Queue", Interrupted)
    outcome = []

    def consume() -> None:
        started = time.perf_counter()
        try:
            list(convert._prefetch(iter(range(100)), depth=2))
        except KeyboardInterrupt:
            outcome.append(time.perf_counter() - started)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the cleanup hung on the queue's lock"
    assert outcome and outcome[0] < convert.PREFETCH_JOIN_S + 1.0


def test_an_interrupted_conversion_stops_hashing_its_sources(tmp_path):
    """The provenance hashes run beside the conversion; an interrupt had waited for every
    source file to be hashed (tens of seconds for an 8B model) before the command ended."""
    import time
    from threading import Event

    from kiln.converters import convert
    from kiln.hashing import HashingStopped

    big = tmp_path / "model.safetensors"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # a sparse 1 GiB file: hashing it whole takes seconds
    stop = Event()
    stop.set()
    started = time.perf_counter()
    with pytest.raises(HashingStopped):
        convert._hash_files([big], stop)
    assert time.perf_counter() - started < 0.5  # one 16 MiB block, not the gigabyte


@pytest.mark.parametrize("stored", ["a different head", "a copy of the embedding"])
def test_a_tied_config_with_a_stored_head_converts_as_transformers_loads_it(tmp_path, caplog,
                                                                            stored):
    """tie_word_embeddings true, and the file holds lm_head.weight too: transformers unties
    them when they differ and runs the stored head (a trial's engine left HF's tokens at the
    first token, kiln having dropped it), and ties them when it is a copy."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from kiln.reference import ReferenceDecoder
    from tests.helpers import hf_step_logits, max_abs_diff, ref_step_logits, save_hf_model
    from tests.models import LLAMA_BASE, PROMPT

    src = save_hf_model(LlamaForCausalLM, LlamaConfig(**LLAMA_BASE, tie_word_embeddings=True),
                        tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embed + torch.randn_like(embed) if stored == "a different head" \
        else embed.clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="kiln.converters.convert"):
        out = kiln.convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    untied = stored == "a different head"
    assert load_config(out).decoder.tie_word_embeddings is not untied
    warned = [r.getMessage() for r in caplog.records if "tie_word_embeddings" in r.getMessage()]
    assert len(warned) == untied and all("lm_head.weight differs" in w for w in warned)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want, tokens = hf_step_logits(model, PROMPT, steps=8)
    got = ref_step_logits(ReferenceDecoder.from_checkpoint(out), PROMPT, tokens)
    assert max_abs_diff(got, want) <= 1e-4


@pytest.mark.parametrize("key,value,what", [
    ("num_attention_heads", "4", "a positive integer"),
    ("hidden_size", 64.0, "a positive integer"), ("num_hidden_layers", True, "a positive integer"),
    ("rms_norm_eps", "1e-5", "a positive number"), ("num_attention_heads", 0, "a positive integer"),
    ("num_hidden_layers", -1, "a positive integer"), ("rms_norm_eps", -1e-5, "a positive number"),
    ("rms_norm_eps", float("inf"), "a positive number"),
    ("sliding_window", 16.5, "a positive integer"),
    ("tie_word_embeddings", "false", "true or false"), ("attention_bias", [0], "true or false"),
])
def test_a_config_value_of_the_wrong_type_is_one_line(src, tmp_path, key, value, what):
    """A string "4" for num_attention_heads had been a TypeError traceback, exit 1, and 0 heads
    a ZeroDivisionError; -1 layers had named kiln's key (num_layers), not config.json's; and
    a trial's "config.json: ..." had not said which config.json."""
    from click.testing import CliRunner

    from kiln.cli.main import main

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, key: value}))
    result = CliRunner().invoke(main, ["convert_checkpoint", "--model_dir", str(src),
                                       "--output_dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == \
        f"error: {src / 'config.json'}: {key} must be {what}, found {value!r}; fix it in " \
        f"config.json"
    assert not (tmp_path / "out").exists()


def test_weights_of_another_shape_name_their_file(src, tmp_path):
    """A trial's had been "['model.embed_tokens.weight']: give embed.weight shape [49152, 576],
    the config implies [49152, 640]", without the file."""
    config = json.loads((src / "config.json").read_text())
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    (src / "config.json").write_text(json.dumps({**config, "vocab_size": vocab + 1}))
    with pytest.raises(TensorMappingError) as e:
        kiln.convert_checkpoint(src, tmp_path / "out", progress=False)
    assert str(e.value) == (
        f"{src / 'model.safetensors'}: model.embed_tokens.weight has shape [{vocab}, {hidden}], "
        f"the config implies [{vocab + 1}, {hidden}]; the weights and config.json are of "
        f"different models (or one of them was edited)")


def test_provenance_paths_are_absolute(hf_dir, tmp_path, monkeypatch):
    """A relative --model_dir had been stored as typed: meaningless from another directory."""
    shutil.copytree(hf_dir, tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    kiln.convert_checkpoint("sub/../hf", "ckpt", progress=False)  # stored without the ".."
    assert load_config(tmp_path / "ckpt").source["model_dir"] == str(tmp_path / "hf")
    kiln.build("./ckpt", "engine", backend="onnx", max_batch_size=1, max_seq_len=16)
    source = json.loads((tmp_path / "engine" / "config.json").read_text())["source"]
    assert source["checkpoint_dir"] == str(tmp_path / "ckpt")
    assert source["model_dir"] == str(tmp_path / "hf")


@pytest.mark.parametrize("key,value", [("rope_scaling", "4"), ("rope_parameters", [4]),
                                       ("architectures", True), ("sliding_window", "4")])
def test_a_nested_setting_of_the_wrong_type_is_one_line(src, tmp_path, key, value):
    """Settings the converters read without a type check (a trial: a string rope_scaling was
    'TypeError: str object is not a mapping', exit 1) are one line, exit 2."""
    from click.testing import CliRunner

    from kiln.cli.main import main

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, key: value}))
    result = CliRunner().invoke(main, ["convert_checkpoint", "--model_dir", str(src),
                                       "--output_dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    line, = result.output.strip().splitlines()
    assert line.startswith(f"error: {src / 'config.json'}: "), line
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"rms_norm_eps": None}, "rms_norm_eps must be a positive number, found null"),
    ({"rope_parameters": {"rope_theta": None}},
     "rope_parameters.rope_theta must be a positive number, found null"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8,
                          "low_freq_factor": "x", "high_freq_factor": 4,
                          "original_max_position_embeddings": 32}},
     "rope_parameters.low_freq_factor must be a positive number, found 'x'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": "two"}},
     "rope_parameters.factor must be a positive number, found 'two'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5}},
     "rope_parameters of rope type 'linear' has no factor; add it to rope_parameters"),
    # a trial: this had named rope_scaling.low_freq_factor "(kiln's names for the settings)"
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "high_freq_factor": 4,
                       "original_max_position_embeddings": 32}},
     "rope_scaling of rope type 'llama3' has no low_freq_factor; add it to rope_scaling "
     "(Llama 3.1's is 1.0)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                       "high_freq_factor": 4}},
     "rope_scaling of rope type 'llama3' has no original_max_position_embeddings"),
])
def test_rope_and_norm_settings_are_checked_at_conversion(src, tmp_path, change, message):
    """Each had converted (null: with kiln's default, where HF refuses the config; a string
    factor then failed the build with a traceback)."""
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError) as e:
        kiln.convert_checkpoint(src, tmp_path / "out", progress=False)
    assert message in str(e.value) and str(e.value).startswith(f"{src / 'config.json'}: ")
    assert not (tmp_path / "out").exists()


def test_architectures_given_as_a_string_is_one_line(src, tmp_path):
    """It had been read letter by letter: 'architecture L, l, a, m, a, ... is not supported'."""
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": "LlamaForCausalLM"}))
    with pytest.raises(ConfigError, match=r"config.json: architectures must be a list of class "
                                          r"names, found 'LlamaForCausalLM'; write it as "
                                          r"\[\"LlamaForCausalLM\"\]"):
        kiln.convert_checkpoint(src, tmp_path / "out", progress=False)


def test_a_converted_setting_out_of_range_names_config_json(src, tmp_path):
    """A range that only kiln's config checks (KV heads that do not divide the heads) had been
    one line without the file it came from."""
    from click.testing import CliRunner

    from kiln.cli.main import main

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    result = CliRunner().invoke(main, ["convert_checkpoint", "--model_dir", str(src),
                                       "--output_dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: {src / 'config.json'}: num_kv_heads must divide num_heads "
        f"({config['num_attention_heads']}), found 3 (kiln's names for the settings); fix it "
        f"in config.json")


def test_a_generation_config_kiln_does_not_follow_is_said_at_convert(tmp_path, caplog):
    """Retest 48c: only a run said it, naming the engine's copy, which an edit then made
    ``kiln verify`` fail; convert names the Hugging Face file to edit, and the engine's copy
    is named as such at load."""
    import json
    import logging

    from kiln.runtime import LLM
    from tests.models import hf_model_with_tokenizer

    hf = hf_model_with_tokenizer("llama-gqa", tmp_path / "hf")
    config = hf / "generation_config.json"
    fields = json.loads(config.read_text()) if config.exists() else {}
    config.write_text(json.dumps({**fields, "no_repeat_ngram_size": 3, "eos_token_id": [1, 1000]}))
    with caplog.at_level(logging.WARNING), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr("kiln.runtime.loader._WARNED", set())
        ckpt = _convert(hf, tmp_path / "ckpt")
        said = [r.getMessage() for r in caplog.records]
        assert said == [
            f"{config.absolute()} sets no_repeat_ngram_size=3, which kiln's sampling does not "
            f"apply (HF generate does): of its sampling fields kiln applies do_sample, "
            f"temperature, top_k, top_p, min_p and repetition_penalty",
            f"{config.absolute()} sets eos_token_id 1000, outside the model's vocabulary [0, "
            f"128): generation never stops on it; correct or remove it"]
        kiln.build(ckpt, tmp_path / "engine", max_batch_size=1, max_seq_len=32)
        caplog.clear()
        with LLM(tmp_path / "engine"):
            pass
    assert [r.getMessage() for r in caplog.records][-1] == (
        f"{tmp_path / 'engine' / 'generation_config.json'} sets eos_token_id 1000, outside the "
        f"model's vocabulary [0, 128): generation never stops on it; correct it in the Hugging "
        f"Face checkpoint's file, then convert and build again")
