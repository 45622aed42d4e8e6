"""After an engine is loaded, its steps compile nothing: the load-time warm-up covers them.

A kernel variant compiled at first use makes some request wait for Triton's compiler (0.2-1 s
per variant on an H200; `kiln serve`'s first requests waited 1.3-1.9 s, GPU_NOTES.md). The
executor loads with its default sizing (the warm-up runs there), then steps of every kind a
scheduler makes: prompts of 1, 3, 16, 17 and 100 tokens (Triton specializes integers equal
to 1 and multiples of 16), chunked prefill, mixed prefill + decode, decode batches of every
size up to the limit, long contexts (split decode attention), each step's logits through the
sampler's greedy pass; for bf16, float32 and quantized engines (FP8 with and without an FP8 KV
cache, INT4 AWQ, INT8 SmoothQuant).
Any compile is named by kiln.runtime.torch_backend.compile_watch.
"""

from __future__ import annotations

import pytest
import torch

from kiln.builder import build
from kiln.checkpoint import load_config, load_rank
from kiln.engine import BuildLimits
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.loader import ExecutorOptions, open_engine
from kiln.runtime.sampling import launch_rows
from kiln.runtime.torch_backend import compile_watch
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions
from tests.builder.quantized import quantize_checkpoint
from tests.models import hf_model, kiln_checkpoint

pytestmark = pytest.mark.gpu
LIMITS = BuildLimits(max_batch_size=8, max_input_len=128, max_seq_len=512, max_num_tokens=256)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_steps_after_the_load_compile_nothing(tmp_path, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    config = load_config(ckpt)
    tensors = {k: v.to("cuda", dtype) for k, v in load_rank(ckpt, 0, config).items()}
    ex = TorchExecutor(config.decoder, tensors, LIMITS, device="cuda",
                       options=TorchExecutorOptions(kv_cache_free_gpu_memory_fraction=0.05))
    _assert_steps_compile_nothing(ex, config.decoder.vocab_size)


@pytest.mark.parametrize("qformat,kv", [("fp8", None), ("fp8", "fp8"), ("int4_awq", None),
                                        ("int8_sq", None)], ids=str)
def test_quantized_engine_steps_after_the_load_compile_nothing(tmp_path, qformat, kv):
    """Quantized engines add variants: the Triton GEMMs' tiles by token count (up to 64
    tokens for FP8 and INT8 W8A8, every count for the weight-only formats, INT4 on tensor
    cores up to 16); in FP8 engines, from 65 rows the attention kernels write the ``o``
    projection's FP8 input, split decode attention included (a prompt's chunk beside a
    sequence with a long context). The FP8 1000/1000 benchmark compiled such variants after
    the load (GPU_NOTES.md, "Issue 12, tenth pass")."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    # FP8 without smoothing, as kiln quantize writes it; with an FP8 cache, and in the other
    # formats, o and down smoothed (the kernels that quantize their inputs apply it: variants
    # of their own)
    smoothing = {"pre_quant": ()} if (qformat, kv) == ("fp8", None) else {}
    quantized = quantize_checkpoint(ckpt, tmp_path / "q", qformat, kv_cache_dtype=kv,
                                    **smoothing)
    build(quantized, tmp_path / "e", backend="torch", dtype="bfloat16",
          max_batch_size=LIMITS.max_batch_size, max_input_len=LIMITS.max_input_len,
          max_seq_len=LIMITS.max_seq_len, max_num_tokens=LIMITS.max_num_tokens,
          allow_long_context=True)  # the tiny model's 64 positions: rotary needs no more
    _, ex = open_engine(tmp_path / "e", ExecutorOptions(
        device="cuda", kv_cache_free_gpu_memory_fraction=0.05))
    assert isinstance(ex, TorchExecutor) and ex.model.quant is not None
    _assert_steps_compile_nothing(ex, ex.vocab_size)


def _assert_steps_compile_nothing(ex: TorchExecutor, vocab_size: int) -> None:
    before = len(compile_watch.late_compiles())
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(0, vocab_size, (n,), generator=g).tolist()

    lengths = [0] * LIMITS.max_batch_size

    def step(chunks):
        for slot, toks in chunks:
            assert ex.reserve(slot, lengths[slot] + len(toks))
        logits = ex.step([SequenceChunk(slot, toks, lengths[slot]) for slot, toks in chunks])
        launch_rows(logits, [])  # the sampler's greedy pass over the step's logits
        for slot, toks in chunks:
            lengths[slot] += len(toks)

    for slot, n in enumerate([1, 3, 16, 17, 100]):  # prompts alone
        step([(slot, tokens(n))])
    step([(5, tokens(64)), (0, tokens(1)), (1, tokens(1))])  # chunked prefill + decode rows
    step([(5, tokens(64)), (2, tokens(1))])
    step([(6, tokens(8)), (7, tokens(32))])  # two prompts in one step: 40 rows
    step([(6, tokens(32)), (7, tokens(48))])  # and 80 rows
    for width in range(1, LIMITS.max_batch_size + 1):  # decode batches of every size
        step([(slot, tokens(1)) for slot in range(width)])
    for _ in range(3):  # a long context: split decode attention
        step([(3, tokens(100))])
    step([(3, tokens(1))])
    step([(3, tokens(1)), (4, tokens(70))])  # split decode beside a chunk: 71 rows
    torch.cuda.synchronize()
    late = compile_watch.late_compiles()[before:]
    assert late == [], "compiled after the load:\n" + "\n".join(late)
