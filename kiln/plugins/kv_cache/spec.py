"""KV-cache update: write this step's keys (or values) into a contiguous cache.

Inputs: ``past`` [B, Hkv, Smax, D] (model dtype); ``new`` [B, Hkv, S, D]; ``past_len`` [B]
int64, the write index. Output ``present``: ``past`` with rows ``[past_len[b], past_len[b] +
S)`` of batch row b replaced by ``new[b]`` (the caller keeps ``past_len[b] + S <= Smax``).
``present`` is a graph output under its own name (``present_key_{i}``/``present_value_{i}``).

Fused form: ``TensorScatter(mode="linear", axis=-2)`` -> TensorRT KV_CACHE_UPDATE, which
updates the cache in place (the cache must be a graph input and the result a graph output,
with nothing in between). Decomposed form: ``ScatterElements`` on axis 2 with the index
``past_len[b] + s``; TensorRT then copies the whole cache every step.
"""

from __future__ import annotations

from kiln.plugins.registry import PluginSpec, always, register_plugin

SPEC = register_plugin(PluginSpec(
    name="kv_cache",
    summary="KV-cache update in place (TensorScatter).",
    fused_form="ONNX TensorScatter -> TensorRT KV_CACHE_UPDATE (in place)",
    decomposed_form="ScatterElements (a copy of the cache per step)",
    occurs=always,
    fused_blocker=always,
    trt_layers=("KV_CACHE_UPDATE",),
))
