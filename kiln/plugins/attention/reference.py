"""PyTorch reference of the attention plugin (see :mod:`.spec`)."""

from __future__ import annotations

import torch


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
              scale: float) -> torch.Tensor:
    """out [B, Hq, S, D]; see the spec for shapes and the mask kinds."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).float()
    values = values.repeat_interleave(group, dim=1)
    scores = (q.float() @ keys.transpose(-1, -2)) * scale
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    return torch.softmax(scores, dim=-1).to(values.dtype) @ values
