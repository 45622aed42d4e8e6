"""Grouped-query attention with rotary and the KV-cache write, as one ONNX Runtime CPU op.

``com.microsoft.GroupQueryAttention`` does what the rotary, kv_cache and attention plugins do
together, in one node per layer: it rotates q and k, writes k and v into the caches at each
row's length, and attends over the valid cache rows only (not the whole ``max_seq_len``).

Inputs: ``qkv`` [B, S, (Hq + 2 Hkv) * D] (the packed projection); the caches
``past_key``/``past_value`` [B, Hkv, Smax, D]; ``seqlens_k`` int32 [B] = ``past_len +
last_index`` (row b's last valid position); ``total_sequence_length`` int32 [1] =
``max(past_len) + S``; rotary tables ``cos``, ``sin`` [Smax, D/2]. Outputs ``out``
[B, S, Hq * D] and the updated caches (bound to the past buffers, they are written in place).

Row kinds, decided from the shapes (ONNX Runtime's rules): every row a prompt from position 0
(``max(past_len) == 0``; right-padded rows allowed), every row one token (decode; any past),
or one row of S > 1 tokens with a past (a continued prefill). A run mixing a continued prefill
with other rows is an error, so executors plan such runs apart (``kiln.runtime.rows``). Rotary
positions are the cache positions (``past_len + j``). Sliding window W ->
``local_window_size = W`` (ONNX Runtime 1.31 counts the query's own key in the window; the
plugin test pins this).

The decomposed form is the attention, rotary and kv_cache plugins' own forms.
Requirements: RoPE with static tables (not ALiBi, not dynamic NTK), head_dim a multiple of 16
(the op's rotary), no qk_norm (the op takes the packed projection), onnx backend for cpu, and
none of attention/rotary/kv_cache disabled.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import PositionType, RopeScalingType
from kiln.plugins.registry import (
    PluginContext,
    PluginMode,
    PluginSpec,
    always,
    plugin_option,
    register_plugin,
)

DOMAIN = "com.microsoft"
REPLACES = ("attention", "rotary", "kv_cache")


@dataclass(frozen=True)
class GqaAttrs:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None


def _fused_blocker(ctx: PluginContext) -> str | None:
    reason = ctx.onnxruntime_cpu()
    if reason is not None:
        return reason
    cfg = ctx.decoder
    disabled = [name for name in REPLACES if ctx.requested.get(name) is PluginMode.DISABLE]
    if disabled:
        return f"{plugin_option(disabled[0], 'disable')} asks for the standard decomposed forms"
    if cfg.position_type is not PositionType.ROPE:
        return f"GroupQueryAttention has no {cfg.position_type.value} position bias"
    if cfg.rope_scaling is not None and cfg.rope_scaling.type is RopeScalingType.DYNAMIC:
        return "dynamic NTK rotary tables change per row; GroupQueryAttention takes one table"
    if cfg.head_dim % 16:
        return f"GroupQueryAttention's rotary needs head_dim % 16 == 0, found {cfg.head_dim}"
    if cfg.qk_norm:
        return "qk_norm normalizes q and k between projection and attention"
    return None


SPEC = register_plugin(PluginSpec(
    name="gqa",
    summary="Rotary, KV-cache write and attention as one ONNX Runtime CPU op "
            "(com.microsoft.GroupQueryAttention).",
    fused_form="com.microsoft.GroupQueryAttention (onnx backend, cpu target)",
    decomposed_form="the attention, rotary and kv_cache plugins",
    occurs=always,
    fused_blocker=_fused_blocker,
    replaces=REPLACES,
))
