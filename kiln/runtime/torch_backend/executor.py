"""The torch backend's executor: packed steps over a paged KV cache, CUDA graphs for decode.

Contract: :mod:`kiln.runtime.executor`. ``step`` returns float32 logits on the executor's
device. ``reserve(slot, n)`` gives the slot cache blocks for n tokens or answers False when the
cache is full (the scheduler keeps the request waiting); ``release(slot)`` returns its blocks.
A step whose chunk outgrows its slot's blocks reserves more on the spot and raises
:class:`~kiln.runtime.errors.KVCacheError` if none are left. A chunk whose
``start`` is not its slot's cached length is a scheduler bug and raises ``RuntimeError``.

Cache size: on CUDA, ``kv_cache_free_gpu_memory_fraction`` of the memory free after the weights
are loaded and one step of ``max_num_tokens`` tokens has run (its peak is what activations
need); on the CPU, enough blocks for every slot at ``max_seq_len``. ``kv_cache_blocks``
overrides both.

Quantized engines (``quant``): projections run their format's kernels; a quantized KV cache
(``kv_cache_dtype`` fp8 or int8) stores one byte per value, so the same memory holds twice the
blocks of a 16-bit cache (the sizing below counts the cache's own element size).

Async scheduling (``supports_async``, CUDA and CPU): ``step_logits(chunks, pending)`` takes
the tokens that ``pending`` names from the previous step's device tensor, gathered on the device
into the step's token input (eager steps) or the graph's static one (CUDA-graph decode steps);
nothing in a step reads the device, and all work runs on the current stream in launch order, so
blocks released while a launched step still writes them (a finished request's stray row) are
written by their next owner only after it.

Context logits (engines built with ``--gather_context_logits``): a step with a chunk that asks
runs eagerly and applies the lm_head to every row; other steps compute the last rows only.

One rank of a tensor/pipeline-parallel engine (``shard``): the executor holds that rank's
weights and a cache of its stage's layers and KV heads, and every rank of the engine must run
the same calls in the same order (the distributed executor, :mod:`kiln.runtime.distributed`,
replays the driver's on every worker): the block allocators then agree, and the forward's
collectives match. On CUDA each rank sizes its cache from its own free memory and all take the
smallest count. A rank of a stage before the last returns an empty ``[0, vocab]`` tensor from
``step`` (and no context logits): the last stage's ranks return the logits. The ranks of a
tensor-parallel engine (pp 1) capture their decode steps too, NCCL's all-reduces and vocab
all-gather inside: every rank captures the same batch sizes in the same order, and replays the
same graph in the same step, so the captured collectives pair up as eager ones do. Pipeline
engines capture none (a step is micro-batches of sends and receives between stages).

Micro-batches (pipeline engines, pp_size > 1): every rank splits a step's chunks alike into
micro-batches of whole sequences (:func:`~kiln.runtime.torch_backend.inputs.split_micro_batches`:
contiguous, balanced by tokens; ``TorchExecutorOptions.micro_batches``, by default one per
stage as far as each gets ``micro_batch_tokens`` tokens: decode steps stay whole) and runs one forward per micro-batch, in order, over the one KV cache (each sequence
has its own slot; the step's blocks are reserved before the first). A stage only starts the
send of a micro-batch's residual stream and goes on with the next micro-batch while the next
stage takes this one, so in steady state the stages work at once; the step waits for its sends
before it returns. The last stage's logits (and context logits) are the micro-batches' in
chunk order, as one forward's. Engines of one stage run a step in one forward, as before.

Interrupts (:meth:`interrupt`, the executor contract's): a single-rank engine on the CPU, where
a long prompt's step takes seconds (a closing ``kiln serve`` waited for it), checks between its
layers and ends the step with StepInterrupted; its slots' lengths are set only once a step
completes, so the step runs again over the same positions. Elsewhere the step ends as usual:
on a GPU within milliseconds, and a rank of a parallel engine stopping alone would leave its
peers in their collectives.

Non-goals: prefix caching, preemption, sampling (the scheduler samples from the returned
logits).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import torch

from kiln.config import DecoderConfig
from kiln.engine import BuildLimits
from kiln.errors import ConfigError
from kiln.plugins.attention import cudnn as cudnn_attention
from kiln.plugins.quant_linear import FP8_TRITON_MAX_M
from kiln.quantization.config import QuantConfig
from kiln.runtime.executor import DeviceTokens, Executor, SequenceChunk, StepLogits
from kiln.runtime.options import PREFILL_ATTENTION
from kiln.runtime.sampling import finite_argmax
from kiln.runtime.torch_backend import compile_watch
from kiln.runtime.torch_backend.cuda_graphs import DecodeGraphs, default_batch_sizes
from kiln.runtime.torch_backend.inputs import (
    RopeTables,
    Uploader,
    feeds_for,
    make_plan,
    split_micro_batches,
    step_inputs,
)
from kiln.runtime.torch_backend.kernels import load_kernels
from kiln.runtime.torch_backend.model import PagedDecoder
from kiln.runtime.torch_backend.paged_cache import (
    KVCacheError,
    PagedKVCache,
    blocks_for_memory,
    cdiv,
)
from kiln.runtime.torch_backend.parallel import RankShard

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


@dataclass(frozen=True)
class TorchExecutorOptions:
    """Runtime choices of the torch executor (none changes results beyond rounding)."""

    kernels: str | None = None  # "triton" | "reference"; None: triton on CUDA, else reference
    kv_cache_free_gpu_memory_fraction: float = 0.9
    kv_cache_blocks: int | None = None  # exact block count (overrides the fraction)
    page_size: int = 64
    cuda_graphs: bool = True  # capture decode steps (CUDA only)
    graph_batch_sizes: tuple[int, ...] | None = None  # default: default_batch_sizes()
    decode_splits: int | None = None  # split-K of eager decode attention; None: heuristic
    # engines of several ranks: the longest a collective may wait for a peer before the run
    # ends (a dead peer ends it at once; this bounds a hung one)
    collective_timeout_s: float = 120.0
    # pipeline engines: micro-batches per step (at most one per chunk), so that the stages
    # overlap; 1: the stages run one after the other; None: one per stage (pp_size), but no
    # more than the step has micro_batch_tokens tokens for each, so that decode steps, whose
    # time is the stage's weights read once, stay whole (split in two, an 8-token decode step
    # took 1.35x as long on a CPU; a 512-token prefill 0.86-0.92x: benchmarks/pipeline_overlap.py)
    micro_batches: int | None = None
    micro_batch_tokens: int = 256
    # a fresh prompt's attention (one chunk from position 0): "auto" takes cuDNN's fused
    # attention where it applies and runs (kiln.plugins.attention.cudnn), "kiln" kiln's own
    # paged kernel (Triton on GPUs, the reference on the CPU), "cudnn" requires cuDNN's
    prefill_attention: str = "auto"

    def __post_init__(self) -> None:
        if self.prefill_attention not in PREFILL_ATTENTION:
            raise ValueError(f"prefill_attention is {self.prefill_attention!r}; it must be one "
                             f"of {', '.join(PREFILL_ATTENTION)}")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError(f"micro_batches is {self.micro_batches}; it must be at least 1 "
                             f"(or None: one per pipeline stage)")
        if self.micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens is {self.micro_batch_tokens}; it must be at "
                             f"least 1")


class TorchExecutor(Executor):
    """See the module docstring."""

    supports_async = True

    @property
    def prefers_async(self) -> bool:
        """On CUDA the host prepares step n+1 while the GPU runs step n; on the CPU nothing
        runs apart from the host, so async would only delay tokens (the core's default)."""
        return self.device.type == "cuda"

    def __init__(self, config: DecoderConfig, tensors: dict[str, torch.Tensor],
                 limits: BuildLimits, *, transposed: frozenset[str] = frozenset(),
                 device: str | torch.device = "cpu",
                 options: TorchExecutorOptions | None = None,
                 gather_context_logits: bool = False, quant: QuantConfig | None = None,
                 shard: RankShard | None = None):
        self.options = options or TorchExecutorOptions()
        self.shard = shard = shard or RankShard()
        self.pipelined = shard.mapping.pp_size > 1  # steps run in micro-batches
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.limits, self.config = limits, config
        self.vocab_size = config.vocab_size
        self.gathers_context_logits = gather_context_logits
        self.needs_warm_up = self.device.type == "cuda"  # Triton compiles, cuBLAS set-up
        if limits.max_seq_len > config.max_position_embeddings and config.rope_scaling is None:
            logger.warning("max_seq_len %d exceeds the model's max_position_embeddings %d",
                           limits.max_seq_len, config.max_position_embeddings)
        # what compiles after the load (and its warm-up), a request waits for
        loading = compile_watch.loading() if self.device.type == "cuda" else nullcontext()
        with loading:
            kernels = load_kernels(self.options.kernels, self.device)
            self.model = PagedDecoder(config, tensors, transposed, kernels, quant, shard,
                                      prefill_attention=self.options.prefill_attention)
            self.rope = RopeTables(config, limits.max_seq_len, self.device)
            self.uploader = Uploader(self.device)
            kv_dtype = quant.kv_cache_dtype if quant is not None else None
            self.cache = self._make_cache(KV_CACHE_DTYPES[kv_dtype] if kv_dtype
                                          else self.model.dtype)
            self._lengths = [0] * limits.max_batch_size
            # set by interrupt(), read between the layers of a step (module docstring)
            self._interrupt = threading.Event() \
                if self.device.type == "cpu" and shard.mapping.world_size == 1 else None
            self.model.interrupted = self._interrupt
            self.graphs = None
            if self.options.cuda_graphs and self.device.type == "cuda":
                if self.pipelined:
                    logger.warning("pipeline-parallel engine: decode steps run without CUDA "
                                   "graphs, each launching its kernels from Python (slower "
                                   "at small batches than tensor parallelism's graphs)")
                else:
                    sizes = list(self.options.graph_batch_sizes or
                                 default_batch_sizes(limits.max_batch_size))
                    self.graphs = DecodeGraphs(self.model, self.cache, self.rope, sizes,
                                               limits.max_seq_len, self.device)

    # -- cache sizing -------------------------------------------------------------------
    def _new_cache(self, num_blocks: int, dtype: torch.dtype, slots: int) -> PagedKVCache:
        cfg, model = self.config, self.model
        return PagedKVCache(num_layers=len(model.layers), num_kv_heads=model.num_kv_heads,
                            head_dim=cfg.head_dim, page_size=self.options.page_size,
                            num_blocks=num_blocks, max_slots=slots,
                            max_seq_len=self.limits.max_seq_len, dtype=dtype, device=self.device)

    def _make_cache(self, dtype: torch.dtype) -> PagedKVCache:
        limits, opts = self.limits, self.options
        blocks_per_seq = cdiv(limits.max_seq_len, opts.page_size)
        if opts.kv_cache_blocks is not None:
            num_blocks = opts.kv_cache_blocks
        elif self.device.type != "cuda":
            num_blocks = limits.max_batch_size * blocks_per_seq + 1
        else:
            num_blocks = self._blocks_from_free_memory(dtype)
            # no prefix sharing: max_batch_size slots of max_seq_len tokens use no more (and a
            # small engine leaves the rest of the GPU to other processes)
            usable = limits.max_batch_size * blocks_per_seq + 1
            if num_blocks > usable:
                logger.info("KV cache: %d blocks, all that max_batch_size %d x max_seq_len %d "
                            "can use (free memory allowed %d)", usable, limits.max_batch_size,
                            limits.max_seq_len, num_blocks)
                num_blocks = usable
        if self.shard.comm is not None:  # every rank replays one allocator: the same blocks
            num_blocks = self.shard.comm.min_over_world(num_blocks)
        return self._new_cache(num_blocks, dtype, limits.max_batch_size)

    def _blocks_from_free_memory(self, dtype: torch.dtype) -> int:
        """Profile one full step on a small cache, then size the real one from what is free."""
        limits, cfg = self.limits, self.config
        self._warm_up_fresh_prefill()
        n = min(limits.max_num_tokens, limits.max_seq_len)
        probe = self._new_cache(2 * cdiv(limits.max_seq_len, self.options.page_size) + 1,
                                dtype, 2)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.cache = probe
        self._lengths = [0, 0]
        self._step_on_probe([SequenceChunk(0, [0] * n, 0)])
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - base
        self._warm_up_kernels()
        del self.cache, probe
        torch.cuda.empty_cache()
        # logits of a full decode batch (model dtype in the graphs, float32 returned) + slack
        reserve = activations + limits.max_batch_size * cfg.vocab_size * 6 + (256 << 20)
        if self.gathers_context_logits:  # kiln eval, prompt_logprobs: the probe's step
            # computed its last row's logits; a step of every row's and their prompt logprobs
            # peaked at 15 bytes a logit in a bfloat16 engine (an H100: the model-dtype
            # logits, float32 copy, a chunk's float32 slice, log_softmax and its finite mask)
            reserve += n * cfg.vocab_size * (self.model.dtype.itemsize + 13)
        free, _ = torch.cuda.mem_get_info(self.device)
        block = PagedKVCache.block_bytes(len(self.model.layers), self.model.num_kv_heads,
                                         cfg.head_dim, self.options.page_size, dtype)
        num_blocks = blocks_for_memory(free, reserve,
                                       self.options.kv_cache_free_gpu_memory_fraction, block)
        logger.info("KV cache: %.2f GiB free, %.2f GiB kept for activations -> %d blocks",
                    free / 2**30, reserve / 2**30, num_blocks)
        return num_blocks

    def _step_on_probe(self, chunks: list[SequenceChunk], num_splits: int | None = None) -> None:
        for c in chunks:
            self.cache.allocator.reserve(c.slot, c.start + len(c.tokens))
            self._lengths[c.slot] = c.start + len(c.tokens)
        self._eager(chunks, num_splits)

    def _warm_up_kernels(self) -> None:
        """Compile every kernel variant a step can need now, not during someone's request.

        Steps of each token-count band of the Triton GEMMs' tile configs (quantized engines:
        ``gemm_config``, ``int4_mma_config``; the profile step before this one ran the largest
        step);
        decode attention beside a prefill, unsplit (short contexts) and split (a context of
        129 keys in two); in FP8 engines both again in steps of more than 64 rows, where the
        attention writes the ``o`` projection's FP8 input; a single row (the GEMVs); the
        sampler's greedy pass over a step's logits. CUDA graphs compile their own decode
        variants when they are captured; cuDNN's attention plans are built before the memory
        probe (:meth:`_warm_up_fresh_prefill`).
        """
        limits = self.limits
        for slot in (0, 1):
            self.cache.allocator.release(slot)
        long = min(limits.max_seq_len, 129) - 1  # a decode row of 129 keys: two splits

        def probe(chunks: list[SequenceChunk], num_splits: int | None = None) -> None:
            for slot in (0, 1):
                self.cache.allocator.release(slot)
            self._step_on_probe(chunks, num_splits)

        for n in (3, 12, 24, 48, 70):  # rows <= 8, 16, 32, 64, 256 (the profile step: its own)
            if n <= min(limits.max_num_tokens, limits.max_seq_len):
                probe([SequenceChunk(0, [0] * n, 0)])
        probe([SequenceChunk(0, [0], 3), SequenceChunk(1, [0, 0], 0)])
        probe([SequenceChunk(0, [0], long), SequenceChunk(1, [0], 2)], num_splits=2)
        probe([SequenceChunk(0, [0], 5)])
        rows = FP8_TRITON_MAX_M + 1  # FP8 projections take inputs quantized by the kernel
        if limits.max_num_tokens > rows and limits.max_seq_len > rows + 3:  # before them
            probe([SequenceChunk(0, [0], 6), SequenceChunk(1, [0] * rows, 3)])
            probe([SequenceChunk(0, [0], long), SequenceChunk(1, [0] * rows, 3)], num_splits=2)
        # the sampler's greedy pass over a step's float32 logits (kiln.runtime.sampling): its
        # sliced and whole-row kernels (kiln.plugins.greedy.triton_kernels.default_slices)
        for n in (1, 64):
            finite_argmax(torch.zeros(n, self.vocab_size, device=self.device))
        torch.cuda.synchronize(self.device)

    def _warm_up_fresh_prefill(self) -> None:
        """cuDNN's plan for each padded length a fresh prompt can take (before the memory
        probe, whose full step may take that path). A length cuDNN fails at, which load's
        small probe passed, leaves fresh prompts to kiln's kernel, said at WARNING ("cudnn":
        an error)."""
        model, limits = self.model, self.limits
        if model.fresh_prefill is None:
            return
        started = time.perf_counter()
        try:
            lengths = cudnn_attention.warm_up(
                self.device, model.num_heads, model.num_kv_heads, self.config.head_dim,
                model.dtype, self.options.page_size, self.config.softmax_scale,
                min(limits.max_num_tokens, limits.max_seq_len))
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.options.prefill_attention == "cudnn":
                raise ConfigError(f"prefill_attention='cudnn': cuDNN's attention failed at a "
                                  f"prompt length this engine serves ({reason}); use 'auto' "
                                  f"or 'kiln'") from None
            logger.warning("prefill attention: kiln's Triton kernel, since cuDNN's attention "
                           "failed at a prompt length this engine serves (%s)", reason)
            model.fresh_prefill = None
            return
        logger.info("cuDNN attention: plans for %d prompt lengths built in %.1f s",
                    len(lengths), time.perf_counter() - started)

    # -- the executor contract ----------------------------------------------------------
    def reserve(self, slot: int, num_tokens: int) -> bool:
        return self.cache.allocator.reserve(slot, num_tokens)

    def release(self, slot: int) -> None:
        self.cache.allocator.release(slot)
        self._lengths[slot] = 0

    def capacity(self, slot: int) -> int:
        """Tokens ``slot`` holds room for now (a step reserves beyond it on the spot)."""
        return self.cache.allocator.capacity(slot)

    def interrupt(self) -> None:
        if self._interrupt is not None:
            self._interrupt.set()

    @contextmanager
    def _one_step(self) -> Iterator[None]:
        try:
            yield
        finally:
            if self._interrupt is not None:
                self._interrupt.clear()  # (an interrupt reaches one step: this one, or the next)

    def step(self, chunks: Sequence[SequenceChunk],
             pending: DeviceTokens | None = None) -> torch.Tensor:
        # Always a new tensor: graph logits live in a static buffer the next replay overwrites,
        # and .float() of a float32 model's logits would return that buffer itself.
        with self._one_step():
            return self._step(chunks, pending).last.to(torch.float32, copy=True)

    def _step(self, chunks: Sequence[SequenceChunk],
              pending: DeviceTokens | None) -> StepLogits:
        """A step without context logits: a decode graph's logits (model dtype, its static
        buffer) with its greedy pass, or an eager forward's logits (model dtype)."""
        if not chunks:
            return StepLogits(torch.empty(0, self.vocab_size, device=self.device), {})
        self._check(chunks)
        greedy = None
        if self.graphs is not None and all(len(c.tokens) == 1 for c in chunks) \
                and self.graphs.size_for(len(chunks)) is not None:
            plan = make_plan(chunks, self.cache.allocator)
            logits, greedy = self.graphs.run(plan, feeds_for(plan, pending))
        else:
            logits = self._eager(chunks, pending=pending)
        for c in chunks:
            self._lengths[c.slot] = c.start + len(c.tokens)
        if logits is None:  # a stage before the last: the last stage has the logits
            logits = torch.empty(0, self.vocab_size, device=self.device)
        return StepLogits(logits, {}, greedy)

    def step_logits(self, chunks: Sequence[SequenceChunk],
                    pending: DeviceTokens | None = None) -> StepLogits:
        with self._one_step():
            return self._step_logits(chunks, pending)

    def _step_logits(self, chunks: Sequence[SequenceChunk],
                     pending: DeviceTokens | None) -> StepLogits:
        if not any(c.context_logits for c in chunks):
            out = self._step(chunks, pending)
            if out.greedy is not None:  # the executor contract's module docstring
                return out
            return StepLogits(out.last.float(), {})
        if not self.gathers_context_logits:
            return super().step_logits(chunks)  # refuses
        self._check(chunks)
        if self.pipelined:
            parts = self._micro_batched(chunks, pending, self._every_row)
            out = None if parts is None else _joined(parts)
        else:
            out = self._every_row(chunks, pending)
        for c in chunks:
            self._lengths[c.slot] = c.start + len(c.tokens)
        if out is None:  # a stage before the last
            return StepLogits(torch.empty(0, self.vocab_size, device=self.device), {})
        return out

    def _every_row(self, chunks: Sequence[SequenceChunk],
                   pending: DeviceTokens | None) -> StepLogits | None:
        """One forward's logits with its chunks' context logits (None on a stage before the
        last)."""
        plan = make_plan(chunks, self.cache.allocator)
        inp = step_inputs(plan, self.uploader, self.rope, self.options.page_size,
                          self.options.decode_splits, feeds_for(plan, pending))
        every = self.model.forward_every_row(inp, self.cache)  # [T, V]
        if every is None:
            return None
        every = every.float()
        context = {i: every[int(plan.rows[i]):int(plan.rows[i] + plan.lens[i])].clone()
                   for i, c in enumerate(chunks) if c.context_logits}
        last = every.index_select(0, inp.last_rows)  # uploaded: no blocking copy
        return StepLogits(last, context)

    def _eager(self, chunks: Sequence[SequenceChunk], num_splits: int | None = None,
               pending: DeviceTokens | None = None) -> torch.Tensor | None:
        if self.pipelined:
            parts = self._micro_batched(chunks, pending,
                                        lambda part, fed: self._forward(part, fed, num_splits))
            return None if parts is None else torch.cat(parts)
        return self._forward(chunks, pending, num_splits)

    def _forward(self, chunks: Sequence[SequenceChunk], pending: DeviceTokens | None,
                 num_splits: int | None = None) -> torch.Tensor | None:
        """One forward's logits [num_seqs, V] (None on a stage before the last)."""
        plan = make_plan(chunks, self.cache.allocator)
        inp = step_inputs(plan, self.uploader, self.rope, self.options.page_size,
                          num_splits or self.options.decode_splits, feeds_for(plan, pending))
        return self.model.forward(inp, self.cache)

    def _micro_batched(self, chunks: Sequence[SequenceChunk], pending: DeviceTokens | None,
                       run: Callable[[Sequence[SequenceChunk], DeviceTokens | None], _T | None],
                       ) -> list[_T] | None:
        """A pipeline engine's step: ``run`` (one forward) on each micro-batch in order, whose
        hidden states are sent on while this stage runs the next; returns once every send
        completed, with ``run``'s outputs (None on a stage before the last)."""
        lens = [len(c.tokens) for c in chunks]
        parts = split_micro_batches(lens, self.micro_batch_count(sum(lens)))
        outs = [run(chunks[part], _fed_in(pending, part)) for part in parts]
        self.shard.comm.wait_sent()
        return None if outs[0] is None else outs

    def micro_batch_count(self, tokens: int) -> int:
        """Micro-batches asked for a pipeline step of ``tokens`` tokens (before the split caps
        them at one per chunk): ``micro_batches``, or by default one per stage as far as the
        step has ``micro_batch_tokens`` tokens for each."""
        if self.options.micro_batches is not None:
            return self.options.micro_batches
        return max(1, min(self.shard.mapping.pp_size, tokens // self.options.micro_batch_tokens))

    def check_step(self, chunks: Sequence[SequenceChunk]) -> None:
        """Raise the contract's errors :meth:`step` would raise for ``chunks``, changing
        nothing (the cache's room is not checked: the step reserves what it grows into)."""
        limits = self.limits
        if len(chunks) > limits.max_batch_size:
            raise RuntimeError(f"step of {len(chunks)} chunks exceeds max_batch_size "
                               f"{limits.max_batch_size}")
        total, seen = 0, set()
        for c in chunks:
            if not 0 <= c.slot < limits.max_batch_size or c.slot in seen:
                raise RuntimeError(f"slot {c.slot} is out of range or used twice in one step")
            seen.add(c.slot)
            if not c.tokens:
                raise RuntimeError(f"slot {c.slot}: empty chunk")
            if c.start != self._lengths[c.slot]:
                raise RuntimeError(f"slot {c.slot}: chunk starts at {c.start} but the cache "
                                   f"holds {self._lengths[c.slot]} tokens")
            end = c.start + len(c.tokens)
            if end > limits.max_seq_len:
                raise RuntimeError(f"slot {c.slot}: {end} tokens exceed max_seq_len "
                                   f"{limits.max_seq_len}")
            total += len(c.tokens)
        if total > limits.max_num_tokens:
            raise RuntimeError(f"step of {total} tokens exceeds max_num_tokens "
                               f"{limits.max_num_tokens}")

    def _check(self, chunks: Sequence[SequenceChunk]) -> None:
        self.check_step(chunks)
        allocator = self.cache.allocator
        for c in chunks:  # only a valid step takes blocks
            end = c.start + len(c.tokens)
            if end > allocator.capacity(c.slot) and not allocator.reserve(c.slot, end):
                raise KVCacheError(f"slot {c.slot}: the KV cache has no free block for "
                                   f"{end} tokens; reserve() before scheduling the sequence")

    def close(self) -> None:
        self.graphs = None
        self.cache = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _fed_in(pending: DeviceTokens | None, part: slice) -> DeviceTokens | None:
    """``pending`` as the micro-batch of chunks ``part`` takes it (its own chunk indices)."""
    if pending is None:
        return None
    return DeviceTokens(pending.ids, {i - part.start: row for i, row in pending.feeds.items()
                                      if part.start <= i < part.stop})


def _joined(parts: list[StepLogits]) -> StepLogits:
    """The logits of a step's micro-batches, in order, as one forward's."""
    context, first = {}, 0
    for out in parts:
        context.update({first + i: x for i, x in out.context.items()})
        first += len(out.last)
    return StepLogits(torch.cat([out.last for out in parts]), context)
