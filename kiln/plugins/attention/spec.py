"""Attention over a contiguous KV cache, with the cache update, for right-padded batches.

Inputs: ``q`` [B, Hq, S, D]; ``k``, ``v`` [B, Hkv, S, D] (this step's keys/values, post
rotary); ``past_key``, ``past_value`` [B, Hkv, Smax, D]; ``past_len`` [B] int64 (the write
index); ``mask``: bool [B, 1, S, Smax] (True = may attend) or additive [B, Hq, S, Smax] in
the model dtype (ALiBi). Hq is a multiple of Hkv (MHA, GQA, MQA: query head h reads KV head
h // (Hq / Hkv)).

Outputs: ``out`` [B, Hq, S, D]; ``present_key``/``present_value``: the past with row b's
positions ``[past_len[b], past_len[b] + S)`` overwritten by ``k[b]``/``v[b]`` (the caller keeps
``past_len[b] + S <= Smax``). Scores ``q k^T * scale`` and softmax are float32 in the
decomposed form and the reference.

Fused form: ``TensorScatter(mode="linear", axis=-2)`` -> TensorRT KV_CACHE_UPDATE (in place;
the presents are graph outputs directly) and ``Attention(is_causal=0)`` with the explicit
mask -> TensorRT attention layers. ``is_causal=1`` is never used: TensorRT-RTX reads it as
top-left causal (see TENSORRT_NOTES.md).
Decomposed form: ScatterElements for the cache, MatMul/Softmax/MatMul grouped by KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.plugins.registry import PluginContext, PluginSpec, always, register_plugin


@dataclass(frozen=True)
class AttentionAttrs:
    num_heads: int  # query heads (local to the rank)
    num_kv_heads: int
    head_dim: int
    scale: float
    max_seq_len: int  # Smax, the cache length
    dtype: int  # onnx TensorProto element type of q/k/v and the caches


@dataclass(frozen=True)
class AttentionMask:
    """The mask value and its kind: bool [B, 1, S, Smax] or additive [B, Hq, S, Smax]."""

    value: str
    additive: bool


def _fused_blocker(ctx: PluginContext) -> str | None:
    if ctx.backend == "tensorrt" and ctx.dtype == "float32":
        return ("TensorRT has no fused attention kernel for float32 (the build fails with "
                "'Attention operation was not supported by a dedicated kernel'); build "
                "float16 or bfloat16")
    return None


SPEC = register_plugin(PluginSpec(
    name="attention",
    summary="Attention with KV-cache update (TensorScatter + Attention).",
    fused_form="ONNX TensorScatter + Attention -> TensorRT KV_CACHE_UPDATE + attention layers",
    decomposed_form="ScatterElements cache update, MatMul/Softmax attention",
    occurs=always,
    fused_blocker=_fused_blocker,
    trt_layers=("KV_CACHE_UPDATE", "ATTENTION_INPUT", "ATTENTION_OUTPUT"),
))
