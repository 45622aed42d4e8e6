"""One decoder layer: norms, attention, MLP and the residual layout (sequential or parallel)."""

from __future__ import annotations

from kiln.builder.graph import attention, collectives
from kiln.builder.graph.context import EmitContext
from kiln.config import MlpType, ResidualType
from kiln.plugins.gated_mlp import GatedMlpAttrs
from kiln.plugins.gated_mlp import onnx as gated_mlp
from kiln.plugins.norm import NormAttrs
from kiln.plugins.norm import onnx as norm_plugin
from kiln.roles import Role


def norm(ctx: EmitContext, x: str, weight: Role, bias: Role, layer: int | None, name: str) -> str:
    """The model's norm (RMSNorm/LayerNorm) through the norm plugin."""
    cfg = ctx.decoder
    attrs = NormAttrs(kind=cfg.norm_type, eps=cfg.norm_eps, dtype=ctx.elem)
    with ctx.g.scope(name):
        return norm_plugin.emit(ctx.g, x, ctx.weight(weight, layer), ctx.weight(bias, layer),
                                attrs, fused=ctx.spec.plugins["norm"])


def emit_layer(ctx: EmitContext, i: int, x: str) -> str:
    """
    sequential:  x ─► attn_norm ─► attention ─► reduce ─► + x ─► mlp_norm ─► mlp ─► reduce ─► +
    parallel:    x ─► attn_norm ─┬─► attention ──────────────┐
                                 └─► (mlp_norm) ─► mlp ─► Add ┴─► reduce ─► + x
    reduce = all-reduce over tp ranks (tp > 1), then the row-parallel biases (added once).
    """
    g, cfg = ctx.g, ctx.decoder
    with g.scope(f"layers.{i}"):
        h = norm(ctx, x, Role.ATTN_NORM, Role.ATTN_NORM_BIAS, i, "attn_norm")
        attn = attention.emit_attention(ctx, i, h)
        if cfg.residual is ResidualType.PARALLEL:
            h2 = norm(ctx, x, Role.MLP_NORM, Role.MLP_NORM_BIAS, i, "mlp_norm") \
                if cfg.parallel_norms == 2 else h
            partial = g.op("Add", attn, emit_mlp(ctx, i, h2), name="parallel")
            out = _reduce(ctx, partial, (Role.OUT_BIAS, Role.DOWN_BIAS), i, "residual")
            return g.op("Add", x, out, name="residual")
        x = g.op("Add", x, _reduce(ctx, attn, (Role.OUT_BIAS,), i, "attn"), name="attn_residual")
        h = norm(ctx, x, Role.MLP_NORM, Role.MLP_NORM_BIAS, i, "mlp_norm")
        mlp = _reduce(ctx, emit_mlp(ctx, i, h), (Role.DOWN_BIAS,), i, "mlp")
        return g.op("Add", x, mlp, name="mlp_residual")


def _reduce(ctx: EmitContext, partial: str, biases: tuple[Role, ...], layer: int,
            name: str) -> str:
    """All-reduce a row-parallel partial sum (tp > 1), then add the replicated biases."""
    g = ctx.g
    with g.scope(name):
        out = collectives.all_reduce(g, partial, ctx.tp) if ctx.tp > 1 else partial
        for role in biases:
            bias = ctx.weight(role, layer)
            if bias is not None:
                out = g.op("Add", out, bias, name=role.name(layer).split(".")[-2] + "_bias")
        return out


def emit_mlp(ctx: EmitContext, i: int, h: str) -> str:
    """The MLP's row-parallel partial output (no all-reduce, no down bias).

    gated: the gated_mlp plugin.   gelu: h ─► MatMul up ─► (Add b) ─► Gelu ─► MatMul down
    """
    g, cfg = ctx.g, ctx.decoder
    with g.scope("mlp"):
        down = ctx.weight(Role.DOWN, i, linear=True)
        if cfg.mlp_type is MlpType.SWIGLU:
            return gated_mlp.emit(g, h, ctx.weight(Role.GATE_UP, i, linear=True),
                                  ctx.weight(Role.GATE_UP_BIAS, i), down,
                                  GatedMlpAttrs(ctx.intermediate), fused=ctx.spec.plugins["gated_mlp"])
        up = g.op("MatMul", h, ctx.weight(Role.UP, i, linear=True), name="up")
        bias = ctx.weight(Role.UP_BIAS, i)
        if bias is not None:
            up = g.op("Add", up, bias, name="up_bias")
        return g.op("MatMul", g.op("Gelu", up, approximate="none"), down, name="down")
