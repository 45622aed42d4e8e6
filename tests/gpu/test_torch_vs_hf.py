"""The torch backend on a GPU (Triton kernels, CUDA graphs) against HF transformers.

Every architecture variant: an engine built with ``kiln build --backend torch`` runs a prefill
and 8 greedy decode steps (decode steps replay CUDA graphs); its logits are compared with HF's
on the same weights. Tolerances: float32 ``||kiln - hf|| / ||hf|| <= 1e-3``; bfloat16 against
HF in float32 (the truth), no worse than twice HF's own bfloat16 error, or 1e-2 if that is
smaller.
"""

from __future__ import annotations

import pytest
import torch

from kiln.builder.api import build
from kiln.engine import read_manifest
from kiln.plugins.attention import cudnn
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.loader import ExecutorOptions
from kiln.runtime.torch_backend.executor import TorchExecutorOptions
from kiln.runtime.torch_executor import load_executor
from tests.models import PROMPT, VARIANTS, hf_model, kiln_checkpoint, model_class

pytestmark = pytest.mark.gpu
STEPS = 8


def _need_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    _need_gpu()
    name = request.param
    root = tmp_path_factory.mktemp(name)
    src = hf_model(name, root / "hf")
    return name, src, kiln_checkpoint(src, root / "ckpt")


@torch.no_grad()
def hf_logits(model, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """HF's last-position logits after the prompt, then after each teacher-forced token."""
    out = model(torch.tensor([prompt], device="cuda"), use_cache=True)
    logits, past = [out.logits[0, -1].float()], out.past_key_values
    for token in tokens:
        out = model(torch.tensor([[token]], device="cuda"), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0, -1].float())
    return logits


def kiln_logits(engine_dir, prompt: list[int], steps: int, on_load=None,
                **options) -> tuple[list[torch.Tensor], list[int]]:
    # An explicit cache size: parallel test workers share the GPU, so sizing from free memory
    # would race (benchmarks/gpu.py covers the free-memory sizing).
    ex = load_executor(engine_dir, read_manifest(engine_dir), ExecutorOptions(device="cuda"),
                       TorchExecutorOptions(kv_cache_blocks=16, **options))
    assert ex.model.kernels.name == "triton" and ex.graphs is not None
    if on_load is not None:
        on_load(ex)
    assert ex.reserve(2, len(prompt) + steps)
    logits = [ex.step([SequenceChunk(2, prompt, 0)])[0]]
    tokens = []
    for i in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(ex.step([SequenceChunk(2, [tokens[-1]], len(prompt) + i)])[0])
    ex.close()
    return logits, tokens


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    for x in a:
        assert torch.isfinite(x).all(), "non-finite logits"
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_match_hf(variant, tmp_path, dtype):
    name, src, ckpt = variant
    engine = tmp_path / "engine"
    build(ckpt, engine, backend="torch", max_batch_size=4, max_seq_len=64, dtype=dtype,
          allow_long_context=True)
    got, tokens = kiln_logits(engine, PROMPT, STEPS)
    check_against_hf(name, src, dtype == "float32", got, tokens)


