"""The torch backend's decode graphs for short contexts (kiln.runtime.torch_backend.cuda_graphs):
small batches replay an unsplit-attention graph while the longest context fits ``short_ctx`` and
the split graph beyond it; both give the eager path's logits (float32, relative L2 <= 1e-4) on
contexts that cross the threshold during the run."""

from __future__ import annotations

import pytest
import torch

from kiln.builder.api import build
from kiln.engine import read_manifest
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.loader import ExecutorOptions
from kiln.runtime.torch_backend.cuda_graphs import SHORT_CTX
from kiln.runtime.torch_backend.executor import TorchExecutorOptions
from kiln.runtime.torch_executor import load_executor
from tests.models import LLAMA_BASE, hf_model, kiln_checkpoint

pytestmark = pytest.mark.gpu
STEPS = 12


class _Replays:
    """Counts a captured graph's replays (and replays it)."""

    def __init__(self, graph):
        self.graph, self.count = graph, 0

    def replay(self):
        self.count += 1
        self.graph.replay()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    root = tmp_path_factory.mktemp("graphs")
    ckpt = kiln_checkpoint(hf_model("llama-gqa", root / "hf"), root / "ckpt")
    build(ckpt, root / "engine", backend="torch", max_batch_size=4, max_seq_len=512,
          max_input_len=300, max_num_tokens=512, dtype="float32", allow_long_context=True)
    return root / "engine"


def run(engine, graphs: bool, prompts: list[list[int]]):
    ex = load_executor(engine, read_manifest(engine), ExecutorOptions(device="cuda"),
                       TorchExecutorOptions(kv_cache_blocks=64, cuda_graphs=graphs))
    spies = {}
    if graphs:
        assert sorted(ex.graphs.short) == [1, 2, 4], ex.graphs.short
        for which, g in (("short", ex.graphs.short[4]), ("long", ex.graphs.graphs[4])):
            spies[which] = g.graph = _Replays(g.graph)
    seqs = list(range(len(prompts)))
    for s, p in zip(seqs, prompts, strict=True):
        assert ex.reserve(s, len(p) + STEPS)
    logits = [ex.step([SequenceChunk(s, p, 0) for s, p in zip(seqs, prompts, strict=True)])
              .clone()]
    for i in range(STEPS):
        tokens = logits[-1].argmax(-1).tolist()
        logits.append(ex.step([SequenceChunk(s, [t], len(p) + i) for s, t, p
                               in zip(seqs, tokens, prompts, strict=True)]).clone())
    ex.close()
    return logits, {k: v.count for k, v in spies.items()}


def test_short_and_long_decode_graphs_give_the_eager_logits(engine):
    gen = torch.Generator().manual_seed(0)
    vocab = LLAMA_BASE["vocab_size"]
    # the longest context reaches SHORT_CTX after 6 steps: 6 short replays, then 6 long ones
    lens = [SHORT_CTX - 6, 40, 130]
    prompts = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lens]
    eager, _ = run(engine, False, prompts)
    graphed, replays = run(engine, True, prompts)
    assert replays == {"short": 6, "long": 6}, replays
    for a, b in zip(graphed, eager, strict=True):
        assert torch.isfinite(a).all()
        assert float((a - b).norm() / b.norm()) <= 1e-4
