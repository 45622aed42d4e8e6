"""CUDA graphs of decode steps, one per batch size in a fixed set.

A decode step launches ~10 kernels per layer; at batch 1 the GPU finishes most of them faster
than Python can launch them. Capturing the whole forward once per batch size and replaying it
makes a step one launch. A step of n single-token chunks replays the graph of the smallest
captured size >= n, with the extra rows padded: they read and write scratch block 0 only (see
:mod:`~kiln.runtime.torch_backend.paged_cache`) and their logits are dropped.

Static inputs, per captured size bs: one int32 device buffer ``[tokens | positions | slots |
ctx | rows | tables (bs x max_blocks) | feed dst | feed src]`` that a step fills with one
host-to-device copy, and for dynamic-NTK models a float32 per-token rotary table. Under async
scheduling some tokens are still on the device (the previous step's sampled ids): the feed
fields name them, and a device gather writes them into the static token field after the copy,
before the replay (:func:`~kiln.runtime.torch_backend.inputs.feed_tokens`). The decode
kernel's split count is fixed at capture from ``max_seq_len``; each row divides its own keys
among those splits, and programs past a row's context exit early.
All graphs share one memory pool and write logits into one ``[max_bs, vocab]`` buffer.

Each graph ends with the sampler's greedy pass over its logits (every row's finite flag and
argmax, :func:`~kiln.runtime.sampling.finite_argmax`), so that a decode step hands the sampler
a :class:`~kiln.runtime.executor.GreedyHead` instead of logits to scan: no float32 copy of the
logits and no launches between the lm_head and the sampler's read (at batch 1 on an H200 they
took ~25 us a token, ~1% of an FP8 step). The head is copied to pinned host memory on a side
stream after the replay; the next replay waits for that copy (on the device), since it
rewrites the head's buffer.

A tensor-parallel rank's graphs hold its NCCL collectives (see
:mod:`~kiln.runtime.torch_backend.executor`). They are captured in ``thread_local`` mode:
NCCL's watchdog thread queries its own events while a rank captures, which the default mode
would count as an error of the capture.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from kiln.runtime.executor import GreedyHead
from kiln.runtime.sampling import finite_argmax
from kiln.runtime.torch_backend.inputs import Feeds, RopeTables, StepPlan, feed_tokens
from kiln.runtime.torch_backend.model import PagedDecoder, StepInputs
from kiln.runtime.torch_backend.paged_cache import PagedKVCache

logger = logging.getLogger(__name__)


def default_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, then every 16 up to 128, every 32 up to 256, every 64 beyond."""
    sizes = [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 257, 32)) \
        + list(range(320, max(max_batch_size, 320) + 1, 64))
    sizes = [s for s in sizes if s < max_batch_size]
    return sorted(set(sizes + [max_batch_size]))


_PAD = np.array([[0], [0], [0], [1]], dtype=np.int32)


