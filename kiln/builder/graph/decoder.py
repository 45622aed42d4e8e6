"""Emit one part's graph: the passes in order, and the graph I/O of docs/engine.md.

    inputs ─► (embedding | hidden_in) ─► layers[start:stop] ─► (head ─► logits | hidden_out)
                                                        (+ context_logits: gather_context_logits)

Positions (the mask, rotary tables) are emitted lazily by the first layer that needs them and
shared by all. Weights stream from the rank's checkpoint file one tensor at a time into the
emitter's sink; the returned ModelProto holds none of their bytes.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from kiln.builder.graph.attention import cache_names
from kiln.builder.graph.context import (
    BATCH,
    INT64,
    SEQ,
    EmitContext,
    GraphSpec,
    PartSpec,
    RankWeights,
)
from kiln.builder.graph.head import emit_head
from kiln.builder.graph.layer import emit_layer, settle
from kiln.config import RopeScalingType
from kiln.graph.emitter import FileSink, GraphEmitter, WeightSink, save
from kiln.roles import Role


def emit_part(spec: GraphSpec, part: PartSpec, weights: RankWeights,
              sink: WeightSink) -> onnx.ModelProto:
    """The ONNX model of ``part`` (weights written to ``sink``)."""
    g = GraphEmitter(part.stem, sink)
    ctx = EmitContext(g, spec, part, weights)
    x = _inputs(ctx)
    if part.first:
        with g.scope("embed"):
            x = g.op("Gather", ctx.weight(Role.EMBED), x, axis=0)  # [B, S, H]
    pending = None
    for i in part.layers:
        x, pending = emit_layer(ctx, i, x, pending)
    _outputs(ctx, settle(ctx, x, pending))
    return g.model(doc=f"kiln {part.stem}: layers {part.layers.start}..{part.layers.stop - 1}")


def needs_last_index(spec: GraphSpec, part: PartSpec) -> bool:
    """Whether the part reads ``last_index``: the head, dynamic-NTK rotary tables, and
    GroupQueryAttention (each row's valid length)."""
    scaling = spec.decoder.rope_scaling
    return part.last or bool(spec.plugins.get("gqa")) or \
        (scaling is not None and scaling.type is RopeScalingType.DYNAMIC)


def _inputs(ctx: EmitContext) -> str:
    g, spec, part = ctx.g, ctx.spec, ctx.part
    if part.first:
        x = g.input("input_ids", INT64, [BATCH, SEQ])
    else:
        x = g.input("hidden_in", ctx.elem, [BATCH, SEQ, spec.decoder.hidden_size])
    ctx.shared["position_ids"] = g.input("position_ids", INT64, [BATCH, SEQ])
    ctx.shared["past_len"] = g.input("past_len", INT64, [BATCH])
    if needs_last_index(spec, part):
        ctx.shared["last_index"] = g.input("last_index", INT64, [BATCH])
    for i in part.layers:
        for name in cache_names(i)[0]:
            g.input(name, ctx.elem, ctx.cache_shape())
    return x


def _outputs(ctx: EmitContext, x: str) -> None:
    g, spec, part = ctx.g, ctx.spec, ctx.part
    if part.last:
        g.output(emit_head(ctx, x), "logits", onnx.TensorProto.FLOAT,
                 [BATCH, spec.decoder.vocab_size])
        if spec.gather_context_logits:
            g.output("context_logits", "context_logits", onnx.TensorProto.FLOAT,
                     [BATCH, SEQ, spec.decoder.vocab_size])
    else:
        g.output(g.op("Identity", x, name="hidden_out", outputs=["hidden_out"]), "hidden_out",
                 ctx.elem, [BATCH, SEQ, spec.decoder.hidden_size])
    for i in part.layers:
        for name in cache_names(i)[1]:
            g.output(name, name, ctx.elem, ctx.cache_shape())


def write_part(spec: GraphSpec, part: PartSpec, rank_path: Path, directory: Path) -> Path:
    """Emit ``part`` into ``directory/<stem>.onnx`` + ``<stem>.onnx.data``; returns the graph."""
    weights = RankWeights(rank_path, spec.dtype)
    sink = FileSink(Path(directory) / f"{part.stem}.onnx.data")
    try:
        model = emit_part(spec, part, weights, sink)
    finally:
        sink.close()
    return save(model, Path(directory) / f"{part.stem}.onnx")
