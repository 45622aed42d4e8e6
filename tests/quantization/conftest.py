"""Shared fixtures: tiny kiln checkpoints (random weights) with a character tokenizer whose
ids fit their 128-token vocabulary, and calibration / evaluation text files; made once per
session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import one_torch_thread, save_hf_model  # noqa: F401 (fixture)
from tests.models import LLAMA_BASE, hf_model, kiln_checkpoint

# Printable ASCII and a newline: ids 0..95, under the tiny models' vocab of 128.
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
WORDS = ("the model reads a layer of weights and writes its scales while calibration keeps "
         "activations small enough for eight bit integers on every channel").split()


def write_char_tokenizer(directory: Path) -> None:
    """tokenizer.json: one token per character (BPE without merges), ``<unk>`` for others."""
    vocab = {ch: i for i, ch in enumerate(CHARS)}
    vocab["<unk>"] = len(vocab)
    Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(
        str(directory / "tokenizer.json"))


def write_text(path: Path, paragraphs: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30))
                                for _ in range(paragraphs)) + "\n")
    return path


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("texts")
    return {"calib": write_text(root / "calib.txt", 40, 0),
            "eval": write_text(root / "eval.txt", 10, 1)}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(variant, tp=1, pp=1) -> a kiln checkpoint with a tokenizer (cached).
    ``variant`` is a tests.models variant or "llama-i128" (intermediate 128: int4 at tp 2)."""
    made: dict[tuple, Path] = {}

    def get(name: str, tp: int = 1, pp: int = 1) -> Path:
        if (name,) not in made:
            hf = tmp_path_factory.mktemp(f"hf-{name}")
            if name == "llama-i128":
                config = LlamaConfig(**{**LLAMA_BASE, "intermediate_size": 128})
                made[(name,)] = save_hf_model(LlamaForCausalLM, config, hf)
            else:
                made[(name,)] = hf_model(name, hf)
        if (name, tp, pp) not in made:
            out = kiln_checkpoint(made[(name,)], tmp_path_factory.mktemp(f"ckpt-{name}") / "c",
                                  tp=tp, pp=pp)
            write_char_tokenizer(out)
            made[(name, tp, pp)] = out
        return made[(name, tp, pp)]
    return get
