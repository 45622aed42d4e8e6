"""PyTorch reference of the residual_norm plugin (see :mod:`.spec`)."""

from __future__ import annotations

import torch

from kiln.config import NormType
from kiln.plugins.norm.reference import norm


def residual_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, kind: NormType,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + delta
    return total, norm(total, weight, bias, kind, eps)
