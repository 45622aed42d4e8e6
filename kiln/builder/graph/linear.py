"""The decoder's projections (qkv, o, gate_up, up, down) in every weight format and backend form.

``ctx.linear(role, layer)`` emits a projection's weight side at once and returns a Projection;
calling it on an activation emits the input side and the product. Attention, the MLP and the
plugins' unfused forms all go through it, so every format has one form per backend:

| checkpoint | ``onnx`` (ONNX Runtime) | ``tensorrt`` (TENSORRT_NOTES.md "Quantization forms") |
|---|---|---|
| float | MatMul(x, Transpose(W)) | same |
| int4_wo, int4_awq | com.microsoft.MatMulNBits bits 4, block_size = group_size | DequantizeLinear(W INT4 [K, N], s [K/g, N], axis 0, block_size g) ─► MatMul |
| int8_wo | MatMulNBits bits 8, each channel's scale repeated over its blocks | DequantizeLinear(W int8 [K, N], s [N], axis 1) ─► MatMul |
| int8_sq | x ─► QuantizeLinear/DequantizeLinear(input_scale, int8) ─► MatMul ◄─ DequantizeLinear(W int8 [K, N], s [N], axis 1) | same |
| fp8 | as int8_sq with float8e4m3fn values (per-tensor or per-channel weight scales) | same (sm89, sm120, sm121) |

A ``pre_quant_scale`` [K] multiplies the input first (``Mul``). ONNX Runtime fuses the int8_sq
form into its integer kernel (MatMulIntegerToFloat) in float32 builds; float16 builds run it
through Casts around float kernels (its CPU provider has no float16 Q/DQ fusion).

Build-time weight transforms, one tensor at a time (the builder streams weights): MatMulNBits
takes unsigned values with the default zero point 2^(bits-1) in blocks along K, so the signed
values are shifted (XOR of the sign bit: v + 2^(bits-1) in two's complement) and int8 rows are
padded to whole blocks with zeros; DequantizeLinear takes [K, N], so weights are transposed
(INT4 unpacked, transposed and repacked: ONNX packs INT4 low nibble first along the flattened
tensor). Scales are cast to the build dtype (the ops take the activation's type); quantized
values keep theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from onnx import TensorProto

from kiln.errors import CheckpointError
from kiln.graph.emitter import WeightProjection
from kiln.quantization.config import (
    INPUT_SCALE,
    PRE_QUANT_SCALE,
    WEIGHT_SCALE,
    Granularity,
    QuantConfig,
)
from kiln.quantization.formats import pack_int4, unpack_int4
from kiln.roles import Role, companion, parse_tensor
from kiln.tensorio import TensorInfo

if TYPE_CHECKING:
    from kiln.builder.graph.context import EmitContext

ACTIVATION_TYPES = {"int8": TensorProto.INT8, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN}
INT8_BLOCKS = (128, 64, 32, 16)  # MatMulNBits block sizes for int8 weights, largest dividing K
Product = Callable[[str, str], str]  # (input, node name) -> output


class QuantizedProjection:
    """A quantized projection: ``(Mul pre_quant_scale) ─► product`` (the format's form)."""

    weight = None

    def __init__(self, ctx: EmitContext, name: str, pre: str | None, product: Product):
        self.ctx, self.name, self.pre, self.product = ctx, name, pre, product

    def __call__(self, x: str, name: str | None = None) -> str:
        name = name or self.name
        if self.pre is not None:
            x = self.ctx.g.op("Mul", x, self.pre, name=f"{name}_pre_quant_scale")
        return self.product(x, name)


def projection(ctx: EmitContext, role: Role,
               layer: int | None) -> WeightProjection | QuantizedProjection:
    """``role``'s projection of ``layer`` (see the module docstring)."""
    short = role.name(layer).rsplit(".", 1)[0].split(".")[-1]  # qkv, o, gate_up, up, down
    quant = ctx.spec.quantization
    if quant is None:
        return WeightProjection(ctx.g, ctx.weight(role, layer, linear=True), short)
    pre = _scale(ctx, companion(role, layer, PRE_QUANT_SCALE))
    if quant.activation_dtype is None and ctx.spec.backend == "onnx":
        product = _matmul_nbits(ctx, role, layer, quant)
    else:
        product = _qdq(ctx, role, layer, short, quant)
    return QuantizedProjection(ctx, short, pre, product)


def check_scales(path: Path, infos: dict[str, TensorInfo], quant: QuantConfig) -> None:
    """Raise CheckpointError unless every quantized weight of a rank file has the scale shape
    its format needs for the weight's local shape (a row-parallel shard must hold whole groups)."""
    for name, info in infos.items():
        role, layer, kind = parse_tensor(name)
        if kind != WEIGHT_SCALE:
            continue
        weight = infos[role.name(layer)].shape
        n, k = weight[0], weight[1] * (2 if quant.info.weight_dtype == "int4" else 1)
        expected = {Granularity.PER_TENSOR: (), Granularity.PER_CHANNEL: (n,),
                    Granularity.PER_GROUP: (n, k // (quant.group_size or 1))}[quant.weight_scales]
        whole = quant.weight_scales is not Granularity.PER_GROUP or k % quant.group_size == 0
        if tuple(info.shape) != expected or not whole:
            fix = "re-quantize with a group_size that divides every rank's input features"
            if (whole and quant.weight_scales is Granularity.PER_GROUP and len(info.shape) == 2
                    and info.shape[0] == n and info.shape[1] and k % info.shape[1] == 0):
                fix = (f"its scales are of group_size {k // info.shape[1]}: config.json's "
                       f"quantization.group_size does not match the tensors (use the config.json "
                       f"kiln quantize wrote)")
            raise CheckpointError(
                f"{path}: {name} has shape {list(info.shape)}, expected {list(expected)} for a "
                f"[{n}, {k}] {quant.qformat} weight (group_size {quant.group_size}); {fix}")


def _scale(ctx: EmitContext, name: str, tensor: torch.Tensor | None = None) -> str | None:
    """A float32 companion (or its transform ``tensor``) as an initializer in the build dtype."""
    if tensor is None:
        if name not in ctx.weights.infos:
            return None
        tensor = ctx.weights.raw(name)
    return ctx.g.weight(name, tensor.to(ctx.weights.dtype))


def _matmul_nbits(ctx: EmitContext, role: Role, layer: int, quant: QuantConfig) -> Product:
    """x [.., K] ─► MatMulNBits(B uint8 [N, K/block, block * bits / 8], scales [N, K/block])"""
    name, scale_name = role.name(layer), companion(role, layer, WEIGHT_SCALE)
    blob, scales, block, k = nbits_weight(ctx.weights.raw(name), ctx.weights.raw(scale_name),
                                          quant)
    b, s = ctx.g.weight(name, blob), _scale(ctx, scale_name, scales)
    bits = 4 if quant.info.weight_dtype == "int4" else 8
    # accuracy_level 4: int8 activation blocks and integer products (--weight_only_int8_compute)
    level = 4 if ctx.spec.weight_only_int8_compute else None
    return lambda x, node: ctx.g.op("MatMulNBits", x, b, s, name=node, domain="com.microsoft",
                                    K=k, N=blob.shape[0], bits=bits, block_size=block,
                                    accuracy_level=level)


def nbits_weight(stored: torch.Tensor, scale: torch.Tensor,
                 quant: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(B, scales [N, blocks], block_size, K) of MatMulNBits for a stored int4/int8 weight."""
    if quant.info.weight_dtype == "int4":
        n, k = stored.shape[0], stored.shape[1] * 2
        group = quant.group_size
        # Each nibble's two's complement v becomes v + 8 = v XOR 8 (unsigned, zero point 8).
        return (stored ^ 0x88).view(n, k // group, group // 2), scale, group, k
    n, k = stored.shape
    block = next((b for b in INT8_BLOCKS if k % b == 0), INT8_BLOCKS[0])
    blocks = -(-k // block)
    values = torch.full((n, blocks * block), 0x80, dtype=torch.uint8)  # padding: value 0
    values[:, :k] = stored.view(torch.uint8) ^ 0x80  # v + 128: zero point 128
    return values.view(n, blocks, block), scale[:, None].expand(n, blocks).contiguous(), block, k


def _qdq(ctx: EmitContext, role: Role, layer: int, short: str, quant: QuantConfig) -> Product:
    """
    W [K, N] ─► DequantizeLinear(weight_scale) ───────────────────────────┐
    x ─► (QuantizeLinear ─► DequantizeLinear (input_scale), W8A8 only) ─► MatMul
    """
    g, name = ctx.g, role.name(layer)
    values, data_type, dims = kn_weight(ctx.weights.raw(name), quant)
    scale_name = companion(role, layer, WEIGHT_SCALE)
    scale = ctx.weights.raw(scale_name)
    granularity = quant.weight_scales
    axis = {Granularity.PER_CHANNEL: 1, Granularity.PER_GROUP: 0}.get(granularity)
    if granularity is Granularity.PER_GROUP:
        scale = scale.t().contiguous()  # [K / g, N]
    weight = g.op("DequantizeLinear", g.weight(name, values, data_type, dims),
                  _scale(ctx, scale_name, scale), name=f"{short}_weight", axis=axis,
                  block_size=quant.group_size if granularity is Granularity.PER_GROUP else None)
    activation = quant.activation_dtype
    if activation is None:
        return lambda x, node: g.op("MatMul", x, weight, name=node)
    input_scale = _scale(ctx, companion(role, layer, INPUT_SCALE))
    zero = g.zero_point(ACTIVATION_TYPES[activation])

    def product(x: str, node: str) -> str:
        q = g.op("QuantizeLinear", x, input_scale, zero, name=f"{node}_input")
        return g.op("MatMul", g.op("DequantizeLinear", q, input_scale, zero,
                                   name=f"{node}_input"), weight, name=node)
    return product


def kn_weight(stored: torch.Tensor, quant: QuantConfig) -> tuple[torch.Tensor, int | None,
                                                                 list[int] | None]:
    """(bytes, ONNX data type or None, dims or None) of a stored [N, K] weight as [K, N]."""
    if quant.info.weight_dtype != "int4":
        return stored.t().contiguous(), None, None
    values = unpack_int4(stored).t().contiguous()  # [K, N] int8 in [-8, 7]
    flat = values.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return pack_int4(flat), TensorProto.INT4, list(values.shape)
