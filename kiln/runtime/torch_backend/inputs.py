"""Host side of a step: chunks -> flat int32 metadata (numpy) -> one host-to-device copy.

A :class:`StepPlan` is everything the forward needs, computed with a few vectorized numpy
operations (no per-token Python). :class:`Uploader` packs a plan into one pinned int32 buffer
and copies it to the device in one transfer; :class:`~kiln.runtime.torch_backend.model.StepInputs`
are views into the device copy. The pinned buffer is reused: an event makes the next step wait
until the device has read the previous one, so the host never overwrites data in flight. Each
array starts on a 16-byte boundary (:data:`ALIGN`): Triton specializes a pointer argument on its
divisibility by 16, and arrays packed end to end gave the attention kernels' index pointers an
alignment that depended on the sizes before them, so steps of new compositions compiled new
kernel variants during requests (on an H200, 9 compiles after the engine's warm-up in two rounds
of 16 requests, TTFT 1.9-3.4 s; none with the alignment, TTFT 25-58 ms: GPU_NOTES.md).

Pipeline engines split a step into micro-batches of whole chunks (:func:`split_micro_batches`),
each planned and uploaded on its own; one micro-batch's upload rewrites the device buffer in
stream order, after the kernels of the one before have read it.

Async scheduling: a step may take some tokens from the previous step's sampled ids, still on
the device (:class:`~kiln.runtime.executor.DeviceTokens`). :func:`feeds_for` turns them into
:class:`Feeds` (token rows of this step, rows of the ids) that travel in the same upload, and
:func:`feed_tokens` writes them into the uploaded token input on the device; the host never
reads them.

Rotary tables: positions index a table ``[max_seq_len, head_dim]`` (cos | sin, float32) built
once, exactly as the oracle computes ``cos(position * inv_freq)``. Dynamic NTK scaling changes
``inv_freq`` with a sequence's length (as HF recomputes it from the longest position of each
call), so those models get a per-step table with one row per token instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from kiln.config import DecoderConfig, PositionType, RopeScalingType
from kiln.reference import rope_inv_freq
from kiln.runtime.executor import DeviceTokens, SequenceChunk
from kiln.runtime.torch_backend.model import StepInputs
from kiln.runtime.torch_backend.paged_cache import BlockAllocator, cdiv


@dataclass
class StepPlan:
    """Host metadata of one step (int32 numpy arrays; see StepInputs for the meaning)."""

    tokens: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    last_rows: np.ndarray
    ends: np.ndarray  # [num_seqs] start + len: the context length after this step
    dec: np.ndarray  # chunk indices of single-token chunks
    pre: np.ndarray  # chunk indices of the others
    rows: np.ndarray  # [num_seqs] first row of each chunk
    lens: np.ndarray
    tables: np.ndarray  # [num_seqs, max_blocks_per_seq] block tables of the chunks' slots

    @property
    def num_seqs(self) -> int:
        return len(self.rows)

    @property
    def all_decode(self) -> bool:
        return len(self.pre) == 0


def make_plan(chunks: Sequence[SequenceChunk], allocator: BlockAllocator) -> StepPlan:
    n = len(chunks)
    meta = np.array([(c.slot, c.start, len(c.tokens)) for c in chunks], dtype=np.int32)
    slots, starts, lens = meta[:, 0], meta[:, 1], meta[:, 2]
    tables = allocator.tables[slots]
    page = allocator.page_size
    total = int(lens.sum())
    if total == n:  # all single-token chunks (decode): no ragged bookkeeping
        rows = np.arange(n, dtype=np.int32)
        tokens = np.array([c.tokens[0] for c in chunks], dtype=np.int32)
        slot_mapping = tables[rows, starts // page] * page + starts % page
        return StepPlan(tokens=tokens, positions=starts, slot_mapping=slot_mapping,
                        last_rows=rows, ends=starts + 1, dec=rows, pre=rows[:0], rows=rows,
                        lens=lens, tables=tables)
    tokens = np.fromiter((t for c in chunks for t in c.tokens), dtype=np.int32, count=total)
    rows = (np.cumsum(lens, dtype=np.int32) - lens).astype(np.int32)
    seq_of = np.repeat(np.arange(n), lens)
    positions = (np.arange(total, dtype=np.int32) - rows[seq_of] + starts[seq_of]).astype(np.int32)
    slot_mapping = (tables[seq_of, positions // page] * page + positions % page).astype(np.int32)
    single = lens == 1
    return StepPlan(tokens=tokens, positions=positions, slot_mapping=slot_mapping,
                    last_rows=rows + lens - 1, ends=starts + lens,
                    dec=np.flatnonzero(single), pre=np.flatnonzero(~single), rows=rows,
                    lens=lens, tables=tables)


def split_micro_batches(lens: Sequence[int], count: int) -> list[slice]:
    """A step's chunks (their token counts ``lens``) as ``min(count, len(lens))`` micro-batches:
    contiguous, non-empty slices in order, balanced by tokens. Cut k (the first k micro-batches
    take ``chunks[:cut]``) goes where the running token count is nearest k/count of the step's,
    ties to the earlier cut, after the previous cut and leaving a chunk to each later
    micro-batch; so a micro-batch holds at most ``sum(lens) / count + max(lens)`` tokens, and
    equal chunks (decode tokens) split as evenly as they can. Integer arithmetic: every rank
    of a pipeline engine splits the driver's plan alike."""
    n = len(lens)
    count = min(count, n)
    ends = np.cumsum(lens, dtype=np.int64) * count  # ends[i]: tokens of chunks[:i + 1], x count
    total = int(ends[-1]) // count
    cuts = [0]
    for k in range(1, count):
        lo, hi = cuts[-1] + 1, n - (count - k)  # the cut's range
        cuts.append(lo + int(np.argmin(np.abs(ends[lo - 1:hi] - total * k))))
    cuts.append(n)
    return [slice(a, b) for a, b in pairwise(cuts)]


