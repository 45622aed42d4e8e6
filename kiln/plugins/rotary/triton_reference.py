"""PyTorch reference of the Triton rotary kernel: split QKV, rotate q and k, write k/v to a paged cache.

Contract (shared with :mod:`kiln.plugins.rotary.triton_kernels`, tested against each other):

``rope_qkv_to_cache(qkv, table, table_index, k_cache, v_cache, slot_mapping, *, num_heads,
num_kv_heads, head_dim, clip=None) -> q``

- ``qkv`` [T, (Hq + 2*Hkv) * D]: the fused projection of T packed tokens, ``[q | k | v]`` per
  row (rows may be strided).
- ``table`` float32 [P, D] (cos in ``[:, :D/2]``, sin in ``[:, D/2:]``) and ``table_index`` [T]
  (the row of ``table`` each token uses: its position, or its own row for per-token tables).
  ``table`` None means no rotary embedding (ALiBi models): q and k pass through.
- Rotate-half convention (HF Llama): ``out = x * cos + rotate_half(x) * sin`` with
  ``rotate_half(x) = [-x2, x1]``, computed in float32 and rounded once to the model dtype.
- ``clip``: clamp q, k and v to ``[-clip, clip]`` first (MPT/DBRX ``clip_qkv``).
- Paged cache layout ``[num_blocks, Hkv, page_size, D]``; token t is written to block
  ``slot_mapping[t] // page_size``, row ``slot_mapping[t] % page_size``. Keys are stored after
  rotation.
- Quantized cache (``k_cache``/``v_cache`` float8_e4m3fn or int8): ``k_scale`` and ``v_scale``
  (float32 scalar tensors, the checkpoint's per-layer KV-cache scales) are required; keys and
  values are first rounded to q's dtype, then stored as ``quantize_values(x, scale)`` of
  :mod:`kiln.quantization.formats` (saturating; fp8 round to nearest even, int8 round half to
  even). A 16/32-bit cache takes no scales.
- Returns the rotated q as a new contiguous tensor [T, Hq, D].
"""

from __future__ import annotations

import torch

from kiln.plugins.rotary.reference import rotary
from kiln.quantization.formats import quantize_values

QUANTIZED_CACHE = {torch.float8_e4m3fn: "float8_e4m3fn", torch.int8: "int8"}


def check_cache_scales(cache_dtype: torch.dtype, k_scale: torch.Tensor | None,
                       v_scale: torch.Tensor | None) -> str | None:
    """The formats dtype name of a quantized cache (None for a float one); checks the scales."""
    quantized = QUANTIZED_CACHE.get(cache_dtype)
    if any((quantized is not None) != (scale is not None) for scale in (k_scale, v_scale)):
        raise ValueError(f"a {cache_dtype} KV cache needs k_scale and v_scale exactly when it is "
                         f"quantized (float8_e4m3fn or int8)")
    return quantized


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None,
             quantized: str | None) -> torch.Tensor:
    """Keys or values (q's dtype) as the cache stores them."""
    if quantized is None:
        return x.to(cache_dtype)
    return quantize_values(x, scale.float().reshape(()), quantized)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in float32 through the rotary plugin's reference.

    x [T, H, D]; cos, sin [T, D/2] float32 -> float32 [T, H, D].
    """
    # [T, H, D] -> [1, H, T, D], the plugin reference's [B, H, S, D]
    out = rotary(x.float().transpose(0, 1)[None], cos[None], sin[None])
    return out[0].transpose(0, 1)


def rope_qkv_to_cache(qkv: torch.Tensor, table: torch.Tensor | None, table_index: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      *, num_heads: int, num_kv_heads: int, head_dim: int,
                      clip: float | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    quantized = check_cache_scales(k_cache.dtype, k_scale, v_scale)
    t = qkv.shape[0]
    d, hq, hkv = head_dim, num_heads, num_kv_heads
    if clip is not None:
        qkv = qkv.clamp(-clip, clip)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    # [T, H*D] -> [T, H, D]
    q, k, v = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
    if table is not None:
        cs = table[table_index.long()]
        cos, sin = cs[:, : d // 2], cs[:, d // 2:]
        q = rotate(q, cos, sin).to(qkv.dtype)
        k = rotate(k, cos, sin).to(qkv.dtype)
    page = k_cache.shape[2]
    slots = slot_mapping.long()
    blocks, rows = slots // page, slots % page
    k_cache[blocks, :, rows, :] = to_cache(k, k_cache.dtype, k_scale, quantized)
    v_cache[blocks, :, rows, :] = to_cache(v, v_cache.dtype, v_scale, quantized)
    return q.contiguous()
