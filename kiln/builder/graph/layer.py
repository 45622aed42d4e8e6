"""One decoder layer: norms, attention, MLP and the residual layout (sequential or parallel)."""

from __future__ import annotations

from kiln.builder.graph import attention, collectives
from kiln.builder.graph.context import EmitContext
from kiln.config import MlpType, ResidualType
from kiln.plugins.gated_mlp import GatedMlpAttrs
from kiln.plugins.gated_mlp import onnx as gated_mlp
from kiln.plugins.norm import NormAttrs
from kiln.plugins.norm import onnx as norm_plugin
from kiln.plugins.residual_norm import onnx as residual_norm_plugin
from kiln.roles import Role


def norm(ctx: EmitContext, x: str, weight: Role, bias: Role, layer: int | None, name: str) -> str:
    """The model's norm (RMSNorm/LayerNorm) through the norm plugin."""
    with ctx.g.scope(name):
        return norm_plugin.emit(ctx.g, x, ctx.weight(weight, layer), ctx.weight(bias, layer),
                                _norm_attrs(ctx), fused=ctx.spec.plugins["norm"])


def emit_layer(ctx: EmitContext, i: int, x: str, pending: str | None) -> tuple[str, str | None]:
    """One layer over the residual stream ``x + pending``; returns the new (x, pending).

    sequential:  x ─► attn_norm ─► attention ─► reduce ─► + x ─► mlp_norm ─► mlp ─► reduce ─► +
    parallel:    x ─► attn_norm ─┬─► attention ──────────────┐
                                 └─► (mlp_norm) ─► mlp ─► Add ┴─► reduce ─► + x
    reduce = all-reduce over tp ranks (tp > 1), then the row-parallel biases (added once).

    With the residual_norm plugin a residual add is left pending and done by the next norm
    (one Skip*Normalization node); the layer's last add is handed to the next layer, and
    :func:`settle` does it after the last layer. Without it ``pending`` is always None.
    """
    g, cfg = ctx.g, ctx.decoder
    with g.scope(f"layers.{i}"):
        x, h = _add_norm(ctx, x, pending, Role.ATTN_NORM, Role.ATTN_NORM_BIAS, i, "attn_norm")
        attn = attention.emit_attention(ctx, i, h)
        if cfg.residual is ResidualType.PARALLEL:
            h2 = norm(ctx, x, Role.MLP_NORM, Role.MLP_NORM_BIAS, i, "mlp_norm") \
                if cfg.parallel_norms == 2 else h
            partial = g.op("Add", attn, emit_mlp(ctx, i, h2), name="parallel")
            out = _reduce(ctx, partial, (Role.OUT_BIAS, Role.DOWN_BIAS), i, "residual")
            return _residual(ctx, x, out, "residual")
        x, pending = _residual(ctx, x, _reduce(ctx, attn, (Role.OUT_BIAS,), i, "attn"),
                               "attn_residual")
        x, h = _add_norm(ctx, x, pending, Role.MLP_NORM, Role.MLP_NORM_BIAS, i, "mlp_norm")
        mlp = _reduce(ctx, emit_mlp(ctx, i, h), (Role.DOWN_BIAS,), i, "mlp")
        return _residual(ctx, x, mlp, "mlp_residual")


def settle(ctx: EmitContext, x: str, pending: str | None) -> str:
    """The residual stream after the last layer (its pending add done)."""
    return x if pending is None else ctx.g.op("Add", x, pending, name="final_residual")


def _norm_attrs(ctx: EmitContext) -> NormAttrs:
    cfg = ctx.decoder
    return NormAttrs(kind=cfg.norm_type, eps=cfg.norm_eps, dtype=ctx.elem)


def _residual(ctx: EmitContext, x: str, delta: str, name: str) -> tuple[str, str | None]:
    """x + delta now, or left pending for the next norm (residual_norm plugin)."""
    if ctx.spec.plugins.get("residual_norm"):
        return x, delta
    return ctx.g.op("Add", x, delta, name=name), None


def _add_norm(ctx: EmitContext, x: str, pending: str | None, weight: Role, bias: Role, i: int,
              name: str) -> tuple[str, str]:
    """(residual stream, its norm): the pending add and the norm as one residual_norm node."""
    if pending is None:
        return x, norm(ctx, x, weight, bias, i, name)
    with ctx.g.scope(name):
        return residual_norm_plugin.emit(ctx.g, x, pending, ctx.weight(weight, i),
                                         ctx.weight(bias, i), _norm_attrs(ctx), fused=True,
                                         norm_fused=ctx.spec.plugins["norm"])


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

    gated: the gated_mlp plugin.   gelu: h ─► up ─► (Add b) ─► Gelu ─► down
    (projections: ctx.linear, a MatMul or a quantized form)
    """
    g, cfg = ctx.g, ctx.decoder
    with g.scope("mlp"):
        down = ctx.linear(Role.DOWN, i)
        if cfg.mlp_type is MlpType.SWIGLU:
            return gated_mlp.emit(g, h, ctx.linear(Role.GATE_UP, i),
                                  ctx.weight(Role.GATE_UP_BIAS, i), down,
                                  GatedMlpAttrs(ctx.intermediate), fused=ctx.spec.plugins["gated_mlp"])
        up = ctx.linear(Role.UP, i)(h)
        bias = ctx.weight(Role.UP_BIAS, i)
        if bias is not None:
            up = g.op("Add", up, bias, name="up_bias")
        return down(g.op("Gelu", up, approximate="none"))
