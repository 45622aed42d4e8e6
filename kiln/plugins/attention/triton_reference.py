"""PyTorch reference of the Triton paged-attention kernels (decode and packed prefill).

Built on the attention plugin's reference (:func:`kiln.plugins.attention.reference.attention`):
each sequence's keys/values are gathered from the paged cache into a contiguous one, and the
causal / sliding-window / ALiBi rules below become its explicit mask.

Contract, shared with :mod:`kiln.plugins.attention.triton_kernels`:

Cache layout: ``k_cache``/``v_cache`` ``[num_blocks, Hkv, page_size, D]`` (keys after rotary).
Sequence b owns the blocks ``block_tables[b, :]`` (int32); its token at position p lives in
block ``block_tables[b, p // page_size]``, row ``p % page_size``. ``ctx_lens[b]`` is the number
of cached tokens of sequence b *including* the ones being queried (they were written first).

Queries are rows of one packed tensor ``q [T, Hq, D]``; the output ``out [T, Hq, D]`` is written
at the same rows (other rows are left untouched).

- ``paged_decode_attention``: sequence b has one query, row ``q_rows[b]``, at position
  ``ctx_lens[b] - 1``.
- ``paged_prefill_attention``: sequence b has ``q_lens[b]`` queries, rows ``q_starts[b] + i``,
  at positions ``ctx_lens[b] - q_lens[b] + i`` (a chunk of a prefill after earlier chunks).

Masking: a query at position p sees keys at positions k <= p, and with ``sliding_window`` W
only k > p - W. ``alibi_slopes`` [Hq] float32 adds ``slope[h] * k`` to the score (HF's
key-position form; equal to the relative form under softmax). Scores are ``q.k * scale``; GQA/
MQA map query head h to key head ``h // (Hq // Hkv)``. Softmax in float32.

Quantized cache (float8_e4m3fn or int8, written by the rotary kernel): ``k_scale`` and
``v_scale`` (float32 scalar tensors) are required, and each cached key/value is read as
``(stored * scale)`` rounded to q's dtype (what the reference decoder's fake-quantized cache
holds) before the products: the Triton prefill does exactly this; its decode over a float8 cache
with 16-bit queries keeps the stored values exact and applies the scales to the scores and the output instead
(within the same tolerances; triton_kernels' docstring).

FP8 output (decode and prefill; ``quant_scale``, a static FP8 input scale of the projection that
reads the output, a float32 scalar tensor; ``pre_quant_scale``, that projection's smoothing
vector ``[Hq * D]``, or None): ``out`` is float8_e4m3fn and each row is the projection's own
quantization of the output: rounded to q's dtype, times ``pre_quant_scale`` in float32 and
rounded again (as the projection applies it), then ``fp8(clamp(o / quant_scale, -448, 448))``
(:func:`kiln.plugins.quant_linear.triton_reference.quantize_fp8_input`), so the projection takes
it without a pass of its own.

``max_ctx_len`` / ``max_q_len`` (host ints bounding ``ctx_lens`` / ``q_lens``) and
``num_splits`` size the Triton launch grid; the reference only checks the bounds.
"""

from __future__ import annotations

import math

import torch

from kiln.plugins.attention.reference import attention
from kiln.plugins.quant_linear.triton_reference import quantize_fp8_input
from kiln.plugins.rotary.triton_reference import check_cache_scales


def gather_keys(cache: torch.Tensor, table_row: torch.Tensor, length: int,
                scale: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                ) -> torch.Tensor:
    """One sequence's cached rows [length, Hkv, D] from a paged cache; with ``scale``, a
    quantized cache's rows dequantized into ``dtype``."""
    page = cache.shape[2]
    pos = torch.arange(length, device=cache.device)
    blocks = table_row.long()[pos // page]
    rows = cache[blocks, :, pos % page, :]
    return rows if scale is None else (rows.float() * scale.float().reshape(())).to(dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, *,
           scale: float, alibi_slopes: torch.Tensor | None,
           sliding_window: int | None) -> torch.Tensor:
    """q [S, Hq, D] at positions qpos [S]; k, v [L, Hkv, D] at positions 0..L-1 -> [S, Hq, D]."""
    s, length = q.shape[0], k.shape[0]
    kpos = torch.arange(length, device=q.device)
    allowed = kpos[None, :] <= qpos[:, None]
    if sliding_window is not None:
        allowed &= kpos[None, :] > qpos[:, None] - sliding_window
    mask = torch.zeros(allowed.shape, device=q.device).masked_fill(~allowed, -math.inf)
    if alibi_slopes is not None:
        mask = mask + alibi_slopes.float()[:, None, None] * kpos.float()[None, None, :]
    mask = mask.expand(q.shape[1], s, length)[None]  # float32 additive [1, Hq, S, L]
    # [S, Hq, D] -> [1, Hq, S, D]; [L, Hkv, D] -> [1, Hkv, L, D]
    out = attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                    mask, scale)
    return out[0].transpose(0, 1)  # [Hq, S, D] -> [S, Hq, D]


