"""Shared test helpers: tiny random HF models and step-by-step logits from HF and the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.reference import KVCache, ReferenceDecoder


def save_hf_model(model_cls, config, path: Path, seed: int = 0) -> Path:
    """Instantiate a tiny random HF model in float32 and save it (safetensors) to ``path``."""
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # HF zero-inits biases and sets norms to 1: randomize them to test them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def hf_step_logits(model, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill logits [S, V] then one [V] per greedy decode step, and the tokens fed."""
    out = model(torch.tensor([prompt]), use_cache=True)
    logits, past = [out.logits[0].float()], out.past_key_values
    tokens = []
    for _ in range(steps):
        token = int(logits[-1][-1].argmax()) if logits[-1].dim() == 2 else int(logits[-1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0, -1].float())
    return logits, tokens


@torch.no_grad()
def ref_step_logits(ref: ReferenceDecoder, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The oracle's logits for the same prefill and teacher-forced decode tokens."""
    cache = KVCache()
    logits = [ref.forward(torch.tensor([prompt]), cache)[0]]
    for token in tokens:
        logits.append(ref.forward(torch.tensor([[token]]), cache)[0, -1])
    return logits


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diffs = [float((x - y).abs().max()) for x, y in zip(a, b, strict=True)]
    for x in a + b:
        assert torch.isfinite(x).all(), "NaN/inf in logits"
    return max(diffs)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models: threads only contend (tests run in parallel workers). A conftest imports
    this to apply it to its directory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flip_bits(path: Path, at: int, mask: int) -> None:
    """XOR byte ``at`` of the file (negative: from its end) with ``mask``: a file damaged in
    place, its size and header unchanged."""
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))



def with_bom(path: Path) -> Path:
    """Prefix ``path`` with the UTF-8 byte-order mark, as Windows editors save text files."""
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    return path


def raised(call, *args) -> BaseException | None:
    """What ``call(*args)`` raised, or None (for a call made in another thread)."""
    try:
        call(*args)
    except BaseException as e:  # noqa: BLE001 - the test reads it
        return e
    return None
