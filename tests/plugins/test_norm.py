"""Norm plugin: fused and decomposed ONNX forms match the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kiln.config import NormType
from kiln.plugins.norm import NormAttrs
from kiln.plugins.norm import onnx as norm_onnx
from kiln.plugins.norm.reference import norm
from tests.plugins.onnx_op import ELEM, close, run_form


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind,bias", [(NormType.RMSNORM, False), (NormType.LAYERNORM, False),
                                       (NormType.LAYERNORM, True)])
@pytest.mark.parametrize("shape", [(2, 3, 64), (5, 48)])
def test_norm_forms(fused, dtype, kind, bias, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    w = (torch.randn(shape[-1]) * 0.1 + 1).to(dtype)
    b = (torch.randn(shape[-1]) * 0.1).to(dtype) if bias else None
    attrs = NormAttrs(kind=kind, eps=1e-5, dtype=ELEM[dtype])
    inputs = {"x": x, "w": w, **({"b": b} if bias else {})}
    (got,) = run_form(lambda g, *n: norm_onnx.emit(g, n[0], n[1], n[2] if bias else None, attrs,
                                                   fused), inputs)
    assert got.dtype == dtype
    assert close(got, norm(x, w, b, kind, 1e-5), dtype)
