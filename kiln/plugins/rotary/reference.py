"""PyTorch reference of the rotary plugin (see :mod:`.spec`)."""

from __future__ import annotations

import torch


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, S, D]; cos/sin [P, D/2] with position_ids [B, S], or [B, S, D/2] without."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # [B, S, D/2]
    cos = torch.cat([cos, cos], dim=-1)[:, None]  # [B, 1, S, D]
    sin = torch.cat([sin, sin], dim=-1)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
