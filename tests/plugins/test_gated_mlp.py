"""Gated MLP plugin: the model-local function and the inline ops match the reference."""

from __future__ import annotations

import pytest
import torch

from kiln.graph.emitter import WeightProjection
from kiln.plugins.gated_mlp import GatedMlpAttrs
from kiln.plugins.gated_mlp import onnx as mlp_onnx
from kiln.plugins.gated_mlp.reference import gated_mlp
from tests.plugins.onnx_op import close, run_form


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_forms(fused, dtype, bias):
    torch.manual_seed(0)
    h, i = 32, 48
    x = torch.randn(2, 3, h).to(dtype)
    w_gu = (torch.randn(h, 2 * i) * 0.2).to(dtype)
    b_gu = (torch.randn(2 * i) * 0.2).to(dtype) if bias else None
    w_down = (torch.randn(i, h) * 0.2).to(dtype)
    inputs = {"x": x, "w_gu": w_gu, **({"b_gu": b_gu} if bias else {}), "w_down": w_down}

    def emit(g, *names):
        b = names[2] if bias else None
        return mlp_onnx.emit(g, names[0], WeightProjection(g, names[1], "gate_up"), b,
                             WeightProjection(g, names[-1], "down"), GatedMlpAttrs(i), fused)
    (got,) = run_form(emit, inputs)
    want = gated_mlp(x.float(), w_gu.float(), None if b_gu is None else b_gu.float(),
                     w_down.float())
    assert close(got, want, dtype)
