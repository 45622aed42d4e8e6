"""PyTorch reference of the Triton gated-MLP activation: ``silu(gate) * up``.

Contract, shared with :mod:`kiln.plugins.gated_mlp.triton_kernels`: ``silu_and_mul(gate_up)``
takes the fused projection ``[T, 2*I]`` (``[gate | up]`` per row, the layout of the canonical
``mlp.gate_up`` weight) and returns ``[T, I]`` in its dtype; SiLU in float32, one rounding.
``silu_and_mul(gate_up, quant_scale, pre_quant_scale=None)`` (a static FP8 input scale, and the
down projection's smoothing vector ``[I]`` or None) returns that product quantized for the FP8
down projection: the rounded product, times ``pre_quant_scale`` in float32 and rounded again (as
the projection applies it), then float8_e4m3fn ``fp8(clamp(y / quant_scale, -448, 448))``
(:func:`kiln.plugins.quant_linear.triton_reference.quantize_fp8_input`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.plugins.quant_linear.triton_reference import quantize_fp8_input


def silu_and_mul(gate_up: torch.Tensor, quant_scale: torch.Tensor | None = None,
                 pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    if pre_quant_scale is not None and quant_scale is None:
        raise ValueError("silu_and_mul: pre_quant_scale comes with quant_scale")
    gate, up = gate_up.float().chunk(2, dim=-1)
    y = (F.silu(gate) * up).to(gate_up.dtype)
    if quant_scale is None:
        return y
    if pre_quant_scale is not None:
        y = (y.float() * pre_quant_scale).to(gate_up.dtype)
    return quantize_fp8_input(y, quant_scale)[0]
