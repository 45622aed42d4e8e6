"""ONNX forms of the norm plugin (see :mod:`.spec`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import TensorProto

from kiln.config import NormType
from kiln.plugins.norm.spec import NormAttrs

if TYPE_CHECKING:
    from kiln.graph.emitter import GraphEmitter


def emit(g: GraphEmitter, x: str, weight: str, bias: str | None, attrs: NormAttrs,
         fused: bool) -> str:
    if fused:
        if attrs.kind is NormType.RMSNORM:
            out = g.op("RMSNormalization", x, weight, axis=-1, epsilon=attrs.eps, stash_type=1)
            return out if bias is None else g.op("Add", out, bias, name="bias")
        return g.op("LayerNormalization", x, weight, *([bias] if bias else []), axis=-1,
                    epsilon=attrs.eps, stash_type=1)
    return _decomposed(g, x, weight, bias, attrs)


def _decomposed(g: GraphEmitter, x: str, weight: str, bias: str | None, attrs: NormAttrs) -> str:
    """
    x ─► Cast f32 ─┬────────────────────────────────► Div ─► Cast ─► Mul w ─► (Add b)
                   └─(LN: Sub mean)─► Mul self ─► ReduceMean ─► Add eps ─► Sqrt ─┘
    """
    f32 = TensorProto.FLOAT
    xf = x if attrs.dtype == f32 else g.op("Cast", x, to=f32)
    if attrs.kind is NormType.LAYERNORM:
        mean = g.op("ReduceMean", xf, g.int64s(-1), name="mean", keepdims=1)
        xf = g.op("Sub", xf, mean, name="center")
    square = g.op("Mul", xf, xf, name="square")
    var = g.op("ReduceMean", square, g.int64s(-1), name="var", keepdims=1)
    std = g.op("Sqrt", g.op("Add", var, g.scalar(attrs.eps, f32), name="eps"))
    y = g.op("Div", xf, std, name="normalize")
    y = y if attrs.dtype == f32 else g.op("Cast", y, to=attrs.dtype)
    y = g.op("Mul", y, weight, name="weight")
    return y if bias is None else g.op("Add", y, bias, name="bias")
