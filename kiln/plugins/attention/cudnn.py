"""Prefill of a fresh prompt through cuDNN's fused attention (torch's SDPA, cuDNN backend).

A prompt chunk that starts at position 0 attends only to its own keys. The rotary kernel has
just written them (and the values) into the paged cache; one Triton launch gathers both back
into contiguous ``[1, Hkv, L, D]`` tensors (:func:`~kiln.plugins.attention.triton_kernels
.gather_fresh_kv`), and ``scaled_dot_product_attention`` runs restricted to cuDNN, causal, with
the grouped-query heads as they are (``enable_gqa``).

cuDNN builds an execution plan for each shape it meets, ~39 ms on an H200, so a prompt of a
length it has not seen would wait that long. The sequence length is therefore padded to a
bucket (:func:`bucket`: a multiple of 256, or of an eighth of the length's power of two past
2,048, so at most 1/8 more rows there with pages of up to 256), and :func:`warm_up` builds every bucket's plan while the
engine loads. Padded query rows are zero and their outputs dropped; padded keys are zero and,
being after every real query, masked by causality.

On an H200, 2,048 tokens of 32 query / 8 key heads of 128 in bf16: cuDNN's attention 86 us, kiln's
Triton prefill kernel 118 us; 8,192 tokens: ~1,000 against 1,339 us
(benchmarks/issue12_fourteenth_pass/prefill_attention_backends.json). The Triton kernel stays
for everything else: a chunk with cached keys before it, several chunks in a step, ALiBi,
sliding windows, quantized caches, float32, and prompts under :data:`MIN_TOKENS`. Whether cuDNN
runs a model's heads on a device is asked once, at load (:func:`refusal`); the executor says
which kernel its fresh prompts take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Shorter fresh prompts keep the Triton kernel, which is as fast there
# (benchmarks/issue12_fourteenth_pass/prefill_attention_backends.json).
MIN_TOKENS = 1536
DTYPES = (torch.float16, torch.bfloat16)


def bucket(n: int, page: int) -> int:
    """The padded length of an ``n``-token prompt: a multiple of 256 (and of ``page``) up to
    2,048 tokens, then of an eighth of ``n``'s power of two."""
    step = max(256, page, (1 << (max(n, 1).bit_length() - 1)) // 8)
    return -(-n // step) * step


def dtype_refusal(dtype: torch.dtype) -> str | None:
    """None for activations cuDNN's attention takes, else why not."""
    if dtype in DTYPES:
        return None
    return (f"the activations are {str(dtype).removeprefix('torch.')}, and cuDNN's attention "
            f"takes float16 and bfloat16")


def refusal(device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int,
            dtype: torch.dtype) -> str | None:
    """None if cuDNN's attention runs these heads on ``device``, else why not (one line):
    one small causal call, checked against the math backend."""
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    if (why := dtype_refusal(dtype)) is not None:
        return why
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, num_heads, 80, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, num_kv_heads, 80, head_dim, device=device, dtype=dtype, generator=gen)
    try:
        got = _attention(q, k, k, head_dim ** -0.5)
    except RuntimeError as e:  # no kernel for this shape, dtype or device
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q.float(), k.float(), k.float(), is_causal=True,
                                              enable_gqa=num_heads != num_kv_heads)
    err = float((got.float() - want).abs().max())
    if not err <= 2e-2:  # a few units of the 16-bit output's rounding; NaN fails too
        return f"its output differs from the math backend by {err:.3g}"
    return None


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [1, Hq, L, D], k and v [1, Hkv, L, D]: causal attention through cuDNN only."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


def _padded_query(q: torch.Tensor, length: int) -> torch.Tensor:
    """q [S, Hq, D] -> [1, Hq, length, D] (a view of [length, Hq, D] rows, zero past S; q's
    own rows where S is the length already)."""
    s, hq, d = q.shape
    if s == length and q.is_contiguous():
        return q.transpose(0, 1)[None]
    rows = q.new_empty(length, hq, d)
    rows[:s].copy_(q)
    rows[s:].zero_()
    return rows.transpose(0, 1)[None]


def fresh_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            table: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Causal attention of a fresh prompt: ``q`` [S, Hq, D] (rows 0..S-1 at positions 0..S-1),
    its keys and values in the cache blocks ``table`` [>= cdiv(S, page)] (int32) names in
    order. Returns the output [S, Hq, D] (contiguous, q's dtype)."""
    from kiln.plugins.attention.triton_kernels import gather_fresh_kv

    s = q.shape[0]
    length = bucket(s, k_cache.shape[2])
    k, v = gather_fresh_kv(k_cache, v_cache, table, s, length)
    out = _attention(_padded_query(q, length), k, v, scale)
    return out[0].transpose(0, 1)[:s].contiguous()  # a view where cuDNN kept q's layout


def warm_up(device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int,
            dtype: torch.dtype, page: int, scale: float, max_tokens: int) -> list[int]:
    """Build cuDNN's plan for every bucket a fresh prompt of ``MIN_TOKENS..max_tokens`` tokens
    can take (as :func:`fresh_prefill_attention` calls it); returns those buckets."""
    lengths = sorted({bucket(n, page) for n in range(MIN_TOKENS, max_tokens + 1)})
    for length in lengths:
        q = torch.zeros(length, num_heads, head_dim, device=device, dtype=dtype)
        k = torch.zeros(1, num_kv_heads, length, head_dim, device=device, dtype=dtype)
        _attention(_padded_query(q, length), k, k, scale)
    return lengths
