"""The last part's head: pick each row's last valid token, final norm, lm_head, gather vocab."""

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
    with g.scope("head"):
        last = g.op("Unsqueeze", ctx.shared["last_index"], g.int64s(1), name="last_index")
        x = g.op("GatherND", x, last, name="last_token", batch_dims=1)  # [B, H]
    x = norm(ctx, x, Role.FINAL_NORM, Role.FINAL_NORM_BIAS, None, "final_norm")
    with g.scope("lm_head"):
        logits = g.op("MatMul", x, ctx.weight(Role.LM_HEAD, linear=True))
        if ctx.tp > 1:
            local = g.op("Transpose", logits, name="vocab_major", perm=[1, 0])
            gathered = collectives.all_gather(g, local, ctx.tp)
            logits = g.op("Transpose", gathered, name="batch_major", perm=[1, 0])
            logits = g.op("Slice", logits, g.int64s(0), g.int64s(cfg.vocab_size), g.int64s(1),
                          name="unpad")
        return g.op("Cast", logits, outputs=["logits"], to=FLOAT32)
