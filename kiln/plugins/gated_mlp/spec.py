"""Gated MLP (SwiGLU): ``down(silu(gate) * up)`` with ``[gate | up] = x @ w_gate_up (+ b)``.

Inputs: ``x`` [B, S, H]; ``w_gate_up`` [H, 2I] (``[gate | up]`` columns, graph layout
[in, out]); optional ``b_gate_up`` [2I]; ``w_down`` [I, H]. Output [B, S, H]: the
row-parallel partial product, before any all-reduce and the down bias (both belong to the
caller, which adds the bias once after the all-reduce).

Fused form: one node of the model-local function ``kiln.GatedMLP`` (``kiln.GatedMLPBias``
with the bias): ONNX Runtime runs its body, TensorRT's parser imports the body as one unit
and fuses the activation into the GEMMs. Decomposed form: the same ops inline, node by node.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import DecoderConfig
from kiln.plugins.registry import PluginSpec, always, register_plugin

DOMAIN = "kiln"


@dataclass(frozen=True)
class GatedMlpAttrs:
    intermediate_size: int  # I, local to the rank


def _occurs(decoder: DecoderConfig) -> str | None:
    if not decoder.gated_mlp:
        return f"the model's MLP is {decoder.mlp_type.value}, not gated"
    return None


SPEC = register_plugin(PluginSpec(
    name="gated_mlp",
    summary="SwiGLU MLP as one model-local function (kiln.GatedMLP).",
    fused_form="model-local function kiln.GatedMLP",
    decomposed_form="MatMul/Split/Sigmoid/Mul/MatMul inline",
    occurs=_occurs,
    fused_blocker=always,
))
