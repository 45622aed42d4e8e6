"""Epilogue descriptions of the one-row projections: where the pairing fits, and the
references' ``epilogue`` keyword (the op applied to the projection's output)."""

from __future__ import annotations

import torch

from kiln.plugins.gated_mlp.triton_reference import silu_and_mul
from kiln.plugins.gemv import triton_reference as gemv_ref
from kiln.plugins.gemv.epilogue import RopeToCache, SiluMul, pair_half
from kiln.plugins.quant_linear import triton_reference as ql_ref
from kiln.quantization.config import QuantConfig
from kiln.quantization.formats import quantize_weight


def _unused(*args, **kwargs):
    raise AssertionError("not called")


def test_pair_half():
    assert pair_half(SiluMul(_unused), 28672, 32) == 14336
    assert pair_half(SiluMul(_unused), 28672, 7) is None
    assert pair_half(SiluMul(_unused), 30, 8) is None  # 15 gate rows: not whole programs
    rope = RopeToCache(_unused, None, None, None, None, None, 32, 8, 128)
    assert pair_half(rope, 6144, 8) == 64
    assert pair_half(rope, 6144, 256) is None  # 128 pairs span more than a half of 64
    assert pair_half(rope, 4096, 8) is None  # not the heads' rows


def test_references_apply_the_epilogue_to_their_output():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    w = torch.randn(32, 64) / 8
    q, scale = quantize_weight(w, QuantConfig("int8_wo"))
    y = ql_ref.int8_weight_only_linear(x, q, scale)
    got = ql_ref.int8_weight_only_linear(x, q, scale, epilogue=SiluMul(silu_and_mul))
    assert got.shape == (3, 16) and torch.equal(got, silu_and_mul(y))
    got = gemv_ref.gemv(x[:1], w, epilogue=SiluMul(silu_and_mul))
    assert torch.equal(got, silu_and_mul(gemv_ref.gemv(x[:1], w)))
