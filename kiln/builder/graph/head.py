"""The last part's head: pick each row's last valid token, final norm, lm_head, gather vocab.

Built with ``gather_context_logits`` the head runs on every position instead and also returns
``context_logits`` [B, S, V]; ``logits`` [B, V] are then gathered from them. Without it the
graph is exactly the one the golden graphs pin.
"""

from __future__ import annotations

from collections.abc import Callable

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


# An onnx engine projects a window's positions onto the vocabulary in this many pieces: ONNX
# Runtime checks a run's terminate flag (Ctrl-C, LLM.close) between nodes only, and one MatMul
# of a 2,048-token window onto a 49,152-token vocabulary takes ~1 s on 2 cores.
CONTEXT_HEAD_PIECES = 8


def emit_context_head(ctx: EmitContext, x: str) -> str:
    """float32 ``context_logits`` [B, S, V] (a graph output of its own) and the ``logits``
    [B, V] at ``last_index`` gathered from them.

    x [B,S,H] ─► final_norm ─► lm_head MatMul
      tp = 1: [B, S, V] ─► Cast f32 ─► context_logits
              (onnx: Split S into pieces ─► MatMul ─► Cast f32 each ─► Concat ─► context_logits)
      tp > 1: [B, S, V/tp] ─► Transpose [V/tp, B, S] ─► all_gather [V_pad, B, S]
              ─► Transpose [B, S, V_pad] ─► Slice [..., :vocab] ─► Cast f32 ─► context_logits
              (onnx: the MatMul of each piece of S, then Concat)
    context_logits ─► GatherND(last_index, batch_dims=1) [B, V] ─► logits
    """
    g, cfg = ctx.g, ctx.decoder
    x = norm(ctx, x, Role.FINAL_NORM, Role.FINAL_NORM_BIAS, None, "final_norm")
    with g.scope("lm_head"):
        if ctx.spec.backend == "onnx":
            project, f32 = head_projection(ctx), ctx.tp == 1
            pieces = [project(piece) for piece in _sequence_pieces(g, x, CONTEXT_HEAD_PIECES)]
            if f32:  # (each piece cast: the Concat writes the output, one copy of it less)
                pieces = [g.op("Cast", piece, to=FLOAT32) for piece in pieces]
            logits = g.op("Concat", *pieces, name="pieces", axis=1,
                          outputs=["context_logits"] if f32 else 1)
        else:
            logits = lm_head(ctx, x)  # [B, S, V/tp]
        if ctx.tp > 1:
            local = g.op("Transpose", logits, name="vocab_major", perm=[2, 0, 1])
            gathered = collectives.all_gather(g, local, ctx.tp)  # [V_pad, B, S]
            logits = g.op("Transpose", gathered, name="batch_major", perm=[1, 2, 0])
            logits = g.op("Slice", logits, g.int64s(0), g.int64s(cfg.vocab_size), g.int64s(2),
                          name="unpad")
        context = logits if logits == "context_logits" else \
            g.op("Cast", logits, outputs=["context_logits"], to=FLOAT32)
    with g.scope("head"):
        last = g.op("Unsqueeze", ctx.shared["last_index"], g.int64s(1), name="last_index")
        return g.op("GatherND", context, last, outputs=["logits"], name="last_token",
                    batch_dims=1)  # [B, V]


def lm_head(ctx: EmitContext, x: str) -> str:
    """``x @ lm_head.T``: a MatMul, or the quantized projection of a checkpoint quantized with
    ``quantize_lm_head`` (kiln/builder/graph/linear.py)."""
    return head_projection(ctx)(x)


def head_projection(ctx: EmitContext) -> Callable[[str], str]:
    """:func:`lm_head` as a projection whose weight side is emitted once, for several inputs."""
    quant = ctx.spec.quantization
    if quant is not None and quant.quantize_lm_head:
        return ctx.linear(Role.LM_HEAD, None)
    weight = ctx.weight(Role.LM_HEAD, linear=True)
    return lambda x: ctx.g.op("MatMul", x, weight)


def _sequence_pieces(g, x: str, count: int) -> list[str]:
    """x [B, S, H] split along S into ``count`` pieces of ceil(S / count) positions, the last
    ones shorter or empty (Split's ``num_outputs`` refuses S < count)."""
    seq = g.op("Gather", g.op("Shape", x, name="window"), g.int64s(1), name="seq")  # [1]
    size = g.op("Div", g.op("Add", seq, g.int64s(count - 1), name="round_up"), g.int64s(count),
                name="piece")
    left = g.op("Sub", seq, g.op("Mul", g.int64s(*range(count)), size, name="starts"),
                name="left")
    sizes = g.op("Min", g.op("Max", left, g.int64s(0), name="not_negative"), size, name="sizes")
    return g.op("Split", x, sizes, name="pieces", axis=1, outputs=count)