def test_decode_rows_sharing_a_graph_match_hf(variant, tmp_path):
    """Three sequences (11, 3 and 17 tokens) prefill in one step, then decode together: three
    rows in the captured graph of four (one padding row), two once the short one stops. Each
    row's logits within 1e-3 of HF float32 running that sequence alone: per-row ALiBi, sliding
    window and dynamic-NTK tables inside a replayed graph (the test above replays one row)."""
    name, src, ckpt = variant
    engine = tmp_path / "engine"
    build(ckpt, engine, backend="torch", max_batch_size=4, max_seq_len=64, dtype="float32",
          allow_long_context=True)
    ex = load_executor(engine, read_manifest(engine), ExecutorOptions(device="cuda"),
                       TorchExecutorOptions(kv_cache_blocks=16))
    replays = []
    run = ex.graphs.run
    ex.graphs.run = lambda plan, *args: replays.append(plan.num_seqs) or run(plan, *args)
    prompts = {0: PROMPT, 1: PROMPT[:3], 2: PROMPT + PROMPT[:6]}
    for slot, prompt in prompts.items():
        assert ex.reserve(slot, len(prompt) + STEPS)
    first = ex.step([SequenceChunk(slot, p, 0) for slot, p in prompts.items()])
    logits = {slot: [first[i]] for i, slot in enumerate(prompts)}
    tokens = {slot: [] for slot in prompts}
    for i in range(STEPS):
        rows = [0, 1, 2] if i < STEPS // 2 else [0, 2]
        for slot in rows:
            tokens[slot].append(int(logits[slot][-1].argmax()))
        out = ex.step([SequenceChunk(slot, [tokens[slot][-1]], len(prompts[slot]) + i)
                       for slot in rows])
        for j, slot in enumerate(rows):
            logits[slot].append(out[j])
    ex.close()
    assert replays == [3] * (STEPS // 2) + [2] * (STEPS // 2), replays
    truth = model_class(name).from_pretrained(src, dtype=torch.float32).cuda().eval()
    errors = {slot: rel(logits[slot], hf_logits(truth, prompts[slot], tokens[slot]))
              for slot in prompts}
    assert max(errors.values()) <= 1e-3, f"{name}: relative error per row {errors}"


def check_against_hf(name: str, src, float32: bool, got: list[torch.Tensor],
                     tokens: list[int]) -> None:
    """float32 engines within 1e-3 of HF's float32; 16-bit ones no worse than twice HF's own
    bfloat16 error (or 1e-2)."""
    truth = model_class(name).from_pretrained(src, dtype=torch.float32).cuda().eval()
    want = hf_logits(truth, PROMPT, tokens)
    err = rel(got, want)
    if float32:
        assert err <= 1e-3, f"{name}: float32 relative error {err:.2e}"
        return
    hf16 = model_class(name).from_pretrained(src, dtype=torch.bfloat16).cuda().eval()
    hf_err = rel(hf_logits(hf16, PROMPT, tokens), want)
    assert hf_err <= 0.1, f"{name}: HF's own bf16 error {hf_err:.2e} is no yardstick"
    assert err <= max(2 * hf_err, 1e-2), f"{name}: bf16 error {err:.2e}, HF's own {hf_err:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_query_group_of_three_matches_hf(tmp_path, dtype):
    """SmolLM2's grouping (9 query heads on 3 KV heads: the README's model) in both dtypes; the
    attention kernels pad a group of 3 to 4, and the variants' groups are 1, 2 and 4."""
    _need_gpu()
    from tests.models import hf_llama

    src = hf_llama(tmp_path / "hf", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    engine = tmp_path / "engine"
    build(kiln_checkpoint(src, tmp_path / "ckpt"), engine, backend="torch", max_batch_size=4,
          max_seq_len=64, dtype=dtype, allow_long_context=True)
    got, tokens = kiln_logits(engine, PROMPT, STEPS)
    check_against_hf("llama-gqa", src, dtype == "float32", got, tokens)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fresh_prompt_through_cudnn_matches_hf(tmp_path, monkeypatch, dtype):
    """A fresh prompt's attention through cuDNN (``prefill_attention="cudnn"``, MIN_TOKENS
    lowered to this prompt's length): taken once per layer, and the logits match HF as the
    paged kernel's do."""
    _need_gpu()
    monkeypatch.setattr(cudnn, "MIN_TOKENS", len(PROMPT))
    name = "llama-gqa"
    src = hf_model(name, tmp_path / "hf")
    engine = tmp_path / "engine"
    build(kiln_checkpoint(src, tmp_path / "ckpt"), engine, backend="torch", max_batch_size=4,
          max_seq_len=64, dtype=dtype, allow_long_context=True)
    calls = []

    def count_calls(ex):
        real = ex.model.fresh_prefill
        assert real is cudnn.fresh_prefill_attention

        def counted(*args, **kwargs):
            calls.append(args[0].shape[0])
            return real(*args, **kwargs)
        ex.model.fresh_prefill = counted

    got, tokens = kiln_logits(engine, PROMPT, STEPS, on_load=count_calls,
                              prefill_attention="cudnn")
    assert calls == [len(PROMPT)] * read_manifest(engine).decoder.num_layers
    check_against_hf(name, src, False, got, tokens)


def test_step_logits_are_not_overwritten_by_later_steps(tmp_path):
    """Logits a caller keeps stay valid after later (graph-replayed) steps."""
    _need_gpu()
    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    build(ckpt, tmp_path / "engine", backend="torch", max_batch_size=2, max_seq_len=64,
          dtype="float32")
    ex = load_executor(tmp_path / "engine", read_manifest(tmp_path / "engine"),
                       ExecutorOptions(device="cuda"), TorchExecutorOptions(kv_cache_blocks=8))
    assert ex.reserve(0, 20)
    ex.step([SequenceChunk(0, PROMPT, 0)])
    first = ex.step([SequenceChunk(0, [5], len(PROMPT))])
    kept = first.clone()
    ex.step([SequenceChunk(0, [6], len(PROMPT) + 1)])
    assert torch.equal(first, kept)


def test_kv_cache_holds_no_more_than_the_limits_can_use(tmp_path):
    """Sized from free GPU memory, a small engine's cache stops at max_batch_size slots of
    max_seq_len tokens (plus the scratch block): the rest of the GPU stays free for others."""
    _need_gpu()
    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    build(ckpt, tmp_path / "engine", backend="torch", max_batch_size=3, max_seq_len=200,
          dtype="bfloat16", allow_long_context=True)
    ex = load_executor(tmp_path / "engine", read_manifest(tmp_path / "engine"),
                       ExecutorOptions(device="cuda"))  # 90% of free memory, by default
    page = ex.options.page_size
    assert ex.cache.allocator.num_blocks == 3 * -(-200 // page) + 1
    ex.close()


def test_an_engine_of_context_logits_keeps_room_for_every_rows_logits(tmp_path, monkeypatch):
    """kiln eval's engines (--gather_context_logits): the cache is sized from free memory less
    what a step of max_num_tokens rows holds, every row's logits too (the sizing's probe step
    computes its last row's only). Here [1024, 64000] of them, ~1 GB with their float32
    copies, over the sizing's 256 MiB of slack: an 8B model's eval at 8,192 tokens a step had
    needed ~16 GB more than was kept for it."""
    _need_gpu()
    from kiln.runtime.sampling import context_logprobs
    from kiln.runtime.torch_backend import executor as module
    from tests.models import hf_llama

    vocab, n = 64000, 1024
    ckpt = kiln_checkpoint(hf_llama(tmp_path / "hf", vocab_size=vocab), tmp_path / "ckpt")
    engine = tmp_path / "engine"
    build(ckpt, engine, backend="torch", dtype="bfloat16", gather_context_logits=True,
          max_batch_size=2, max_input_len=n, max_seq_len=n, max_num_tokens=n,
          allow_long_context=True)
    reserves = []
    sized = module.blocks_for_memory
    monkeypatch.setattr(module, "blocks_for_memory", lambda free, reserve, *rest: (
        reserves.append(reserve) or sized(free, reserve, *rest)))
    ex = load_executor(engine, read_manifest(engine), ExecutorOptions(
        device="cuda", kv_cache_free_gpu_memory_fraction=0.05))
    tokens = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ex.step_logits([SequenceChunk(0, tokens, 0, context_logits=True)])
    assert context_logprobs(out.context[0], tokens[1:], 1) is not None
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    assert len(reserves) == 1 and used <= reserves[0], (used, reserves)
    ex.close()


def test_a_cudnn_failure_at_warm_up_leaves_fresh_prompts_to_kilns_kernel(tmp_path, monkeypatch,
                                                                          caplog):
    """A prompt length cuDNN fails at while the engine loads (its small probe passed): "auto"
    says so at WARNING and keeps kiln's kernel; "cudnn" is an error."""
    _need_gpu()
    from kiln.errors import ConfigError

    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    engine = tmp_path / "engine"
    build(ckpt, engine, backend="torch", max_batch_size=2, max_seq_len=2048, dtype="bfloat16",
          allow_long_context=True)

    def fails(*args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: no execution plan\nmore")

    monkeypatch.setattr(cudnn, "warm_up", fails)
    with caplog.at_level("WARNING"):
        ex = load_executor(engine, read_manifest(engine), ExecutorOptions(device="cuda"))
    assert ex.model.fresh_prefill is None
    assert ("prefill attention: kiln's Triton kernel, since cuDNN's attention failed at a prompt "
            "length this engine serves (cuDNN Frontend error: no execution plan)") in caplog.messages
    ex.close()
    with pytest.raises(ConfigError, match="prefill_attention='cudnn': cuDNN's attention failed"):
        load_executor(engine, read_manifest(engine),
                      ExecutorOptions(device="cuda", prefill_attention="cudnn"))
