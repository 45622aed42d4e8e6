"""Random weights (kiln/engine/random_weights.py) against what a build of the same model,
format and layout writes: the same tensors per rank (names, shapes, dtypes, transposed), and
engines that run: tp 2 and pp 2 of a seed give tp 1's logits (one model in every layout),
another seed gives others, every value finite."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.builder.api import build
from kiln.config import Mapping
from kiln.engine import BuildLimits, read_manifest
from kiln.engine.random_weights import random_engine_manifest, random_rank_weights
from kiln.errors import ConfigError
from kiln.quantization.config import QuantConfig
from kiln.roles import Role
from kiln.runtime.loader import ExecutorOptions
from kiln.runtime.params import SamplingParams
from kiln.runtime.torch_backend.executor import TorchExecutorOptions
from kiln.runtime.torch_executor import load_executor, read_rank
from kiln.sharding import shard_ranges
from tests.builder.quantized import quantize_checkpoint
from tests.models import hf_model, kiln_checkpoint

LIMITS = dict(max_batch_size=2, max_input_len=16, max_seq_len=24, max_num_tokens=16)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("random-weights")
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = hf_model(name, root / name / "hf")
        return root, made[name]
    return get


# (variant, qformat, KV-cache dtype, tp, pp): every format at tp 1 and 2 (the quantizing helper
# makes tp layouts only), float engines at pp 2 and tp 2 x pp 2 too; int4 at tp 2 on MPT (its
# MLP's per-rank input features, 128, hold whole groups of 32; llama-gqa's 48 do not)
CASES = [("llama-gqa", q, kv, tp, 1) for q, kv in [("fp8", "fp8"), ("int8_sq", "int8")]
         for tp in (1, 2)]
CASES += [("llama-gqa", None, None, tp, pp) for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]]
CASES += [("llama-gqa", "int4_wo", None, 1, 1), ("mpt", "int4_wo", None, 2, 1),
          ("falcon-7b-mqa", None, None, 2, 1), ("llama-mqa-tied", None, None, 2, 1)]


@pytest.mark.parametrize("name,qformat,kv,tp,pp", CASES, ids=str)
def test_each_rank_holds_what_a_build_writes(sources, name, qformat, kv, tp, pp):
    root, hf = sources(name)
    where = root / f"{name}-{qformat}-tp{tp}-pp{pp}"
    ckpt = kiln_checkpoint(hf, where / "ckpt", tp=1 if qformat else tp, pp=pp)
    if qformat:
        ckpt = quantize_checkpoint(ckpt, where / "q", qformat, tp=tp, kv_cache_dtype=kv)
    build(ckpt, where / "engine", backend="torch", dtype="bfloat16", **LIMITS)
    manifest = read_manifest(where / "engine")
    for rank in range(tp * pp):
        built, built_transposed = read_rank(where / "engine", manifest, rank, CPU)
        made, made_transposed = random_rank_weights(manifest, rank, CPU, seed=3)
        assert made.keys() == built.keys(), rank
        for tensor, t in built.items():
            assert (made[tensor].shape, made[tensor].dtype) == (t.shape, t.dtype), (rank, tensor)
            assert made[tensor].is_contiguous(), tensor
            if made[tensor].is_floating_point():
                assert torch.isfinite(made[tensor].float()).all(), tensor
        assert made_transposed == built_transposed, rank


def test_every_layout_of_a_seed_is_one_model(sources):
    """float32 engines of random weights, seed 5: tp 2 and pp 2 give tp 1's greedy tokens
    and logprobs (1e-4), seed 6 other ones; the padded vocabulary rows are zero, as built."""
    root, hf = sources("llama-gqa")
    manifests = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        build(kiln_checkpoint(hf, root / f"f-{tp}-{pp}" / "ckpt", tp=tp, pp=pp),
              root / f"f-{tp}-{pp}" / "engine", backend="torch", dtype="float32", **LIMITS)
        manifests[tp, pp] = read_manifest(root / f"f-{tp}-{pp}" / "engine")
    options = TorchExecutorOptions(page_size=8, collective_timeout_s=60)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7, 1, 8]]

    def run(layout, seed):
        from kiln.runtime import LLM

        built = manifests[layout]
        manifest = random_engine_manifest(built.decoder, built.mapping, built.dtype,
                                          built.limits)
        executor = load_executor(root / "random", manifest, ExecutorOptions(device="cpu"),
                                 options, random_seed=seed)
        with LLM.from_executor(executor) as llm:
            results = llm.generate(prompts, params)
        return ([r.token_ids for r in results],
                torch.tensor([[lp.logprob for lp in r.logprobs] for r in results]))

    tokens, logprobs = run((1, 1), 5)
    assert torch.isfinite(logprobs).all()
    for layout in [(2, 1), (1, 2)]:
        got_tokens, got_logprobs = run(layout, 5)
        assert got_tokens == tokens, layout
        assert (got_logprobs - logprobs).abs().max() <= 1e-4, layout
    assert run((1, 1), 6)[0] != tokens


@pytest.mark.parametrize("qformat,kv,tp", [("fp8", "fp8", 1), ("int8_sq", "int8", 2),
                                           ("int4_wo", None, 1)])
def test_quantized_engines_of_random_weights_run(sources, qformat, kv, tp):
    """A quantized engine's random weights (quantized by kiln's formula, static scales sized
    for RANDOM_AMAX) give finite logprobs on every rank's path."""
    from kiln.runtime import LLM

    root, hf = sources("llama-gqa")
    where = root / f"run-{qformat}-tp{tp}"
    ckpt = quantize_checkpoint(kiln_checkpoint(hf, where / "ckpt"), where / "q", qformat,
                               tp=tp, kv_cache_dtype=kv)
    build(ckpt, where / "engine", backend="torch", dtype="float32", **LIMITS)
    built = read_manifest(where / "engine")
    manifest = random_engine_manifest(built.decoder, built.mapping, built.dtype, built.limits,
                                      built.quantization)
    executor = load_executor(where / "random", manifest, ExecutorOptions(device="cpu"),
                             TorchExecutorOptions(page_size=8, collective_timeout_s=60),
                             random_seed=1)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0)
    with LLM.from_executor(executor) as llm:
        (result,) = llm.generate([[5, 6, 7, 8]], params)
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert all(math.isfinite(lp.logprob) for lp in result.logprobs)


