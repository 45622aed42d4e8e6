"""ONNX forms of the residual_norm plugin (see :mod:`.spec`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.config import NormType
from kiln.plugins.norm import NormAttrs
from kiln.plugins.norm import onnx as norm_plugin
from kiln.plugins.residual_norm.spec import DOMAIN

if TYPE_CHECKING:
    from kiln.graph.emitter import GraphEmitter


def emit(g: GraphEmitter, x: str, delta: str, weight: str, bias: str | None, attrs: NormAttrs,
         fused: bool, norm_fused: bool) -> tuple[str, str]:
    """(x + delta, norm(x + delta)); ``norm_fused`` picks the norm plugin's form (decomposed)."""
    if not fused:
        total = g.op("Add", x, delta, name="residual")
        return total, norm_plugin.emit(g, total, weight, bias, attrs, fused=norm_fused)
    if attrs.kind is NormType.RMSNORM:
        normed, total = _skip(g, "SkipSimplifiedLayerNormalization", [delta, x, weight], attrs)
        return total, normed if bias is None else g.op("Add", normed, bias, name="bias")
    normed, total = _skip(g, "SkipLayerNormalization", [delta, x, weight, bias or ""], attrs)
    return total, normed


def _skip(g: GraphEmitter, op: str, inputs: list[str], attrs: NormAttrs) -> tuple[str, str]:
    """Outputs 0 (the norm) and 3 (input + skip); mean and inverse std are left out."""
    normed, _, _, total = g.op(op, *inputs, outputs=[None, "", "", None], domain=DOMAIN,
                               epsilon=attrs.eps)
    return normed, total
