"""PyTorch reference of the KV-cache update plugin (see :mod:`.spec`)."""

from __future__ import annotations

import torch


def update_cache(past: torch.Tensor, new: torch.Tensor, past_len: torch.Tensor) -> torch.Tensor:
    """past [B, Hkv, Smax, D] with new [B, Hkv, S, D] written at rows past_len[b]..+S."""
    present = past.clone()
    s = new.shape[2]
    for b, start in enumerate(past_len.tolist()):
        present[b, :, start:start + s] = new[b]
    return present
