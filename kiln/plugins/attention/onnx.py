"""ONNX forms of the attention plugin (see :mod:`.spec`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import TensorProto

from kiln.plugins.attention.spec import AttentionAttrs, AttentionMask

if TYPE_CHECKING:
    from kiln.builder.graph.emitter import GraphEmitter


def emit(g: GraphEmitter, q: str, k: str, v: str, past: tuple[str, str], past_len: str,
         mask: AttentionMask, presents: tuple[str, str], attrs: AttentionAttrs, fused: bool) -> str:
    """Returns ``out``; writes the updated caches to the value names ``presents``."""
    if fused:
        return _fused(g, q, k, v, past, past_len, mask, presents, attrs)
    return _decomposed(g, q, k, v, past, past_len, mask, presents, attrs)


def _fused(g: GraphEmitter, q: str, k: str, v: str, past: tuple[str, str], past_len: str,
           mask: AttentionMask, presents: tuple[str, str], attrs: AttentionAttrs) -> str:
    """
    past_key ──► TensorScatter(k, past_len) ──► present_key ──┐
    past_value ─► TensorScatter(v, past_len) ──► present_value ┼─► Attention(q, ., ., mask)
    """
    key = g.op("TensorScatter", past[0], k, past_len, name="key_cache", outputs=[presents[0]],
               axis=-2, mode="linear")
    value = g.op("TensorScatter", past[1], v, past_len, name="value_cache",
                 outputs=[presents[1]], axis=-2, mode="linear")
    return g.op("Attention", q, key, value, mask.value, scale=attrs.scale, is_causal=0)


def _decomposed(g: GraphEmitter, q: str, k: str, v: str, past: tuple[str, str], past_len: str,
                mask: AttentionMask, presents: tuple[str, str], attrs: AttentionAttrs) -> str:
    """
    k, v ─► ScatterElements(past, index[b,h,s,d] = past_len[b] + s, axis 2) ─► presents
    q [B,Hq,S,D] ─► Reshape [B,Hkv,G,S,D] ─► MatMul(K^T [B,Hkv,1,D,Smax]) ─► Cast f32 ─► * scale
      ─► mask (Where / Add) ─► Softmax ─► Cast ─► MatMul(V [B,Hkv,1,Smax,D]) ─► Reshape [B,Hq,S,D]
    """
    index = g.shared(("cache_index", past_len), lambda: _write_index(g, k, past_len))
    key = g.op("ScatterElements", past[0], index, k, name="key_cache", outputs=[presents[0]],
               axis=2)
    value = g.op("ScatterElements", past[1], index, v, name="value_cache",
                 outputs=[presents[1]], axis=2)
    hkv, group, d = attrs.num_kv_heads, attrs.num_heads // attrs.num_kv_heads, attrs.head_dim
    q5 = g.op("Reshape", q, g.int64s(0, hkv, group, -1, d), name="group_heads")
    keys_t = g.op("Transpose", g.op("Unsqueeze", key, g.int64s(2), name="key_group"),
                  name="key_t", perm=[0, 1, 2, 4, 3])  # [B, Hkv, 1, D, Smax]
    scores = g.op("MatMul", q5, keys_t, name="scores")  # [B, Hkv, G, S, Smax]
    if attrs.dtype != TensorProto.FLOAT:
        scores = g.op("Cast", scores, to=TensorProto.FLOAT)
    scores = g.op("Mul", scores, g.scalar(attrs.scale, TensorProto.FLOAT), name="scale")
    scores = _apply_mask(g, scores, mask, attrs)
    probs = g.op("Softmax", scores, axis=-1)
    if attrs.dtype != TensorProto.FLOAT:
        probs = g.op("Cast", probs, to=attrs.dtype)
    values = g.op("Unsqueeze", value, g.int64s(2), name="value_group")  # [B, Hkv, 1, Smax, D]
    out = g.op("MatMul", probs, values, name="context")  # [B, Hkv, G, S, D]
    return g.op("Reshape", out, g.int64s(0, hkv * group, -1, d), name="merge_heads")


def _write_index(g: GraphEmitter, k: str, past_len: str) -> str:
    """index [B, Hkv, S, D] = past_len[b] + s, the cache row each new key/value goes to."""
    s = g.op("Gather", g.op("Shape", k), g.int64s(2), name="seq_len", axis=0)  # [1]
    steps = g.op("Range", g.scalar(0, TensorProto.INT64),
                 g.op("Squeeze", s, name="seq_len_scalar"), g.scalar(1, TensorProto.INT64))
    steps = g.op("Reshape", steps, g.int64s(1, 1, -1, 1), name="steps")  # [1, 1, S, 1]
    start = g.op("Unsqueeze", past_len, g.int64s(1, 2, 3), name="start")  # [B, 1, 1, 1]
    return g.op("Expand", g.op("Add", start, steps, name="rows"), g.op("Shape", k, name="k_shape"))


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
