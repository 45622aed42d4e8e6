"""The one generic sharder: applies a role's :class:`~kiln.roles.ShardSpec` to a full tensor.

``shard(full, role, config, mapping, tp_rank)`` gives the slice a tensor-parallel rank stores;
``unshard(shards, role, config, mapping)`` rebuilds the full tensor (dropping vocab padding
and KV-head replicas). ``unshard(shard(w)) == w`` holds for every role and valid tp_size.

Fused tensors are split per segment: rank r gets its part of q, of k and of v, concatenated.
A segment of ``heads`` heads with fewer heads than ranks is replicated: rank r gets head
``r * heads // tp_size`` (all ranks of one group share a KV head, as in Megatron/TensorRT-LLM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kiln.config import DecoderConfig, Mapping
from kiln.roles import SHARDING, Role, Segment, ShardSpec, parse_tensor, tensor_sharding


def _qkv_segments(config: DecoderConfig) -> list[Segment]:
    return [Segment(config.q_size, config.num_heads),
            Segment(config.kv_size, config.num_kv_heads),
            Segment(config.kv_size, config.num_kv_heads)]


def _gate_up_segments(config: DecoderConfig) -> list[Segment]:
    return [Segment(config.intermediate_size), Segment(config.intermediate_size)]


SEGMENT_RULES: dict[str, Callable[[DecoderConfig], list[Segment]]] = {
    "qkv": _qkv_segments,
    "gate_up": _gate_up_segments,
}


def _segments(role: Role, config: DecoderConfig, size: int, spec: ShardSpec) -> list[Segment]:
    if spec.segments is None:
        return [Segment(size)]
    segments = SEGMENT_RULES[spec.segments](config)
    total = sum(s.rows for s in segments)
    if total != size:
        raise ValueError(f"{role.name}: segments cover {total} rows, tensor has {size}")
    return segments


def padded_rows(size: int, tp_size: int) -> int:
    """``size`` rounded up to a multiple of ``tp_size``: the rows a padded role (the
    vocab-parallel lm_head) is split over, zero rows past ``size``."""
    return -(-size // tp_size) * tp_size


def _segment_part(seg: Segment, tp: int, tp_rank: int) -> tuple[int, int]:
    """(start, length) of rank tp_rank's part of a segment, relative to the segment."""
    if seg.heads is not None and seg.heads < tp:
        head_rows = seg.rows // seg.heads
        head = tp_rank * seg.heads // tp
        return head * head_rows, head_rows
    length = seg.rows // tp
    return tp_rank * length, length


def shard_ranges(role: Role, config: DecoderConfig, mapping: Mapping, tp_rank: int,
                 size: int, spec: ShardSpec | None = None) -> list[tuple[int, int]]:
    """Index ranges ``(start, stop)`` along the split dim that rank ``tp_rank`` stores.

    Ranges may run past ``size`` for a padded role: those rows are zero padding. ``spec``
    defaults to the role's (a quantized checkpoint's scales pass theirs: roles.tensor_sharding).
    """
    tp = mapping.tp_size
    spec = spec or SHARDING[role]
    if spec.pad_to_multiple:
        size = padded_rows(size, tp)
    ranges, offset = [], 0
    for seg in _segments(role, config, size, spec):
        start, length = _segment_part(seg, tp, tp_rank)
        ranges.append((offset + start, offset + start + length))
        offset += seg.rows
    return ranges


def shard(full: torch.Tensor, role: Role, config: DecoderConfig, mapping: Mapping,
          tp_rank: int, spec: ShardSpec | None = None) -> torch.Tensor:
    """The part of ``full`` that tensor-parallel rank ``tp_rank`` stores."""
    spec = spec or SHARDING[role]
    if spec.dim is None or mapping.tp_size == 1 and not spec.pad_to_multiple:
        return full
    dim = spec.dim
    size = full.shape[dim]
    parts = []
    for start, stop in shard_ranges(role, config, mapping, tp_rank, size, spec):
        real = full.narrow(dim, min(start, size), max(0, min(stop, size) - start))
        parts.append(real)
        if stop > max(start, size):  # zero padding past the real rows
            pad_shape = list(full.shape)
            pad_shape[dim] = stop - max(start, size)
            parts.append(full.new_zeros(pad_shape))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def shard_shape(shape: Sequence[int], role: Role, config: DecoderConfig, mapping: Mapping,
                tp_rank: int, spec: ShardSpec | None = None) -> tuple[int, ...]:
    """Shape of ``shard(...)`` for a full tensor of ``shape``, without any data."""
    spec = spec or SHARDING[role]
    out = list(shape)
    if spec.dim is not None:
        ranges = shard_ranges(role, config, mapping, tp_rank, shape[spec.dim], spec)
        out[spec.dim] = sum(stop - start for start, stop in ranges)
    return tuple(out)


def unshard(shards: Sequence[torch.Tensor], role: Role, config: DecoderConfig,
            mapping: Mapping, full_size: int | None = None,
            spec: ShardSpec | None = None) -> torch.Tensor:
    """Rebuild the full tensor from every tensor-parallel rank's shard (in tp_rank order).

    ``full_size`` (along the split dim) trims padding; it defaults to the model's vocab size
    for padded roles.
    """
    spec = spec or SHARDING[role]
    if len(shards) != mapping.tp_size:
        raise ValueError(f"{role.name}: expected {mapping.tp_size} shards, got {len(shards)}")
    if spec.dim is None:
        return shards[0]
    dim = spec.dim
    if full_size is None:
        if spec.pad_to_multiple:
            full_size = config.vocab_size
        elif spec.segments is not None:
            full_size = sum(seg.rows for seg in SEGMENT_RULES[spec.segments](config))
        else:
            full_size = sum(s.shape[dim] for s in shards)
    padded = padded_rows(full_size, mapping.tp_size) if spec.pad_to_multiple else full_size
    out_shape = list(shards[0].shape)
    out_shape[dim] = padded
    out = shards[0].new_empty(out_shape)
    for tp_rank, part in enumerate(shards):
        offset = 0
        for start, stop in shard_ranges(role, config, mapping, tp_rank, full_size, spec):
            out.narrow(dim, start, stop - start).copy_(part.narrow(dim, offset, stop - start))
            offset += stop - start
    return out.narrow(dim, 0, full_size)


def shard_named(name: str, full: torch.Tensor, config: DecoderConfig, mapping: Mapping,
                tp_rank: int) -> torch.Tensor:
    """:func:`shard` for any checkpoint tensor by name (quantized checkpoints' scales too)."""
    role, _, kind = parse_tensor(name)
    return shard(full, role, config, mapping, tp_rank, tensor_sharding(role, kind, full.dim()))


def unshard_named(name: str, shards: Sequence[torch.Tensor], config: DecoderConfig,
                  mapping: Mapping) -> torch.Tensor:
    """:func:`unshard` for any checkpoint tensor by name (quantized checkpoints' scales too)."""
    role, _, kind = parse_tensor(name)
    return unshard(shards, role, config, mapping,
                   spec=tensor_sharding(role, kind, shards[0].dim()))
