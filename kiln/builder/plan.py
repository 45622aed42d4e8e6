"""Split each rank into parts of consecutive layers that fit the build-memory budget.

A part's cost is ``memory_factor * weight_bytes + base_memory`` (the backend's model of its
peak host RAM, e.g. TensorRT-RTX holds about 3.1x the weights of the network it builds). Parts
are filled greedily in layer order; the first part of the first stage carries the embedding,
the last part of the last stage the final norm and lm_head.
"""

from __future__ import annotations

import logging

from kiln.builder.graph.context import PartSpec, RankWeights
from kiln.checkpoint import CheckpointConfig
from kiln.engine import EngineError
from kiln.roles import FIRST_STAGE_ROLES, LAST_STAGE_ROLES, tensor_names

log = logging.getLogger(__name__)
GB = 1e9


def _gb(n: float) -> str:
    """Bytes as GB for a message, in MB under 0.1 GB (never "0.0 GB")."""
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{max(1, round(n / 1e6))} MB"


def plan_rank(ckpt: CheckpointConfig, rank: int, weights: RankWeights, budget: int | None,
              memory_factor: float, base_memory: int) -> list[PartSpec]:
    """The parts of ``rank`` (one part when ``budget`` is None)."""
    _, pp_rank = ckpt.mapping.coords(rank)
    layers = ckpt.mapping.stage_layers(pp_rank, ckpt.decoder.num_layers)
    first, last = pp_rank == 0, pp_rank == ckpt.mapping.pp_size - 1
    sizes = [weights.nbytes(tensor_names(ckpt.decoder, range(i, i + 1), first_stage=False,
                                         last_stage=False, quant=ckpt.quantization))
             for i in layers]
    embed = weights.nbytes([r.name() for r in FIRST_STAGE_ROLES]) if first else 0
    head = weights.nbytes([r.name() for r in LAST_STAGE_ROLES]) if last else 0
    sizes[0] += embed
    sizes[-1] += head
    groups = _split(sizes, budget, memory_factor, base_memory, rank)
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


def _split(sizes: list[int], budget: int | None, factor: float, base: int, rank: int) -> list[int]:
    """Layer counts per part, greedy in order."""
    if budget is None:
        return [len(sizes)]
    groups, current, count = [], 0, 0
    for size in sizes:
        need = factor * size + base
        if need > budget:
            raise EngineError(
                f"rank {rank}: one layer (with the embedding or head it carries) needs about "
                f"{_gb(need)} of host RAM to build, over the {_gb(budget)} budget "
                f"per worker; raise --max_build_memory or lower --workers")
        if count and factor * (current + size) + base > budget:
            groups.append(count)
            current, count = 0, 0
        current += size
        count += 1
    groups.append(count)
    return groups
