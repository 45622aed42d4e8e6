"""PyTorch reference of the attention plugin (see :mod:`.spec`)."""

from __future__ import annotations

import torch


def update_cache(past: torch.Tensor, new: torch.Tensor, past_len: torch.Tensor) -> torch.Tensor:
    """past [B, Hkv, Smax, D] with new [B, Hkv, S, D] written at rows past_len[b]..+S."""
    present = past.clone()
    s = new.shape[2]
    for b, start in enumerate(past_len.tolist()):
        present[b, :, start:start + s] = new[b]
    return present


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
              past_value: torch.Tensor, past_len: torch.Tensor, mask: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, Hq, S, D], present_key, present_value); see the spec for shapes."""
    present_key = update_cache(past_key, k, past_len)
    present_value = update_cache(past_value, v, past_len)
    group = q.shape[1] // k.shape[1]
    keys = present_key.repeat_interleave(group, dim=1).float()
    values = present_value.repeat_interleave(group, dim=1)
    scores = (q.float() @ keys.transpose(-1, -2)) * scale
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    out = torch.softmax(scores, dim=-1).to(values.dtype) @ values
    return out, present_key, present_value
