"""Rotary embedding (rotate-half, GPT-NeoX style) of queries or keys.

Inputs: ``x`` [B, H, S, D] (model dtype); ``cos``, ``sin`` either tables [P, D/2] indexed by
``position_ids`` [B, S] (int64), or per-token values [B, S, D/2] (no position_ids; dynamic
NTK scaling computes them per row). Output [B, H, S, D]:
``x * cat(cos, cos) + cat(-x2, x1) * cat(sin, sin)`` with ``x1, x2`` the halves of ``x``.

Fused form: ``RotaryEmbedding`` (opset 23, ``interleaved=0``) -> TensorRT ROTARY_EMBEDDING.
Decomposed form: Gather of the tables, Split/Neg/Concat, Mul/Add.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import DecoderConfig, PositionType
from kiln.plugins.registry import PluginSpec, always, register_plugin


@dataclass(frozen=True)
class RotaryAttrs:
    head_dim: int
    dtype: int  # onnx TensorProto element type of x, cos and sin


def _occurs(decoder: DecoderConfig) -> str | None:
    if decoder.position_type is not PositionType.ROPE:
        return f"the model uses {decoder.position_type.value} positions, not rotary embeddings"
    return None


SPEC = register_plugin(PluginSpec(
    name="rotary",
    summary="Rotary position embedding as one op (RotaryEmbedding).",
    fused_form="ONNX RotaryEmbedding -> TensorRT ROTARY_EMBEDDING",
    decomposed_form="Gather/Split/Neg/Concat/Mul/Add",
    occurs=_occurs,
    fused_blocker=always,
    trt_layers=("ROTARY_EMBEDDING",),
))
