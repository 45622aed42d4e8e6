"""ONNX forms of the attention plugin (see :mod:`.spec`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import TensorProto

from kiln.plugins.attention.spec import AttentionAttrs, AttentionMask

if TYPE_CHECKING:
    from kiln.graph.emitter import GraphEmitter


def emit(g: GraphEmitter, q: str, keys: str, values: str, mask: AttentionMask,
         attrs: AttentionAttrs, fused: bool) -> str:
    """out [B, Hq, S, D] of q [B, Hq, S, D] over the caches [B, Hkv, Smax, D]."""
    if fused:
        return g.op("Attention", q, keys, values, mask.value, scale=attrs.scale, is_causal=0)
    return _decomposed(g, q, keys, values, mask, attrs)


def _decomposed(g: GraphEmitter, q: str, keys: str, values: str, mask: AttentionMask,
                attrs: AttentionAttrs) -> str:
    """
    q [B,Hq,S,D] ─► Reshape [B,Hkv,G,S,D] ─► MatMul(K^T [B,Hkv,1,D,Smax]) ─► Cast f32 ─► * scale
      ─► mask (Where / Add) ─► Softmax ─► Cast ─► MatMul(V [B,Hkv,1,Smax,D]) ─► Reshape [B,Hq,S,D]
    """
    hkv, group, d = attrs.num_kv_heads, attrs.num_heads // attrs.num_kv_heads, attrs.head_dim
    q5 = g.op("Reshape", q, g.int64s(0, hkv, group, -1, d), name="group_heads")
    keys_t = g.op("Transpose", g.op("Unsqueeze", keys, g.int64s(2), name="key_group"),
                  name="key_t", perm=[0, 1, 2, 4, 3])  # [B, Hkv, 1, D, Smax]
    scores = g.op("MatMul", q5, keys_t, name="scores")  # [B, Hkv, G, S, Smax]
    if attrs.dtype != TensorProto.FLOAT:
        scores = g.op("Cast", scores, to=TensorProto.FLOAT)
    scores = g.op("Mul", scores, g.scalar(attrs.scale, TensorProto.FLOAT), name="scale")
    scores = _apply_mask(g, scores, mask, attrs)
    probs = g.op("Softmax", scores, axis=-1)
    if attrs.dtype != TensorProto.FLOAT:
        probs = g.op("Cast", probs, to=attrs.dtype)
    grouped = g.op("Unsqueeze", values, g.int64s(2), name="value_group")  # [B, Hkv, 1, Smax, D]
    out = g.op("MatMul", probs, grouped, name="context")  # [B, Hkv, G, S, D]
    return g.op("Reshape", out, g.int64s(0, hkv * group, -1, d), name="merge_heads")


def _apply_mask(g: GraphEmitter, scores: str, mask: AttentionMask, attrs: AttentionAttrs) -> str:
    """Bool mask [B,1,S,Smax] -> Where; additive [B,Hq,S,Smax] -> Add (float32)."""
    hkv, group = attrs.num_kv_heads, attrs.num_heads // attrs.num_kv_heads
    grouped = g.shared(("decomposed_mask", mask.value, hkv, group),
                       lambda: _grouped_mask(g, mask, hkv, group, attrs.max_seq_len))
    if mask.additive:
        return g.op("Add", scores, grouped, name="mask")
    return g.op("Where", grouped, scores, g.scalar(float("-inf"), TensorProto.FLOAT), name="mask")


def _grouped_mask(g: GraphEmitter, mask: AttentionMask, hkv: int, group: int, smax: int) -> str:
    """The mask shaped to broadcast over scores [B, Hkv, G, S, Smax]."""
    if not mask.additive:
        return g.op("Unsqueeze", mask.value, g.int64s(1), name="mask_group")  # [B,1,1,S,Smax]
    grouped = g.op("Reshape", mask.value, g.int64s(0, hkv, group, -1, smax), name="mask_group")
    return g.op("Cast", grouped, to=TensorProto.FLOAT)