class _Graph:
    def __init__(self, bs: int, max_blocks: int, head_dim: int, dynamic: bool,
                 device: torch.device):
        self.bs = bs
        self.fields = 5 * bs + bs * max_blocks + 2 * bs  # the last 2 bs: feed dst, src
        self.host = torch.zeros(self.fields, dtype=torch.int32, pin_memory=True)
        self.host[4 * bs:5 * bs] = torch.arange(bs, dtype=torch.int32)  # rows, constant
        self.dev = torch.zeros(self.fields, dtype=torch.int32, device=device)
        self.table = torch.zeros(bs, head_dim, device=device) if dynamic else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.head: torch.Tensor | None = None  # [flags | argmax] float64 [2 bs] (captured)
        self.ids: torch.Tensor | None = None  # argmax int64 [bs] (captured)

    def views(self, max_blocks: int) -> list[torch.Tensor]:
        bs, d = self.bs, self.dev
        end = 5 * bs + bs * max_blocks
        return [d[i * bs:(i + 1) * bs] for i in range(5)] + [d[5 * bs:end].view(bs, max_blocks)]

    def feeds(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Device and host views of the feed fields (dst, src)."""
        at, bs, host = self.fields - 2 * self.bs, self.bs, self.host.numpy()
        return (self.dev[at:at + bs], self.dev[at + bs:], host[at:at + bs], host[at + bs:])


class DecodeGraphs:
    """Captured decode forwards (see the module docstring)."""

    def __init__(self, model: PagedDecoder, cache: PagedKVCache, rope: RopeTables,
                 batch_sizes: list[int], max_seq_len: int, device: torch.device):
        self.model, self.cache, self.rope = model, cache, rope
        self.max_seq_len = max_seq_len
        self.max_blocks = cache.allocator.max_blocks_per_seq
        self.sizes = sorted(batch_sizes)
        # the whole vocab: tp 1's lm_head has its rows (roles.expected_shape), tp > 1's logits
        # are gathered and cut to it. (Not the head's weight shape: a quantized head's
        # QuantLinear stores INT4 as [N / 16, ...] fragment words.)
        self.logits = torch.empty(self.sizes[-1], model.config.vocab_size, dtype=model.dtype,
                                  device=device)
        self.graphs = {bs: _Graph(bs, self.max_blocks, model.config.head_dim, rope.dynamic,
                                  device) for bs in self.sizes}
        self._event = torch.cuda.Event()
        self._copy_stream = torch.cuda.Stream(device)
        self._copied: torch.cuda.Event | None = None  # the last head's copy to the host
        self._capture(device)

    def _inputs(self, g: _Graph) -> StepInputs:
        tokens, positions, slots, ctx, rows, tables = g.views(self.max_blocks)
        table, index = self.rope.table, positions
        if g.table is not None:
            table, index = g.table, rows
        return StepInputs(tokens=tokens, rope_index=index, rope_table=table, slot_mapping=slots,
                          last_rows=None, dec_rows=rows, dec_tables=tables, dec_ctx=ctx,
                          dec_max_ctx=self.max_seq_len)

    def _capture(self, device: torch.device) -> None:
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        for bs in reversed(self.sizes):  # largest first: later graphs reuse its pool memory
            g = self.graphs[bs]
            g.dev[4 * bs:5 * bs].copy_(torch.arange(bs, dtype=torch.int32))  # rows
            g.dev[3 * bs:4 * bs].fill_(1)  # ctx 1: a padded row sees its own scratch key
            inp = self._inputs(g)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels, settle cuBLAS workspaces
                    self.model.forward(inp, self.cache, logits_out=self.logits[:bs])
                    finite_argmax(self.logits[:bs])
            torch.cuda.current_stream(device).wait_stream(stream)
            g.graph = torch.cuda.CUDAGraph()
            mode = "thread_local" if self.model.shard.tp_size > 1 else "global"
            with torch.cuda.graph(g.graph, pool=pool, stream=stream, capture_error_mode=mode):
                self.model.forward(inp, self.cache, logits_out=self.logits[:bs])
                g.head, g.ids = finite_argmax(self.logits[:bs])
        torch.cuda.synchronize(device)
        logger.info("captured %d decode graphs (batch sizes %s) in %.1f s", len(self.sizes),
                    self.sizes, time.perf_counter() - started)

    def size_for(self, n: int) -> int | None:
        for bs in self.sizes:
            if bs >= n:
                return bs
        return None

    def run(self, plan: StepPlan, feeds: Feeds | None = None,
            ) -> tuple[torch.Tensor, GreedyHead]:
        """Replay the graph for a decode-only plan (its ``feeds`` gathered on the device):
        logits [n, vocab] in the model dtype (valid until the next replay) and the greedy
        pass over them, on its way to the host."""
        n = plan.num_seqs
        g = self.graphs[self.size_for(n)]
        bs, mb = g.bs, self.max_blocks
        self._event.synchronize()  # the previous replay has read its pinned inputs
        host = g.host.numpy()
        fields = host[:4 * bs].reshape(4, bs)  # the rows field after them never changes
        fields[0, :n], fields[1, :n] = plan.tokens, plan.positions
        fields[2, :n], fields[3, :n] = plan.slot_mapping, plan.ends
        tables = host[5 * bs:5 * bs + bs * mb].reshape(bs, mb)
        tables[:n] = plan.tables
        if n < bs:  # padding rows: token 0 at position 0 of scratch block 0, context 1
            fields[:, n:] = _PAD
            tables[n:] = 0
        indices = ()
        if feeds is not None and not feeds.prefix:
            dst_dev, src_dev, dst_host, src_host = g.feeds()
            k = len(feeds.dst)
            dst_host[:k], src_host[:k] = feeds.dst, feeds.src
            indices = (dst_dev[:k], src_dev[:k])
        g.dev.copy_(g.host, non_blocking=True)
        if feeds is not None:
            feed_tokens(g.dev[:bs], feeds, *indices)
        if g.table is not None:
            g.table[:n].copy_(self.rope.per_token(plan), non_blocking=True)
        main = torch.cuda.current_stream(self.logits.device)
        if self._copied is not None:  # the last head's copy has read its buffer
            main.wait_event(self._copied)
        self._event.record()
        g.graph.replay()
        self._copy_stream.wait_stream(main)
        host = torch.empty(2 * bs, dtype=torch.float64, pin_memory=True)
        with torch.cuda.stream(self._copy_stream):
            host.copy_(g.head, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return self.logits[:n], GreedyHead(host, self._copied, g.ids)
