"""Residual add + norm as one ONNX Runtime CPU op.

Inputs: the residual stream ``x`` and the block output ``delta`` [B, S, N] (model dtype),
``weight`` [N], ``bias`` [N] (LayerNorm only, optional). Outputs ``(x + delta,
norm(x + delta))``: the new residual stream and its norm (see the norm plugin for the norm).

Fused form: ``com.microsoft.SkipSimplifiedLayerNormalization`` (RMSNorm) /
``SkipLayerNormalization`` (LayerNorm), one node where the standard graph has an Add and a
norm. Layers hand their last residual add to the next layer's first norm, so a sequential
layer has two such nodes and a parallel one (Falcon) one. Decomposed form: Add, then the norm
plugin's form. Only for graphs built for ONNX Runtime's CPU provider.
"""

from __future__ import annotations

from kiln.plugins.registry import PluginContext, PluginSpec, always, register_plugin

DOMAIN = "com.microsoft"


def _fused_blocker(ctx: PluginContext) -> str | None:
    return ctx.onnxruntime_cpu()


SPEC = register_plugin(PluginSpec(
    name="residual_norm",
    summary="Residual add + RMSNorm/LayerNorm as one ONNX Runtime CPU op "
            "(com.microsoft.Skip[Simplified]LayerNormalization).",
    fused_form="com.microsoft.SkipSimplifiedLayerNormalization / SkipLayerNormalization "
               "(onnx backend, cpu target)",
    decomposed_form="Add, then the norm plugin's form",
    occurs=always,
    fused_blocker=_fused_blocker,
))
