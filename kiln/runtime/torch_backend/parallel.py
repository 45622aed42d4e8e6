"""Which part of a tensor/pipeline-parallel model one rank of the torch backend holds, and the
collectives its forward calls.

A :class:`RankShard` is what :class:`~kiln.runtime.torch_backend.model.PagedDecoder` and the
executor need to run one rank: the mapping, the rank, and (world size > 1) a
:class:`Collectives` implementation. The forward calls, per step:

- tensor parallel (tp_size > 1): :meth:`Collectives.all_reduce` of the row-parallel partial sums
  (attention ``o`` and MLP ``down``; once per layer for a parallel-residual block, whose two
  partial sums are added first), and :meth:`Collectives.gather_vocab` of the vocab-parallel
  lm_head's logits (each rank computes ``padded_vocab / tp_size`` columns);
- pipeline parallel (pp_size > 1): a stage other than the first takes the residual stream
  ``[T, hidden]`` from :meth:`Collectives.recv_hidden`, a stage other than the last hands its
  own to :meth:`Collectives.send_hidden` (tensor-parallel rank t of stage s sends to rank t of
  stage s + 1; all ranks of a stage hold the same stream after the all-reduce). A step runs in
  micro-batches (:mod:`kiln.runtime.torch_backend.executor`), one forward each: the sends of
  a step only start (the stage goes on with its next micro-batch while the next stage takes
  this one), arrive in the order they were made, and the executor waits for them all
  (:meth:`Collectives.wait_sent`) before the step returns.

The implementation over torch.distributed lives in :mod:`kiln.runtime.distributed`; this module
only states the contract, so the torch backend never imports process management.

Non-goals: sequence parallelism, expert parallelism.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kiln.config import DecoderConfig, Mapping


class Collectives(ABC):
    """The communication one rank's forward needs (see the module docstring)."""

    @abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks of this rank's stage, in place; returns ``x``."""

    @abstractmethod
    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, V / tp]`` per rank -> ``[n, V]`` (tensor-parallel rank order) on every rank."""

    @abstractmethod
    def send_hidden(self, x: torch.Tensor) -> None:
        """Start handing this stage's residual stream ``[T, hidden]`` to the next stage and
        return without waiting for it to arrive; ``x`` is kept, and must not change, until
        :meth:`wait_sent`."""

    @abstractmethod
    def wait_sent(self) -> None:
        """Wait until every :meth:`send_hidden` since the last call has completed (on CUDA:
        work queued after this call runs after them); their tensors are then released."""

    @abstractmethod
    def recv_hidden(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The previous stage's residual stream: ``[rows, hidden]``, ``like``'s dtype/device."""

    @abstractmethod
    def min_over_world(self, value: int) -> int:
        """The smallest ``value`` of all ranks (the KV-cache block count every rank can hold)."""


@dataclass(frozen=True)
class RankShard:
    """One rank of ``mapping``; ``comm`` is None only when the world size is 1."""

    mapping: Mapping = Mapping()
    rank: int = 0
    comm: Collectives | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.mapping.world_size:
            raise ValueError(f"rank {self.rank} is outside the mapping's "
                             f"{self.mapping.world_size} ranks")
        if self.mapping.world_size > 1 and self.comm is None:
            raise ValueError("a rank of a world larger than 1 needs collectives")

    @property
    def tp_rank(self) -> int:
        return self.mapping.coords(self.rank)[0]

    @property
    def pp_rank(self) -> int:
        return self.mapping.coords(self.rank)[1]

    @property
    def tp_size(self) -> int:
        return self.mapping.tp_size

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.mapping.pp_size - 1

    def layers(self, config: DecoderConfig) -> range:
        """Global indices of this rank's layers."""
        return self.mapping.stage_layers(self.pp_rank, config.num_layers)

    def describe(self) -> str:
        return rank_label(self.mapping, self.rank)


def rank_label(mapping: Mapping, rank: int) -> str:
    """``rank 3 (tp 1, stage 1)``: a rank as messages name it."""
    tp_rank, pp_rank = mapping.coords(rank)
    return f"rank {rank} (tp {tp_rank}, stage {pp_rank})"
