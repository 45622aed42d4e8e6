"""Norm: RMSNorm or LayerNorm over the last axis, statistics in float32.

Inputs: ``x`` [..., N] (model dtype), ``weight`` [N], ``bias`` [N] (LayerNorm only, optional).
Output: like ``x``. RMSNorm: ``cast(x32 / sqrt(mean(x32^2) + eps)) * weight``; LayerNorm:
``cast((x32 - mean) / sqrt(var + eps)) * weight + bias``.

Fused form: ``RMSNormalization`` (opset 23) / ``LayerNormalization`` (opset 17) with
``stash_type`` float32; TensorRT imports LayerNormalization as a NORMALIZATION layer.
Decomposed form: Cast, ReduceMean, Sqrt, Div, Mul, Add.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import NormType
from kiln.plugins.registry import PluginSpec, always, register_plugin


@dataclass(frozen=True)
class NormAttrs:
    kind: NormType
    eps: float
    dtype: int  # onnx TensorProto element type of x


SPEC = register_plugin(PluginSpec(
    name="norm",
    summary="RMSNorm/LayerNorm as one op (RMSNormalization/LayerNormalization).",
    fused_form="ONNX RMSNormalization / LayerNormalization",
    decomposed_form="ReduceMean/Sqrt/Div elementwise ops",
    occurs=always,
    fused_blocker=always,
))
