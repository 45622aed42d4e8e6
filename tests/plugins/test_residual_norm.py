"""residual_norm plugin: both forms return (x + delta, norm(x + delta)) as the reference does."""

from __future__ import annotations

import pytest
import torch

from kiln.config import NormType
from kiln.plugins.norm import NormAttrs
from kiln.plugins.residual_norm import onnx as residual_norm_onnx
from kiln.plugins.residual_norm.reference import residual_norm
from tests.plugins.onnx_op import ELEM, close, run_form


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind,bias", [(NormType.RMSNORM, False),
                                       (NormType.LAYERNORM, False), (NormType.LAYERNORM, True)])
def test_residual_norm_forms(fused, dtype, kind, bias):
    torch.manual_seed(0)
    x, delta = ((torch.randn(2, 3, 64) * 3 + 1).to(dtype) for _ in range(2))
    w = (torch.randn(64) * 0.1 + 1).to(dtype)
    b = (torch.randn(64) * 0.1).to(dtype) if bias else None
    attrs = NormAttrs(kind=kind, eps=1e-5, dtype=ELEM[dtype])
    inputs = {"x": x, "delta": delta, "w": w, **({"b": b} if bias else {})}
    total, normed = run_form(
        lambda g, *n: residual_norm_onnx.emit(g, n[0], n[1], n[2], n[3] if bias else None, attrs,
                                              fused, norm_fused=True), inputs)
    want_total, want_normed = residual_norm(x, delta, w, b, kind, 1e-5)
    assert total.dtype == normed.dtype == dtype
    assert close(total, want_total, dtype) and close(normed, want_normed, dtype)
