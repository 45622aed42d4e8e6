"""PyTorch reference of the sampler's greedy pass over a step's logits rows.

Contract, shared with :mod:`kiln.plugins.greedy.triton_kernels`:
``finite_argmax(logits) -> (packed, ids)``

- ``logits`` [B, V] (any float dtype, rows with unit stride along V).
- ``packed`` [2B] float64 on the logits' device: B flags (1.0 where every value of the row is
  finite, else 0.0), then B argmax indices (the first index of the row's largest value;
  indices below 2^53 are exact in float64): the first part of the one array the sampler
  copies to the host each step (:func:`kiln.runtime.sampling.launch_rows_torch`).
- ``ids`` [B] int64: the same argmax indices, for the next step to take on the device. A row
  with a NaN or an infinity gets an index in ``[0, V)`` that is otherwise unspecified (the
  sampler fails such a row; the index only has to be a valid token for the step it feeds).
"""

from __future__ import annotations

import torch


def finite_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    finite = torch.isfinite(logits).all(-1)
    ids = logits.argmax(-1)
    return torch.cat([finite.double(), ids.double()]), ids
