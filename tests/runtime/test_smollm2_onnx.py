"""The real model end to end: SmolLM2-135M-Instruct converted, built for the onnx backend (CPU,
float32) and run through the LLM API and ``kiln run``; greedy output matches HF transformers."""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kiln
from kiln.runtime import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small"]


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name: str):
    """A directory shared by the xdist workers of this run, built once under a file lock."""
    root = tmp_path_factory.getbasetemp().parent  # common to all workers of one run
    with open(root / f"{name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield root / name
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def engine(smollm2_dir, tmp_path_factory) -> Path:
    from kiln.builder import build

    with shared_dir(tmp_path_factory, "smollm2-onnx") as root:
        if not (root / "engine" / "config.json").is_file():
            checkpoint = kiln.convert_checkpoint(smollm2_dir, root / "ckpt", overwrite=True,
                                                 progress=False)
            build(checkpoint, root / "engine", backend="onnx", max_batch_size=4,
                  max_seq_len=128, max_input_len=64, max_num_tokens=96, overwrite=True)
        return root / "engine"


@pytest.fixture(scope="module")
def llm(engine) -> LLM:
    return LLM(engine)


@pytest.fixture(scope="module")
def hf_greedy(smollm2_dir, tmp_path_factory):
    with shared_dir(tmp_path_factory, "smollm2-hf-greedy") as root:
        path = root.with_suffix(".json")
        if not path.is_file():
            path.write_text(json.dumps(_hf_greedy(smollm2_dir)))
        return [tuple(t) for t in json.loads(path.read_text())]


def _hf_greedy(smollm2_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=32, do_sample=False)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


GREEDY32 = SamplingParams(temperature=0, max_tokens=32)


def test_greedy_matches_transformers_one_at_a_time(llm, hf_greedy):
    assert [llm.generate(p, GREEDY32)[0].token_ids for p in PROMPTS] == hf_greedy


def test_greedy_matches_transformers_batched(llm, hf_greedy):
    results = llm.generate(PROMPTS, GREEDY32)
    assert [r.token_ids for r in results] == hf_greedy
    assert all(r.text == llm.tokenizer.decode(list(r.token_ids)) for r in results)


def test_chat_answers_paris(llm):
    (reply,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in reply.text and reply.finish_reason == "stop"


def test_kiln_run_chat_answers_paris(engine):
    from kiln.cli.main import main
    from kiln.cli.run import run

    if "run" not in main.commands:
        main.add_command(run)
    r = CliRunner().invoke(main, ["run", "--engine_dir", str(engine), "--chat", "--streaming",
                                  "--input_text", "What is the capital of France?"])
    assert r.exit_code == 0, r.output
    assert "Paris" in r.output.splitlines()[0] and "tokens/s" in r.output
