"""Rotary plugin: fused and decomposed forms, table and per-token inputs, vs the reference."""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.rotary import RotaryAttrs
from kiln.plugins.rotary import onnx as rotary_onnx
from kiln.plugins.rotary.reference import rotary
from tests.plugins.onnx_op import ELEM, close, run_form


def tables(positions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(positions).float()[:, None] * inv_freq
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,h,s,d", [(2, 4, 3, 16), (1, 1, 5, 8), (3, 2, 1, 24)])
def test_table_form(fused, dtype, b, h, s, d):
    torch.manual_seed(0)
    x = torch.randn(b, h, s, d).to(dtype)
    cos, sin = (t.to(dtype) for t in tables(32, d))
    pos = torch.randint(0, 32, (b, s))
    attrs = RotaryAttrs(head_dim=d, dtype=ELEM[dtype])
    (got,) = run_form(lambda g, x_, c, s_, p: rotary_onnx.emit(g, x_, c, s_, p, attrs, fused),
                      {"x": x, "cos": cos, "sin": sin, "pos": pos})
    assert close(got, rotary(x, cos, sin, pos), dtype)


@pytest.mark.parametrize("fused", [True, False])
def test_per_token_form(fused):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 16)
    cos, sin = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    attrs = RotaryAttrs(head_dim=16, dtype=ELEM[torch.float32])
    (got,) = run_form(lambda g, x_, c, s_: rotary_onnx.emit(g, x_, c, s_, None, attrs, fused),
                      {"x": x, "cos": cos, "sin": sin})
    assert close(got, rotary(x, cos, sin), torch.float32)


def test_reference_matches_the_oracle_rotation():
    from kiln.reference import apply_rope
    x, pos = torch.randn(2, 3, 5, 16), torch.randint(0, 20, (2, 5))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    cos, sin = tables(32, 16)
    assert torch.allclose(rotary(x, cos, sin, pos), apply_rope(x, pos, inv_freq), atol=1e-6)
