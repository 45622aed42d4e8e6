"""The attention block of one layer: projections, head layout, rotary, cache + attention."""

from __future__ import annotations

from kiln.builder.graph import positions
from kiln.builder.graph.context import EmitContext
from kiln.config import PositionType
from kiln.plugins.attention import AttentionAttrs
from kiln.plugins.attention import onnx as attention_plugin
from kiln.plugins.gqa import GqaAttrs
from kiln.plugins.gqa import onnx as gqa_plugin
from kiln.plugins.kv_cache import onnx as kv_cache_plugin
from kiln.plugins.norm import NormAttrs
from kiln.plugins.norm import onnx as norm_plugin
from kiln.plugins.rotary import RotaryAttrs
from kiln.plugins.rotary import onnx as rotary_plugin
from kiln.roles import Role


def cache_names(i: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """((past_key_i, past_value_i), (present_key_i, present_value_i))."""
    return (f"past_key_{i}", f"past_value_{i}"), (f"present_key_{i}", f"present_value_{i}")


def emit_attention(ctx: EmitContext, i: int, h: str) -> str:
    """The attention output's row-parallel partial [B, S, H] (before all-reduce and o bias).

    h ─► qkv projection ─► (Add bias) ─► (Clip) ─► Split ─► q, k, v   [B, S, heads * D]
    q, k ─► (q_norm, k_norm) ─► heads [B, H, S, D] ─► (rotary plugin)
    k, v ─► kv_cache plugin ─► present_key_i, present_value_i (graph outputs)
    q, presents ─► attention plugin ─► [B, Hq, S, D]
      ─► Transpose [B, S, Hq, D] ─► Reshape [B, S, Hq * D] ─► o projection

    gqa plugin: h ─► qkv ─► (Add bias) ─► (Clip) ─► GroupQueryAttention ─► o projection
    (rotary, the cache write and attention in one node; see kiln/plugins/gqa/spec.py).
    Projections: ctx.linear (a MatMul, or a quantized form: kiln/builder/graph/linear.py).
    """
    g, cfg = ctx.g, ctx.decoder
    with g.scope("attn"):
        if ctx.spec.plugins.get("gqa"):
            out = _gqa(ctx, i, _projection(ctx, i, h))
            return ctx.linear(Role.OUT, i)(out)
        q, k, v = _split(ctx, _projection(ctx, i, h))
        if cfg.qk_norm:
            q = _qk_norm(ctx, q, Role.Q_NORM, Role.Q_NORM_BIAS, i, "q_norm")
            k = _qk_norm(ctx, k, Role.K_NORM, Role.K_NORM_BIAS, i, "k_norm")
        q, k, v = (_heads(ctx, t, n, name) for t, n, name in
                   ((q, ctx.heads, "q"), (k, ctx.kv_heads, "k"), (v, ctx.kv_heads, "v")))
        if cfg.position_type is PositionType.ROPE:
            q, k = _rotary(ctx, q, "q_rotary"), _rotary(ctx, k, "k_rotary")
        past, presents = cache_names(i)
        fused = ctx.spec.plugins
        with g.scope("kv_cache"):
            keys, values = (kv_cache_plugin.emit(g, old, new, ctx.shared["past_len"], present,
                                                 fused=fused["kv_cache"])
                            for old, new, present in zip(past, (k, v), presents, strict=True))
        attrs = AttentionAttrs(num_heads=ctx.heads, num_kv_heads=ctx.kv_heads,
                               head_dim=cfg.head_dim, scale=cfg.softmax_scale,
                               max_seq_len=ctx.spec.max_seq_len, dtype=ctx.elem)
        with g.scope("sdpa"):
            out = attention_plugin.emit(g, q, keys, values, positions.attention_mask(ctx), attrs,
                                        fused=fused["attention"])
        out = g.op("Transpose", out, name="merge_heads", perm=[0, 2, 1, 3])  # [B, S, Hq, D]
        out = g.op("Reshape", out, g.int64s(0, 0, ctx.heads * cfg.head_dim), name="merge_heads")
        return ctx.linear(Role.OUT, i)(out)


def _projection(ctx: EmitContext, i: int, h: str) -> str:
    """h ─► qkv projection ─► (Add qkv.bias) ─► (Clip ±clip_qkv): q|k|v packed"""
    g, cfg = ctx.g, ctx.decoder
    qkv = ctx.linear(Role.QKV, i)(h)
    bias = ctx.weight(Role.QKV_BIAS, i)
    if bias is not None:
        qkv = g.op("Add", qkv, bias, name="qkv_bias")
    if cfg.clip_qkv is not None:
        qkv = g.op("Clip", qkv, g.scalar(-cfg.clip_qkv, ctx.elem), g.scalar(cfg.clip_qkv, ctx.elem),
                   name="clip_qkv")
    return qkv


def _split(ctx: EmitContext, qkv: str) -> tuple[str, str, str]:
    g, cfg = ctx.g, ctx.decoder
    q_size, kv_size = ctx.heads * cfg.head_dim, ctx.kv_heads * cfg.head_dim
    return g.op("Split", qkv, g.int64s(q_size, kv_size, kv_size), name="qkv_split", axis=-1,
                outputs=3)


def _gqa(ctx: EmitContext, i: int, qkv: str) -> str:
    cfg = ctx.decoder
    cos, sin, _ = positions.rope_tables(ctx)
    seqlens_k, total_length = positions.gqa_lengths(ctx)
    attrs = GqaAttrs(num_heads=ctx.heads, num_kv_heads=ctx.kv_heads, head_dim=cfg.head_dim,
                     scale=cfg.softmax_scale, sliding_window=cfg.sliding_window)
    past, present = cache_names(i)
    return gqa_plugin.emit(ctx.g, qkv, past, present, seqlens_k, total_length, cos, sin, attrs)


def _qk_norm(ctx: EmitContext, x: str, weight: Role, bias: Role, i: int, name: str) -> str:
    """MPT's qk_ln: a norm over the whole q (or k) projection, before the head split."""
    cfg = ctx.decoder
    attrs = NormAttrs(kind=cfg.norm_type, eps=cfg.norm_eps, dtype=ctx.elem)
    with ctx.g.scope(name):
        return norm_plugin.emit(ctx.g, x, ctx.weight(weight, i), ctx.weight(bias, i), attrs,
                                fused=ctx.spec.plugins["norm"])


def _heads(ctx: EmitContext, x: str, heads: int, name: str) -> str:
    """[B, S, heads * D] ─► Reshape [B, S, heads, D] ─► Transpose [B, heads, S, D]."""
    g = ctx.g
    x = g.op("Reshape", x, g.int64s(0, 0, heads, ctx.decoder.head_dim), name=f"{name}_heads")
    return g.op("Transpose", x, name=f"{name}_heads", perm=[0, 2, 1, 3])


def _rotary(ctx: EmitContext, x: str, name: str) -> str:
    cos, sin, position_ids = positions.rope_tables(ctx)
    with ctx.g.scope(name):
        return rotary_plugin.emit(ctx.g, x, cos, sin, position_ids,
                                  RotaryAttrs(ctx.decoder.head_dim, ctx.elem),
                                  fused=ctx.spec.plugins["rotary"])
