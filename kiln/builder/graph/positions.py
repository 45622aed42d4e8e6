"""Per-graph position subgraphs shared by every layer: the attention mask and rotary tables.

Cache slot j holds position j, so masks compare cache slots with query positions directly;
stale slots past a row's length are never allowed (their slot index exceeds every query
position of the row).
"""

from __future__ import annotations

import numpy as np
import torch

from kiln.builder.graph.context import FLOAT32, INT32, INT64, EmitContext
from kiln.config import PositionType, RopeScalingType
from kiln.plugins.attention import AttentionMask
from kiln.reference import rope_inv_freq

ALIBI_MASKED = -30000.0  # masked score for additive masks: representable in float16


def attention_mask(ctx: EmitContext) -> AttentionMask:
    """The mask of this graph's queries against the whole cache, built once.

    position_ids [B,S] ─► Unsqueeze(1,3) ─► qpos [B,1,S,1]
    kpos = const 0..Smax-1 [1,1,1,Smax]
    allowed = LessOrEqual(kpos, qpos)                         [B,1,S,Smax] bool
      (sliding window W) ─► And(allowed, Greater(kpos, qpos - W))
      (ALiBi) ─► Where(allowed, slope_h * (kpos - qpos), -30000) ─► Cast   [B,Hq,S,Smax]
    """
    def build() -> AttentionMask:
        g, cfg = ctx.g, ctx.decoder
        with g.scope("mask"):
            qpos = g.op("Unsqueeze", ctx.shared["position_ids"], g.int64s(1, 3), name="qpos")
            kpos = g.const(np.arange(ctx.spec.max_seq_len, dtype=np.int64).reshape(1, 1, 1, -1),
                           name="kpos")
            allowed = g.op("LessOrEqual", kpos, qpos, name="causal")
            if cfg.sliding_window is not None:
                oldest = g.op("Sub", qpos, g.scalar(cfg.sliding_window, INT64), name="window")
                allowed = g.op("And", allowed, g.op("Greater", kpos, oldest, name="window"),
                               name="window")
            if cfg.position_type is not PositionType.ALIBI:
                return AttentionMask(allowed, additive=False)
            return AttentionMask(_alibi(ctx, qpos, kpos, allowed), additive=True)
    return ctx.g.shared("attention_mask", build)


def _alibi(ctx: EmitContext, qpos: str, kpos: str, allowed: str) -> str:
    """slope_h * (kpos - qpos) where allowed (relative distance keeps float16 exact near the
    diagonal; softmax is invariant to the per-row shift from the absolute form)."""
    g = ctx.g
    first = ctx.tp_rank * ctx.heads
    slopes = np.asarray(ctx.decoder.alibi_slopes[first:first + ctx.heads], dtype=np.float32)
    distance = g.op("Cast", g.op("Sub", kpos, qpos, name="distance"), to=FLOAT32)
    bias = g.op("Mul", distance, g.const(slopes.reshape(1, -1, 1, 1), name="alibi_slopes"),
                name="alibi")
    bias = g.op("Where", allowed, bias, g.scalar(ALIBI_MASKED, FLOAT32), name="alibi")
    return bias if ctx.elem == FLOAT32 else g.op("Cast", bias, to=ctx.elem)


def rope_tables(ctx: EmitContext) -> tuple[str, str, str | None]:
    """(cos, sin, position_ids or None) for the rotary plugin, built once per graph.

    Static scalings: constant tables [Smax, D/2] indexed by position_ids. Dynamic NTK: per-row
    tables [B, S, D/2] computed in the graph from the row's length (see :func:`_dynamic`).
    """
    def build() -> tuple[str, str, str | None]:
        with ctx.g.scope("rotary"):
            scaling = ctx.decoder.rope_scaling
            if scaling is not None and scaling.type is RopeScalingType.DYNAMIC:
                return (*_dynamic(ctx), None)
            return (*_static(ctx), ctx.shared["position_ids"])
    return ctx.g.shared("rope_tables", build)