def small_llama(**overrides):
    from kiln.config import DecoderConfig

    return DecoderConfig.from_dict({
        "architecture": "LlamaForCausalLM", "vocab_size": 1001, "hidden_size": 64,
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "max_position_embeddings": 64, "norm_eps": 1e-5,
        **overrides})


SMALL_LIMITS = BuildLimits(max_batch_size=2, max_input_len=8, max_seq_len=16, max_num_tokens=8)


def test_shards_own_their_memory_padding_is_zero_and_tied_heads_are_the_embedding():
    """No returned tensor keeps a whole tensor's storage alive (a 70B rank would not fit);
    vocabulary rows past the model's are zero, as a build pads them; a tied lm_head is the
    embedding, as a build writes it."""
    config = small_llama()
    for quant in (None, QuantConfig("int8_wo", quantize_lm_head=True)):
        manifest = random_engine_manifest(config, Mapping(tp_size=2), "float32", SMALL_LIMITS,
                                          quant)
        for rank in (0, 1):
            tensors, _ = random_rank_weights(manifest, rank, CPU)
            for name, t in tensors.items():
                assert t.untyped_storage().nbytes() == t.nbytes, (quant, rank, name)
            head = tensors[Role.LM_HEAD.name()]
            start = 0
            for lo, hi in shard_ranges(Role.LM_HEAD, config, manifest.mapping, rank, 1001):
                pad = max(0, hi - max(lo, 1001))
                if pad:
                    assert not head[start + hi - lo - pad:start + hi - lo].any(), (quant, rank)
                start += hi - lo
            assert head.shape[0] == start and head.float().abs().sum() > 0
        assert any(hi > 1001 for r in (0, 1) for _, hi in
                   shard_ranges(Role.LM_HEAD, config, manifest.mapping, r, 1001))
    tied = random_engine_manifest(small_llama(tie_word_embeddings=True), Mapping(), "float32",
                                  SMALL_LIMITS)
    tensors, _ = random_rank_weights(tied, 0, CPU)
    assert torch.equal(tensors[Role.LM_HEAD.name()], tensors[Role.EMBED.name()])


def test_a_group_size_the_ranks_cannot_split_is_refused_before_any_rank_loads():
    with pytest.raises(ConfigError, match="group_size=32 does not divide the 48"):
        random_engine_manifest(small_llama(intermediate_size=96), Mapping(tp_size=2),
                               "bfloat16", SMALL_LIMITS, QuantConfig("int4_wo", group_size=32))
