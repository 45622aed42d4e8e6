"""Attention of a right-padded batch of queries over contiguous KV caches.

Inputs: ``q`` [B, Hq, S, D] (post rotary); ``keys``, ``values`` [B, Hkv, Smax, D] (the caches
after this step's update, see the kv_cache plugin); ``mask``: bool [B, 1, S, Smax] (True = may
attend) or additive [B, Hq, S, Smax] in the model dtype (ALiBi). Hq is a multiple of Hkv (MHA,
GQA, MQA: query head h reads KV head h // (Hq / Hkv)). Output ``out`` [B, Hq, S, D]:
``softmax(q k^T * scale + mask) v``; scores and softmax are float32 in the decomposed form
and the reference.

Fused form: ``Attention(is_causal=0)`` with the explicit mask -> TensorRT attention layers
(ATTENTION_INPUT/OUTPUT). ``is_causal=1`` is never used: TensorRT-RTX reads it as top-left
causal (see TENSORRT_NOTES.md). Decomposed form: MatMul/Softmax/MatMul grouped by KV head.
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


# TensorRT's fused attention kernels, probed with TensorRT-RTX 1.7.1.116 (sm86) on kiln's
# graphs: float16 and bfloat16 head dims 16..256 in steps of 8 build; head dims 8, 12, 20, 36,
# 100, 512, float32, and fewer than 4 query heads per rank (1, 2 and 3 fail; 4, 5, 6, 8, 12, 16
# build) fail with "Attention operation was not supported by a dedicated kernel".
TRT_HEAD_DIMS = range(16, 257, 8)
TRT_MIN_HEADS = 4


def _fused_blocker(ctx: PluginContext) -> str | None:
    if ctx.backend != "tensorrt":
        return None
    heads = ctx.decoder.num_heads // ctx.tp_size
    if ctx.dtype == "float32":
        return ("TensorRT has no fused attention kernel for float32; build float16 or "
                "bfloat16")
    if ctx.decoder.head_dim not in TRT_HEAD_DIMS:
        return (f"TensorRT has no fused attention kernel for head_dim {ctx.decoder.head_dim} "
                f"(needs a multiple of 8 in 16..256)")
    if heads < TRT_MIN_HEADS:
        return (f"TensorRT has no fused attention kernel for {heads} query heads per rank "
                f"(needs {TRT_MIN_HEADS} or more; lower tp_size)")
    return None


SPEC = register_plugin(PluginSpec(
    name="attention",
    summary="Attention over the KV cache as one op (Attention).",
    fused_form="ONNX Attention -> TensorRT attention layers",
    decomposed_form="MatMul/Softmax/MatMul per KV-head group",
    occurs=always,
    fused_blocker=_fused_blocker,
    trt_layers=("ATTENTION_INPUT", "ATTENTION_OUTPUT"),
))