def _static(ctx: EmitContext) -> tuple[str, str]:
    """cos/sin [Smax, D/2], computed exactly as the reference does (float32, then cast)."""
    inv_freq = rope_inv_freq(ctx.decoder, ctx.spec.max_seq_len)
    freqs = torch.arange(ctx.spec.max_seq_len, dtype=torch.int64).float()[:, None] * inv_freq
    dtype = getattr(torch, ctx.spec.dtype)
    return (ctx.g.weight("rope.cos", freqs.cos().to(dtype)),
            ctx.g.weight("rope.sin", freqs.sin().to(dtype)))


def _dynamic(ctx: EmitContext) -> tuple[str, str]:
    """Dynamic NTK: each row's base grows with its length L (last valid position + 1).

    last_index ─► GatherND(position_ids) + 1 ─► L [B] ─► Where(L > orig,
        theta * (factor * L / orig - (factor - 1)) ^ (D / (D - 2)), theta) ─► base [B,1]
    inv_freq = 1 / base ^ (2k / D)                                          [B, D/2]
    freqs = position_ids [B,S,1] * inv_freq [B,1,D/2] ─► Cos, Sin ─► Cast   [B, S, D/2]
    """
    g, cfg = ctx.g, ctx.decoder
    scaling, dim = cfg.rope_scaling, cfg.head_dim
    original = float(scaling.original_max_position_embeddings or cfg.max_position_embeddings)
    pos = ctx.shared["position_ids"]
    last = g.op("Unsqueeze", ctx.shared["last_index"], g.int64s(1), name="last")
    length = g.op("Add", g.op("GatherND", pos, last, name="last_pos", batch_dims=1),
                  g.scalar(1, INT64), name="length")
    length = g.op("Cast", g.op("Unsqueeze", length, g.int64s(1), name="length"), to=FLOAT32)
    ratio = g.op("Sub", g.op("Mul", length, g.scalar(scaling.factor / original, FLOAT32),
                             name="ratio"), g.scalar(scaling.factor - 1, FLOAT32), name="ratio")
    grown = g.op("Mul", g.op("Pow", ratio, g.scalar(dim / (dim - 2), FLOAT32), name="ntk"),
                 g.scalar(cfg.rope_theta, FLOAT32), name="base")
    base = g.op("Where", g.op("Greater", length, g.scalar(original, FLOAT32), name="beyond"),
                grown, g.scalar(cfg.rope_theta, FLOAT32), name="base")  # [B, 1]
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    inv_freq = g.op("Reciprocal", g.op("Pow", base, g.const(exponents[None], name="exponents"),
                                       name="inv_freq"))  # [B, D/2]
    posf = g.op("Cast", g.op("Unsqueeze", pos, g.int64s(2), name="pos"), to=FLOAT32)
    freqs = g.op("Mul", posf, g.op("Unsqueeze", inv_freq, g.int64s(1), name="inv_freq"),
                 name="freqs")
    cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
    if ctx.elem != FLOAT32:
        cos, sin = g.op("Cast", cos, to=ctx.elem), g.op("Cast", sin, to=ctx.elem)
    return cos, sin


def gqa_lengths(ctx: EmitContext) -> tuple[str, str]:
    """GroupQueryAttention's (seqlens_k, total_sequence_length), built once per graph.

    past_len + last_index ─► Cast int32 ─► seqlens_k [B]   (each row's last valid position)
    ReduceMax(past_len) + Shape(position_ids)[1] ─► Cast int32 ─► total [1]
    """
    def build() -> tuple[str, str]:
        g = ctx.g
        with g.scope("gqa_lengths"):
            past = ctx.shared["past_len"]
            last = g.op("Add", past, ctx.shared["last_index"], name="last")
            seqlens = g.op("Cast", last, name="seqlens_k", to=INT32)
            width = g.op("Shape", ctx.shared["position_ids"], name="seq", start=1, end=2)
            longest = g.op("ReduceMax", past, name="longest_past", keepdims=1)
            total = g.op("Cast", g.op("Add", longest, width, name="total"), name="total", to=INT32)
            return seqlens, total
    return ctx.g.shared("gqa_lengths", build)