def _check_bound(values: torch.Tensor, bound: int | None, name: str) -> None:
    if bound is not None and values.numel() and int(values.max()) > bound:
        raise ValueError(f"{name}: a value {int(values.max())} exceeds the bound {bound} given")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                           q_rows: torch.Tensor, out: torch.Tensor, *, scale: float,
                           alibi_slopes: torch.Tensor | None = None,
                           sliding_window: int | None = None, max_ctx_len: int | None = None,
                           num_splits: int | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None,
                           quant_scale: torch.Tensor | None = None,
                           pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    check_cache_scales(k_cache.dtype, k_scale, v_scale)
    check_fp8_output(out, quant_scale, pre_quant_scale)
    _check_bound(ctx_lens, max_ctx_len, "ctx_lens")
    for b in range(q_rows.shape[0]):
        length, row = int(ctx_lens[b]), int(q_rows[b])
        k = gather_keys(k_cache, block_tables[b], length, k_scale, q.dtype)
        v = gather_keys(v_cache, block_tables[b], length, v_scale, q.dtype)
        qpos = torch.tensor([length - 1], device=q.device)
        o = attend(q[row:row + 1], k, v, qpos, scale=scale, alibi_slopes=alibi_slopes,
                   sliding_window=sliding_window)
        out[row:row + 1] = _output(o, q.dtype, quant_scale, pre_quant_scale).to(out.dtype)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                            q_starts: torch.Tensor, q_lens: torch.Tensor, out: torch.Tensor, *,
                            scale: float, alibi_slopes: torch.Tensor | None = None,
                            sliding_window: int | None = None, max_q_len: int | None = None,
                            max_ctx_len: int | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None,
                            quant_scale: torch.Tensor | None = None,
                            pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    check_cache_scales(k_cache.dtype, k_scale, v_scale)
    check_fp8_output(out, quant_scale, pre_quant_scale)
    _check_bound(ctx_lens, max_ctx_len, "ctx_lens")
    _check_bound(q_lens, max_q_len, "q_lens")
    for b in range(q_starts.shape[0]):
        length, start, n = int(ctx_lens[b]), int(q_starts[b]), int(q_lens[b])
        k = gather_keys(k_cache, block_tables[b], length, k_scale, q.dtype)
        v = gather_keys(v_cache, block_tables[b], length, v_scale, q.dtype)
        qpos = torch.arange(length - n, length, device=q.device)
        o = attend(q[start:start + n], k, v, qpos, scale=scale, alibi_slopes=alibi_slopes,
                   sliding_window=sliding_window)
        out[start:start + n] = _output(o, q.dtype, quant_scale, pre_quant_scale).to(out.dtype)
    return out


def _output(o: torch.Tensor, dtype: torch.dtype, quant_scale: torch.Tensor | None,
            pre_quant_scale: torch.Tensor | None) -> torch.Tensor:
    """Output rows ``[n, Hq, D]``, or with ``quant_scale`` the FP8 projection's input: rounded
    to ``dtype`` first as the unfused output is, smoothed, quantized (the contract above)."""
    if quant_scale is None:
        return o
    rows = o.to(dtype).reshape(o.shape[0], -1)
    if pre_quant_scale is not None:
        rows = (rows.float() * pre_quant_scale).to(dtype)
    return quantize_fp8_input(rows, quant_scale)[0].view(o.shape)


def check_fp8_output(out: torch.Tensor, quant_scale: torch.Tensor | None,
                     pre_quant_scale: torch.Tensor | None) -> None:
    """An FP8 output buffer comes with its scale, a scale with an FP8 buffer, and a smoothing
    vector only with them, one value per output column."""
    if (quant_scale is not None) != (out.dtype == torch.float8_e4m3fn):
        raise ValueError(f"paged attention: quant_scale and a float8_e4m3fn out go "
                         f"together; found out {out.dtype}, quant_scale "
                         f"{'set' if quant_scale is not None else 'None'}")
    columns = out.shape[1] * out.shape[2]
    if pre_quant_scale is not None and (quant_scale is None or pre_quant_scale.numel() != columns):
        raise ValueError(f"paged attention: pre_quant_scale comes with quant_scale and "
                         f"has Hq * D = {columns} values, found {pre_quant_scale.numel()}")