@dataclass(frozen=True)
class Feeds:
    """Tokens of a step to take on the device: token row ``dst[i]`` <- ``ids[src[i]]``.
    ``prefix``: dst and src are both ``0..k-1`` (steady decoding: the scheduler keeps decode
    rows in order and first), one copy with no index tensors."""

    dst: np.ndarray  # int32 rows of the step's flat token input
    src: np.ndarray  # int32 rows of ids
    ids: torch.Tensor  # [rows] int64: the previous step's sampled tokens, on the device
    prefix: bool


def feeds_for(plan: StepPlan, pending: DeviceTokens | None) -> Feeds | None:
    """The feeds of ``pending`` (chunk index -> ids row) in ``plan``'s token rows: each fed
    token is its chunk's last one."""
    if pending is None or not pending.feeds:
        return None
    n = len(pending.feeds)
    chunks = np.fromiter(pending.feeds.keys(), np.int64, n)
    src = np.fromiter(pending.feeds.values(), np.int32, n)
    dst = plan.last_rows[chunks].astype(np.int32)
    order = np.arange(n, dtype=np.int32)
    return Feeds(dst, src, pending.ids, bool((dst == order).all() and (src == order).all()))


def feed_tokens(tokens: torch.Tensor, feeds: Feeds, dst: torch.Tensor | None = None,
                src: torch.Tensor | None = None) -> None:
    """``tokens[feeds.dst] = feeds.ids[feeds.src]`` on the device, no host read; ``dst`` and
    ``src`` are the index arrays already on the device (int32; not needed for a prefix)."""
    if feeds.prefix:
        k = len(feeds.dst)
        tokens[:k].copy_(feeds.ids[:k])
    else:
        tokens.index_copy_(0, dst.long(), feeds.ids.index_select(0, src).to(tokens.dtype))


class RopeTables:
    """Rotary cos|sin tables for a model (None for ALiBi models)."""

    def __init__(self, config: DecoderConfig, max_seq_len: int, device: torch.device):
        self.config = config
        self.device = device
        self.rotary = config.position_type is PositionType.ROPE
        scaling = config.rope_scaling
        self.dynamic = self.rotary and scaling is not None \
            and scaling.type is RopeScalingType.DYNAMIC
        self.table = None
        if self.rotary:
            positions = torch.arange(max_seq_len)
            self.table = self._cos_sin(positions, rope_inv_freq(config, 1)[None]).to(device)

    @staticmethod
    def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """[N, D] = cos | sin of positions [N] times inv_freq [N or 1, D/2] (float32)."""
        freqs = positions.float()[:, None] * inv_freq
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def per_token(self, plan: StepPlan) -> torch.Tensor:
        """A dynamic-NTK table with one row per token of the step (host, float32)."""
        seq_of = np.repeat(np.arange(plan.num_seqs), plan.lens)
        inv = torch.stack([rope_inv_freq(self.config, int(end)) for end in plan.ends])
        return self._cos_sin(torch.from_numpy(plan.positions), inv[torch.from_numpy(seq_of)])


