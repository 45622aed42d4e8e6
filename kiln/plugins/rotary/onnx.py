"""ONNX forms of the rotary plugin (see :mod:`.spec`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.plugins.rotary.spec import RotaryAttrs

if TYPE_CHECKING:
    from kiln.graph.emitter import GraphEmitter


def emit(g: GraphEmitter, x: str, cos: str, sin: str, position_ids: str | None,
         attrs: RotaryAttrs, fused: bool) -> str:
    """x [B, H, S, D] -> rotated x (see the spec for the table forms)."""
    if fused:
        inputs = [x, cos, sin] + ([position_ids] if position_ids else [])
        return g.op("RotaryEmbedding", *inputs, interleaved=0)
    cos4, sin4 = g.shared(("rotary", cos, sin, position_ids),
                          lambda: (_full_table(g, cos, position_ids, "cos"),
                                   _full_table(g, sin, position_ids, "sin")))
    half = attrs.head_dim // 2
    x1, x2 = g.op("Split", x, g.int64s(half, half), name="halves", axis=-1, outputs=2)
    rotated = g.op("Concat", g.op("Neg", x2), x1, name="rotate_half", axis=-1)
    return g.op("Add", g.op("Mul", x, cos4, name="cos"), g.op("Mul", rotated, sin4, name="sin"))


def _full_table(g: GraphEmitter, table: str, position_ids: str | None, name: str) -> str:
    """
    table [P, D/2] ─► Gather(position_ids) [B, S, D/2] ─► Concat(self, self) [B, S, D]
                                                        ─► Unsqueeze(1) [B, 1, S, D]
    (per-token tables [B, S, D/2] skip the Gather)
    """
    per_token = table if position_ids is None else \
        g.op("Gather", table, position_ids, name=f"{name}_gather", axis=0)
    full = g.op("Concat", per_token, per_token, name=f"{name}_concat", axis=-1)
    return g.op("Unsqueeze", full, g.int64s(1), name=f"{name}_heads")
