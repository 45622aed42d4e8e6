"""The torch executor on the CPU (PyTorch reference kernels) against the oracle.

Covers the executor's own logic: packing ragged chunks, paged-cache addressing across several
blocks, chunked prefill mixed with decodes, slot reuse, capacity errors, and running under the
runtime's scheduler with a cache too small for every request at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kiln.checkpoint import load_config, load_rank
from kiln.engine import BuildLimits
from kiln.errors import ConfigError
from kiln.plugins.attention import cudnn
from kiln.plugins.attention import triton_reference as attention_reference
from kiln.reference import KVCache, ReferenceDecoder
from kiln.runtime.core import EngineCore
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.reference_executor import ReferenceExecutor
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions
from kiln.runtime.torch_backend.paged_cache import KVCacheError
from tests.helpers import raised
from tests.models import PROMPT, VARIANTS, hf_model, kiln_checkpoint

LIMITS = BuildLimits(max_batch_size=4, max_input_len=32, max_seq_len=48, max_num_tokens=40)
PAGE = 4  # small pages: every sequence here spans several blocks


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            cache[name] = kiln_checkpoint(hf_model(name, root / "hf"), root / "ckpt")
        return cache[name]
    return get


def make_executor(ckpt, limits=LIMITS, **options) -> TorchExecutor:
    config = load_config(ckpt)
    return TorchExecutor(config.decoder, load_rank(ckpt, 0, config), limits,
                         options=TorchExecutorOptions(page_size=PAGE, **options))


def oracle_logits(ref: ReferenceDecoder, tokens: list[int]) -> torch.Tensor:
    """Logits [len, vocab] at every position of ``tokens`` (one prefill)."""
    return ref.forward(torch.tensor([tokens]), KVCache())[0]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prefill_and_decode_match_oracle(checkpoints, name):
    ckpt = checkpoints(name)
    ex, ref = make_executor(ckpt), ReferenceDecoder.from_checkpoint(ckpt)
    cache = KVCache()
    want = ref.forward(torch.tensor([PROMPT]), cache)[0, -1]
    assert ex.reserve(3, len(PROMPT) + 6)
    got = ex.step([SequenceChunk(3, PROMPT, 0)])
    assert got.shape == (1, ex.vocab_size) and got.dtype == torch.float32
    errors = [float((got[0] - want).abs().max())]
    for i in range(6):
        token = int(want.argmax())
        want = ref.forward(torch.tensor([[token]]), cache)[0, -1]
        got = ex.step([SequenceChunk(3, [token], len(PROMPT) + i)])
        errors.append(float((got[0] - want).abs().max()))
    assert max(errors) <= 1e-4, errors


# Dynamic NTK is excluded: a chunk's rotary base depends on its sequence's length at that step
# (as in HF), so chunked prefill legitimately differs from the one-shot oracle there.
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "mpt-clip-scale",
                                  "falcon-40b-gqa", "falcon-rw-alibi"])
def test_mixed_chunked_steps_match_oracle(checkpoints, name):
    """Three sequences in chunked prefill mixed with decodes, in shuffled slots, per step."""
    ckpt = checkpoints(name)
    ex, ref = make_executor(ckpt), ReferenceDecoder.from_checkpoint(ckpt)
    g = torch.Generator().manual_seed(1)
    seqs = {slot: torch.randint(0, 128, (n,), generator=g).tolist()
            for slot, n in ((2, 23), (0, 12), (3, 17))}
    want = {slot: oracle_logits(ref, toks) for slot, toks in seqs.items()}
    for slot, toks in seqs.items():
        assert ex.reserve(slot, len(toks))
    # (slot, start, length) per step: chunks straddle page boundaries; single-token chunks
    # (decodes) run alone, beside prefill chunks, and in an all-decode step.
    schedule = [[(2, 0, 5), (0, 0, 9)],
                [(2, 5, 7), (0, 9, 1), (3, 0, 3)],
                [(3, 3, 1), (2, 12, 1), (0, 10, 1)],
                [(2, 13, 10), (3, 4, 13), (0, 11, 1)]]
    for step in schedule:
        chunks = [SequenceChunk(s, seqs[s][a:a + n], a) for s, a, n in step]
        got = ex.step(chunks)
        for row, (s, a, n) in enumerate(step):
            err = float((got[row] - want[s][a + n - 1]).abs().max())
            assert err <= 1e-4, (step, s, err)


def test_released_slot_starts_empty(checkpoints):
    ckpt = checkpoints("llama-gqa")
    ex, ref = make_executor(ckpt), ReferenceDecoder.from_checkpoint(ckpt)
    first, second = PROMPT, list(reversed(PROMPT))[:7]
    assert ex.reserve(1, 20)
    ex.step([SequenceChunk(1, first, 0)])
    free_before = ex.cache.allocator.num_free
    ex.release(1)
    assert ex.cache.allocator.num_free == free_before + 5  # 20 tokens / 4 per block
    assert ex.reserve(1, len(second))
    got = ex.step([SequenceChunk(1, second, 0)])[0]
    assert float((got - oracle_logits(ref, second)[-1]).abs().max()) <= 1e-4


def test_step_contract_errors(checkpoints):
    ex = make_executor(checkpoints("llama-gqa"), kv_cache_blocks=1 + 12)  # 12 blocks: 48 tokens
    assert ex.reserve(0, 8)
    with pytest.raises(RuntimeError, match="starts at 3"):
        ex.step([SequenceChunk(0, [1, 2], 3)])
    with pytest.raises(RuntimeError, match="used twice"):
        ex.step([SequenceChunk(0, [1], 0), SequenceChunk(0, [2], 1)])
    with pytest.raises(RuntimeError, match="max_num_tokens"):
        ex.step([SequenceChunk(0, [1] * 30, 0), SequenceChunk(1, [1] * 11, 0)])
    with pytest.raises(RuntimeError, match="max_seq_len"):
        ex.step([SequenceChunk(0, [1] * 49, 0)])
    assert ex.reserve(1, 40)  # 10 blocks; slot 0 holds 2: the cache is now full
    assert not ex.reserve(2, 1)
    with pytest.raises(KVCacheError, match="no free block"):
        ex.step([SequenceChunk(2, [1, 2], 0)])
    with pytest.raises(KVCacheError, match="no free block"):  # slot 0 outgrows its 2 blocks
        ex.step([SequenceChunk(0, [1] * 12, 0)])
    ex.release(1)
    assert ex.step([SequenceChunk(0, [1] * 12, 0)]).shape == (1, 128)  # takes a 3rd block
    assert ex.cache.allocator.capacity(0) == 12



def test_an_interrupted_cpu_step_raises_and_runs_again_as_if_it_had_not_run(checkpoints,
                                                                            monkeypatch):
    """interrupt() from another thread ends a CPU step before its next layer (a closing
    kiln serve had waited seconds for a long prompt's step); the step runs again over the
    same positions, and an interrupt between steps ends the next one only."""
    import threading

    from kiln.runtime.errors import StepInterrupted

    ckpt = checkpoints("llama-gqa")
    ex, uninterrupted = make_executor(ckpt), make_executor(ckpt)
    chunk, decode = [SequenceChunk(0, (1, 2, 3, 4, 5), 0)], [SequenceChunk(0, (6,), 5)]
    attention, entered = ex.model._attention, threading.Event()

    def first_layer_waits(i, *args):
        if i == 0:
            entered.set()
            assert ex._interrupt.wait(10)
        return attention(i, *args)

    monkeypatch.setattr(ex.model, "_attention", first_layer_waits)
    errors = []
    worker = threading.Thread(target=lambda: errors.append(raised(ex.step, chunk)))
    worker.start()
    assert entered.wait(10)
    ex.interrupt()
    worker.join(10)
    assert not worker.is_alive() and isinstance(errors[0], StepInterrupted), errors
    monkeypatch.undo()
    assert torch.equal(ex.step(chunk), uninterrupted.step(chunk))
    ex.interrupt()
    with pytest.raises(StepInterrupted, match="before layer 0"):
        ex.step_logits(decode)
    assert torch.equal(ex.step(decode), uninterrupted.step(decode))



def test_cache_too_small_for_one_sequence_is_an_error(checkpoints):
    with pytest.raises(KVCacheError, match="too few for one sequence"):
        make_executor(checkpoints("llama-gqa"), kv_cache_blocks=12)


def test_requests_wait_for_blocks_under_the_scheduler(checkpoints):
    """A cache for ~2 requests serving 6 through the runtime's scheduler: no crash, no hang,
    and every request's greedy tokens equal the reference executor's."""
    ckpt = checkpoints("mistral-window")
    limits = BuildLimits(max_batch_size=4, max_input_len=16, max_seq_len=32, max_num_tokens=24)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 16, (6,), generator=g)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outputs = []
    for executor in (make_executor(ckpt, limits, kv_cache_blocks=1 + 2 * 8),
                     ReferenceExecutor.from_checkpoint(ckpt, limits)):
        core = EngineCore(executor)
        requests = [core.add_request(p, params) for p in prompts]
        starved, steps = 0, 0  # steps where a request waited although a slot was free
        while core.has_work():
            core.step()
            sched = core.scheduler
            starved += bool(sched.waiting) and len(sched.running) < limits.max_batch_size
            steps += 1
            assert steps < 500, "the engine did not finish"
        outputs.append([r.output_ids for r in requests])
        if isinstance(executor, TorchExecutor):
            assert starved > 0  # the cache, not max_batch_size, held requests back
            assert executor.cache.allocator.num_free == 16  # every block came back
    assert outputs[0] == outputs[1]


def test_pre_transposed_weights_give_the_same_logits(checkpoints):
    from kiln.engine.torch_files import pack_weights
    from kiln.roles import Role

    ckpt = checkpoints("llama-mha-headdim-bias")  # biases on every projection
    config = load_config(ckpt)
    roles = frozenset({Role.QKV, Role.OUT, Role.GATE_UP, Role.DOWN, Role.LM_HEAD})
    packed, names = pack_weights(load_rank(ckpt, 0, config), torch.float32, roles)
    ex = TorchExecutor(config.decoder, packed, LIMITS, transposed=names,
                       options=TorchExecutorOptions(page_size=PAGE))
    assert ex.reserve(0, len(PROMPT))
    got = ex.step([SequenceChunk(0, PROMPT, 0)])[0]
    want = oracle_logits(ReferenceDecoder.from_checkpoint(ckpt), PROMPT)[-1]
    assert float((got - want).abs().max()) <= 1e-4


def test_prefill_attention_option(checkpoints):
    with pytest.raises(ValueError, match="prefill_attention is 'flash'; it must be one of auto"):
        TorchExecutorOptions(prefill_attention="flash")
    ckpt = checkpoints("llama-gqa")
    with pytest.raises(ConfigError, match="prefill_attention='cudnn': cuDNN's attention cannot "
                                          "run this model here: kiln's reference kernels run "
                                          "here, not on a CUDA device; use 'auto' or 'kiln'"):
        make_executor(ckpt, prefill_attention="cudnn")
    for choice in ("auto", "kiln"):  # the CPU: kiln's reference kernel
        assert make_executor(ckpt, prefill_attention=choice).model.fresh_prefill is None


def test_fresh_prompts_take_the_fresh_prefill_attention(checkpoints, monkeypatch):
    """A step that is one prompt from position 0, of MIN_TOKENS or more, goes to the model's
    fresh-prefill attention (cuDNN on GPUs; here a stand-in that reads the cache the same way
    and runs SDPA's math); every other step to the paged kernel. The logits stay the oracle's."""
    monkeypatch.setattr(cudnn, "MIN_TOKENS", 4)
    ckpt = checkpoints("llama-gqa")
    ex, ref = make_executor(ckpt), ReferenceDecoder.from_checkpoint(ckpt)
    calls = []

    def stand_in(q, k_cache, v_cache, table, *, scale):
        calls.append(q.shape[0])
        n = q.shape[0]
        keys, values = (attention_reference.gather_keys(c, table, n).transpose(0, 1)[None]
                        for c in (k_cache, v_cache))
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values,
                                                 is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1).contiguous()

    ex.model.fresh_prefill = stand_in
    layers = len(ex.model.layers)  # one call per layer
    for slot in range(3):
        assert ex.reserve(slot, 24)
    got = ex.step([SequenceChunk(0, PROMPT[:6], 0)])[0]
    assert calls == [6] * layers
    assert float((got - oracle_logits(ref, PROMPT[:6])[-1]).abs().max()) <= 1e-4
    ex.step([SequenceChunk(0, PROMPT[6:], 6)])  # a later chunk: keys cached before it
    ex.step([SequenceChunk(1, PROMPT[:3], 0)])  # shorter than MIN_TOKENS
    ex.step([SequenceChunk(0, [5], 11), SequenceChunk(2, PROMPT[:6], 0)])  # with a decode row
    ex.step([SequenceChunk(1, PROMPT[3:], 3), SequenceChunk(0, PROMPT[:5], 12)])
    assert calls == [6] * layers
    ex.release(2)
    assert ex.reserve(2, 24)
    got = ex.step([SequenceChunk(2, PROMPT[2:], 0)])[0]
    assert calls == [6] * layers + [9] * layers
    assert float((got - oracle_logits(ref, PROMPT[2:])[-1]).abs().max()) <= 1e-4


def test_executor_options_reach_the_torch_executor():
    """ExecutorOptions' torch fields (what LLM and the CLI take) override the defaults, and
    the TorchExecutorOptions a caller passes too; a bad choice is refused in one line."""
    from kiln.engine import EngineError
    from kiln.runtime.options import ExecutorOptions
    from kiln.runtime.torch_executor import _torch_options

    given = TorchExecutorOptions(page_size=16, prefill_attention="cudnn")
    assert _torch_options(ExecutorOptions(), None) == TorchExecutorOptions()
    assert _torch_options(ExecutorOptions(), given) == given
    got = _torch_options(ExecutorOptions(kv_cache_free_gpu_memory_fraction=0.5,
                                         prefill_attention="kiln"), given)
    assert (got.page_size, got.kv_cache_free_gpu_memory_fraction, got.prefill_attention) == \
        (16, 0.5, "kiln")
    with pytest.raises(EngineError, match="prefill_attention must be one of auto, kiln, cudnn, "
                                          "found 'triton'"):
        ExecutorOptions(prefill_attention="triton")