ALIGN = 4  # int32 elements: 16 bytes, Triton's pointer specialization (module docstring)


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class Uploader:
    """One pinned int32 buffer -> one device buffer per step (see the module docstring)."""

    def __init__(self, device: torch.device, capacity: int = 1 << 16):
        self.device = device
        self._pin = device.type == "cuda"
        self._event = torch.cuda.Event() if self._pin else None
        self._host = self._dev = None
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        if self._event is not None:
            self._event.synchronize()
        self._host = torch.empty(capacity, dtype=torch.int32, pin_memory=self._pin)
        self._dev = torch.empty(capacity, dtype=torch.int32, device=self.device)

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Copy int32 arrays to the device in one transfer; returns device views (same shapes)."""
        total = sum(_aligned(a.size) for a in arrays)
        if total > self._host.numel():
            self._grow(max(total, 2 * self._host.numel()))
        if self._event is not None:
            self._event.synchronize()  # the device has read the previous step's data
        host = self._host.numpy()
        offset, spans = 0, []
        for a in arrays:
            host[offset:offset + a.size] = a.ravel()
            spans.append((offset, a.shape))
            offset += _aligned(a.size)
        if self._pin:
            dev = self._dev[:total]
            dev.copy_(self._host[:total], non_blocking=True)
            self._event.record()
        else:
            dev = self._host[:total].clone()
        return [dev[o:o + int(np.prod(shape))].view(shape) for o, shape in spans]


def step_inputs(plan: StepPlan, uploader: Uploader, rope: RopeTables, page_size: int,
                num_splits: int | None = None, feeds: Feeds | None = None) -> StepInputs:
    """Upload a plan for an eager (not graph-captured) forward, then apply its feeds."""
    ends = plan.ends
    dec, pre = plan.dec, plan.pre
    dec_ctx, pre_ctx = ends[dec], ends[pre]
    width_dec = cdiv(int(dec_ctx.max()), page_size) if len(dec) else 0
    width_pre = cdiv(int(pre_ctx.max()), page_size) if len(pre) else 0
    arrays = [plan.tokens, plan.positions, plan.slot_mapping, plan.last_rows,
              plan.rows[dec], dec_ctx, np.ascontiguousarray(plan.tables[dec, :width_dec]),
              plan.rows[pre], plan.lens[pre], pre_ctx,
              np.ascontiguousarray(plan.tables[pre, :width_pre])]
    if feeds is not None and not feeds.prefix:
        arrays += [feeds.dst, feeds.src]
    (tokens, positions, slots, last_rows, dec_rows, dec_ctx_t, dec_tables, pre_starts,
     pre_lens, pre_ctx_t, pre_tables, *fed) = uploader.upload(arrays)
    if feeds is not None:
        feed_tokens(tokens, feeds, *fed)
    table, index = rope.table, positions
    if rope.dynamic:
        table = rope.per_token(plan).to(rope.device, non_blocking=True)
        index = torch.arange(len(plan.tokens), dtype=torch.int32, device=rope.device)
    inp = StepInputs(tokens=tokens, rope_index=index, rope_table=table, slot_mapping=slots,
                     last_rows=last_rows)
    if len(dec):
        inp.dec_rows, inp.dec_ctx, inp.dec_tables = dec_rows, dec_ctx_t, dec_tables
        inp.dec_max_ctx, inp.dec_splits = int(dec_ctx.max()), num_splits
    if len(pre):
        inp.pre_starts, inp.pre_lens, inp.pre_ctx, inp.pre_tables = \
            pre_starts, pre_lens, pre_ctx_t, pre_tables
        inp.pre_max_q, inp.pre_max_ctx = int(plan.lens[pre].max()), int(pre_ctx.max())
        # one prompt from position 0 (its context is this chunk): kiln.plugins.attention.cudnn
        inp.pre_fresh = (not len(dec) and len(pre) == 1
                         and int(pre_ctx[0]) == int(plan.lens[pre][0]))
    return inp
