"""The last part's head: pick each row's last valid token, final norm, lm_head, gather vocab.

Built with ``gather_context_logits`` the head runs on every position instead and also returns
``context_logits`` [B, S, V]; ``logits`` [B, V] are then gathered from them. Without it the
graph is exactly the one the golden graphs pin.
"""

from __future__ import annotations

from kiln.builder.graph import collectives
from kiln.builder.graph.context import FLOAT32, EmitContext
from kiln.builder.graph.layer import norm
from kiln.roles import Role


def emit_head(ctx: EmitContext, x: str) -> str:
    """float32 logits [B, vocab] at ``last_index``.

    x [B,S,H] ─► GatherND(last_index, batch_dims=1) [B,H] ─► final_norm ─► lm_head MatMul
      tp = 1: [B, V] ─► Cast f32
      tp > 1: [B, V/tp] ─► Transpose [V/tp, B] ─► all_gather [V_pad, B] ─► Transpose [B, V_pad]
              ─► Slice [:, :vocab] (drops the zero padding rows) ─► Cast f32
    """
    g, cfg = ctx.g, ctx.decoder
    if ctx.spec.gather_context_logits:
        return emit_context_head(ctx, x)
    with g.scope("head"):
        last = g.op("Unsqueeze", ctx.shared["last_index"], g.int64s(1), name="last_index")
        x = g.op("GatherND", x, last, name="last_token", batch_dims=1)  # [B, H]
    x = norm(ctx, x, Role.FINAL_NORM, Role.FINAL_NORM_BIAS, None, "final_norm")
    with g.scope("lm_head"):
        logits = lm_head(ctx, x)
        if ctx.tp > 1:
            local = g.op("Transpose", logits, name="vocab_major", perm=[1, 0])
            gathered = collectives.all_gather(g, local, ctx.tp)
            logits = g.op("Transpose", gathered, name="batch_major", perm=[1, 0])
            logits = g.op("Slice", logits, g.int64s(0), g.int64s(cfg.vocab_size), g.int64s(1),
                          name="unpad")
        return g.op("Cast", logits, outputs=["logits"], to=FLOAT32)


def emit_context_head(ctx: EmitContext, x: str) -> str:
    """float32 ``context_logits`` [B, S, V] (a graph output of its own) and the ``logits``
    [B, V] at ``last_index`` gathered from them.

    x [B,S,H] ─► final_norm ─► lm_head MatMul
      tp = 1: [B, S, V] ─► Cast f32 ─► context_logits
      tp > 1: [B, S, V/tp] ─► Transpose [V/tp, B, S] ─► all_gather [V_pad, B, S]
              ─► Transpose [B, S, V_pad] ─► Slice [..., :vocab] ─► Cast f32 ─► context_logits
    context_logits ─► GatherND(last_index, batch_dims=1) [B, V] ─► logits
    """
    g, cfg = ctx.g, ctx.decoder
    x = norm(ctx, x, Role.FINAL_NORM, Role.FINAL_NORM_BIAS, None, "final_norm")
    with g.scope("lm_head"):
        logits = lm_head(ctx, x)  # [B, S, V/tp]
        if ctx.tp > 1:
            local = g.op("Transpose", logits, name="vocab_major", perm=[2, 0, 1])
            gathered = collectives.all_gather(g, local, ctx.tp)  # [V_pad, B, S]
            logits = g.op("Transpose", gathered, name="batch_major", perm=[1, 2, 0])
            logits = g.op("Slice", logits, g.int64s(0), g.int64s(cfg.vocab_size), g.int64s(2),
                          name="unpad")
        context = g.op("Cast", logits, outputs=["context_logits"], to=FLOAT32)
    with g.scope("head"):
        last = g.op("Unsqueeze", ctx.shared["last_index"], g.int64s(1), name="last_index")
        return g.op("GatherND", context, last, outputs=["logits"], name="last_token",
                    batch_dims=1)  # [B, V]


def lm_head(ctx: EmitContext, x: str) -> str:
    """``x @ lm_head.T``: a MatMul, or the quantized projection of a checkpoint quantized with
    ``quantize_lm_head`` (kiln/builder/graph/linear.py)."""
    quant = ctx.spec.quantization
    if quant is not None and quant.quantize_lm_head:
        return ctx.linear(Role.LM_HEAD, None)(x)
    return ctx.g.op("MatMul", x, ctx.weight(Role.LM_HEAD, linear=True))
