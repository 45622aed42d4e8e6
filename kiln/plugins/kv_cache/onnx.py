"""ONNX forms of the KV-cache update plugin (see :mod:`.spec`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import TensorProto

if TYPE_CHECKING:
    from kiln.graph.emitter import GraphEmitter


def emit(g: GraphEmitter, past: str, new: str, past_len: str, present: str, fused: bool) -> str:
    """Writes the updated cache to the value named ``present`` and returns it."""
    if fused:
        return g.op("TensorScatter", past, new, past_len, outputs=[present], axis=-2,
                    mode="linear")
    index = g.shared(("cache_index", past_len), lambda: _write_index(g, new, past_len))
    return g.op("ScatterElements", past, index, new, outputs=[present], axis=2)


def _write_index(g: GraphEmitter, new: str, past_len: str) -> str:
    """index [B, Hkv, S, D] = past_len[b] + s, the cache row each new entry goes to.

    Shape(new)[2] ─► Range(0, S) ─► Reshape [1,1,S,1] ─┐
    past_len [B] ─► Unsqueeze [B,1,1,1] ─────────────── Add ─► Expand(Shape(new))
    """
    s = g.op("Gather", g.op("Shape", new), g.int64s(2), name="seq_len", axis=0)  # [1]
    steps = g.op("Range", g.scalar(0, TensorProto.INT64),
                 g.op("Squeeze", s, name="seq_len_scalar"), g.scalar(1, TensorProto.INT64))
    steps = g.op("Reshape", steps, g.int64s(1, 1, -1, 1), name="steps")  # [1, 1, S, 1]
    start = g.op("Unsqueeze", past_len, g.int64s(1, 2, 3), name="start")  # [B, 1, 1, 1]
    return g.op("Expand", g.op("Add", start, steps, name="rows"),
                g.op("Shape", new, name="new_shape"))
