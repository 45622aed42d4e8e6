"""Triton gated-MLP activation ``silu(gate) * up`` over the fused ``[gate | up]`` projection.

Same contract as :mod:`kiln.plugins.gated_mlp.triton_reference`. Grid ``(rows, column
blocks)``: reads each half once and writes the product once (the unfused torch path writes
``silu(gate)`` and reads it back); with ``quant_scale``, as FP8 for the down projection (its
rule: :func:`kiln.plugins.quant_linear.triton_kernels._quantize`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.plugins.pdl import enabled as pdl_enabled
from kiln.plugins.pdl.triton_kernels import prologue
from kiln.plugins.quant_linear.triton_kernels import _quantize


@triton.jit
def _silu_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, s_ptr, pqs_ptr, n_cols,
                     BLOCK: tl.constexpr, QUANT: tl.constexpr, SMOOTH: tl.constexpr,
                     PDL: tl.constexpr = False):
    prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    if QUANT:  # rounded to the model dtype first, as the unfused path's stored product
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        if SMOOTH:  # the projection's pre_quant_scale, rounded as it rounds it
            pqs = tl.load(pqs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = (y * pqs).to(x_ptr.dtype.element_ty).to(tl.float32)
        s = tl.load(s_ptr)
        y = _quantize(y, s, s, 1, True)
    tl.store(out_ptr + row * out_stride + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, quant_scale: torch.Tensor | None = None,
                 pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    t, two_i = gate_up.shape
    if two_i % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_and_mul: need contiguous rows of even width, found {two_i}")
    if pre_quant_scale is not None and quant_scale is None:
        raise ValueError("silu_and_mul: pre_quant_scale comes with quant_scale")
    inter = two_i // 2
    dtype = torch.float8_e4m3fn if quant_scale is not None else gate_up.dtype
    out = torch.empty((t, inter), dtype=dtype, device=gate_up.device)
    if t == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    pdl = pdl_enabled(gate_up.device)
    scale = quant_scale if quant_scale is not None else gate_up
    smoothing = pre_quant_scale if pre_quant_scale is not None else scale
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](
        gate_up, gate_up.stride(0), out, out.stride(0), scale, smoothing, inter, BLOCK=block,
        QUANT=quant_scale is not None, SMOOTH=pre_quant_scale is not None, PDL=pdl,
        num_warps=4, launch_pdl=pdl)
    return out
