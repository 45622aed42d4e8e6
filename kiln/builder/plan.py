"""Split each rank into parts of consecutive layers that fit the build-memory budget.

A part's cost is ``memory_factor * weight_bytes + base_memory`` (the backend's model of its
peak host RAM, e.g. TensorRT-RTX holds about 3.1x the weights of the network it builds), plus,
for a backend that streams tensors one at a time (``tensor_copies`` > 0), its largest tensor
as read plus that many copies at the build's size. Parts are filled greedily in layer order;
the first part of the first stage carries the embedding, the last part of the last stage the
final norm and lm_head.
"""

from __future__ import annotations

import logging

from kiln.builder.graph.context import PartSpec, RankWeights
from kiln.checkpoint import CheckpointConfig
from kiln.engine import EngineError
from kiln.errors import option
from kiln.roles import FIRST_STAGE_ROLES, LAST_STAGE_ROLES, tensor_names
from kiln.sizes import size_text

log = logging.getLogger(__name__)
GB = 1e9


def plan_rank(ckpt: CheckpointConfig, rank: int, weights: RankWeights, budget: int | None,
              memory_factor: float, base_memory: int, tensor_copies: int = 0,
              workers: int = 1) -> list[PartSpec]:
    """The parts of ``rank`` (one part when ``budget``, per worker of ``workers``, is None)."""
    _, pp_rank = ckpt.mapping.coords(rank)
    layers = ckpt.mapping.stage_layers(pp_rank, ckpt.decoder.num_layers)
    first, last = pp_rank == 0, pp_rank == ckpt.mapping.pp_size - 1
    names = [tensor_names(ckpt.decoder, range(i, i + 1), first_stage=False, last_stage=False,
                          quant=ckpt.quantization) for i in layers]
    names[0] += [r.name() for r in FIRST_STAGE_ROLES] if first else []
    names[-1] += [r.name() for r in LAST_STAGE_ROLES] if last else []
    sizes = [weights.nbytes(layer) for layer in names]

    def streamed(name: str) -> int:  # a tensor as read, and its copies at the build's size
        stored, built = weights.sizes(name)
        return stored + tensor_copies * built

    peaks = [max((streamed(n) for n in layer if n in weights.infos), default=0)
             if tensor_copies else 0 for layer in names]
    groups = _split(sizes, peaks, budget, memory_factor, base_memory, rank, workers)
    parts, start = [], layers.start
    for k, count in enumerate(groups):
        parts.append(PartSpec(rank=rank, layers=range(start, start + count),
                              first=first and k == 0, last=last and k == len(groups) - 1,
                              index=k, count=len(groups)))
        start += count
    if len(parts) > 1:
        log.info("rank %d: %d parts of layers %s to fit %.1f GB", rank, len(parts),
                 [f"{p.layers.start}-{p.layers.stop - 1}" for p in parts], (budget or 0) / GB)
    return parts


def _split(sizes: list[int], peaks: list[int], budget: int | None, factor: float, base: int,
           rank: int, workers: int) -> list[int]:
    """Layer counts per part, greedy in order: a part of layers ``L`` needs
    ``factor * sum(sizes[L]) + max(peaks[L]) + base``."""
    if budget is None:
        return [len(sizes)]
    groups, current, peak, count = [], 0, 0, 0
    for size, layer_peak in zip(sizes, peaks, strict=True):
        need = factor * size + layer_peak + base
        if need > budget:
            raise EngineError(
                f"rank {rank}: one layer (with the embedding or head it carries) needs about "
                f"{size_text(need, 'decimal')} of host RAM to build, over the "
                f"{size_text(budget, 'decimal')} budget per worker; "
                f"raise {option('max_build_memory')}"
                + (f" or lower {option('workers')} ({workers})" if workers > 1 else ""))
        if count and factor * (current + size) + max(peak, layer_peak) + base > budget:
            groups.append(count)
            current, peak, count = 0, 0, 0
        current += size
        peak = max(peak, layer_peak)
        count += 1
    groups.append(count)
    return groups
