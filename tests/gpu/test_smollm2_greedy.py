"""Greedy tokens of the torch backend equal HF's and the oracle's, alone and in flight.

SmolLM2-135M's configuration (30 layers, 9 heads / 3 KV heads, tied embeddings) with random
float32 weights made on the GPU. 32 prompts of different lengths, 32 new tokens each:
run one at a time, then all 32 through the runtime's EngineCore at once, half of them joining
mid-flight, with a token budget that forces chunked prefills beside decodes. Every request's
tokens must equal HF ``generate()`` (greedy, float32); four are also checked against the oracle.
"""

from __future__ import annotations

import pytest
import torch

from kiln.builder.api import build
from kiln.engine import read_manifest
from kiln.reference import ReferenceDecoder
from kiln.runtime.core import EngineCore
from kiln.runtime.loader import ExecutorOptions
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.torch_backend.executor import TorchExecutorOptions
from kiln.runtime.torch_executor import load_executor
from tests.models import kiln_checkpoint

pytestmark = pytest.mark.gpu
NEW = 32


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).float().eval()
    root = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(root / "hf", safe_serialization=True)
    ckpt = kiln_checkpoint(root / "hf", root / "ckpt")
    engine = root / "engine"
    build(ckpt, engine, backend="torch", max_batch_size=32, max_input_len=64, max_seq_len=128,
          max_num_tokens=96, dtype="float32")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 49152, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 60, (32,), generator=g)]
    with torch.no_grad():
        want = []
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                                 eos_token_id=None)
            want.append(out[0, len(p):].tolist())
    return ckpt, engine, prompts, want


def _run(core: EngineCore, prompts, late: int = 0) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    first = [core.add_request(p, params) for p in prompts[:len(prompts) - late]]
    for _ in range(3):
        core.step()
    requests = first + [core.add_request(p, params) for p in prompts[len(prompts) - late:]]
    steps = 0
    while core.has_work():
        core.step()
        steps += 1
        assert steps < 10_000, "the engine did not finish"
    return [r.output_ids for r in requests]


def test_greedy_alone_and_in_flight_match_hf(smollm2):
    ckpt, engine, prompts, want = smollm2
    # 32 slots x 128 tokens in 64-token blocks, + scratch: every request fits at once
    ex = load_executor(engine, read_manifest(engine), ExecutorOptions(device="cuda"),
                       TorchExecutorOptions(kv_cache_blocks=65))
    core = EngineCore(ex)
    alone = [_run(core, [p])[0] for p in prompts]
    assert alone == want
    batched = _run(EngineCore(ex), prompts, late=16)
    assert batched == want
    assert ex.cache.allocator.num_free == ex.cache.allocator.num_blocks - 1
    ex.close()


def test_greedy_matches_the_oracle(smollm2):
    ckpt, _, prompts, want = smollm2
    ref = ReferenceDecoder.from_checkpoint(ckpt)
    for p, w in list(zip(prompts, want, strict=True))[:4]:
        assert ref.generate(p, NEW) == w
