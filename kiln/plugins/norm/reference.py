"""PyTorch reference of the norm plugin (see :mod:`.spec`)."""

from __future__ import annotations

import torch

from kiln.config import NormType


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: NormType,
         eps: float) -> torch.Tensor:
    x32 = x.float()
    if kind is NormType.RMSNORM:
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return y.to(x.dtype) * weight
    centered = x32 - x32.mean(-1, keepdim=True)
    y = (centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = y * weight
    return y if bias is None else y + bias
