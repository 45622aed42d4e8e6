"""PyTorch reference of the gqa plugin: the rotary, kv_cache and attention references composed."""

from __future__ import annotations

import torch

from kiln.plugins.attention.reference import attention
from kiln.plugins.gqa.spec import GqaAttrs
from kiln.plugins.kv_cache.reference import update_cache
from kiln.plugins.rotary.reference import rotary


def gqa(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
        past_len: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        attrs: GqaAttrs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, S, Hq * D], present_key, present_value) for right-padded rows of qkv
    [B, S, (Hq + 2 Hkv) * D] whose tokens sit at positions ``past_len[b] + j``."""
    b, s, _ = qkv.shape
    hq, hkv, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    q, k, v = (t.reshape(b, s, -1, d).transpose(1, 2)
               for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    positions = past_len[:, None] + torch.arange(s)[None]  # [B, S]
    q, k = rotary(q, cos, sin, positions), rotary(k, cos, sin, positions)
    keys, values = update_cache(past_key, k, past_len), update_cache(past_value, v, past_len)
    slots = torch.arange(past_key.shape[2])[None, None, None, :]
    query_pos = positions[:, None, :, None]
    mask = slots <= query_pos  # [B, 1, S, Smax]
    if attrs.sliding_window is not None:
        mask &= slots > query_pos - attrs.sliding_window
    out = attention(q, keys, values, mask, attrs.scale)  # [B, Hq, S, D]
    return out.transpose(1, 2).reshape(b, s, hq * d), keys, values
