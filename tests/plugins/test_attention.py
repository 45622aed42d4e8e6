"""Attention plugin: both forms match the reference for MHA/GQA/MQA, bool and additive masks."""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.attention import AttentionAttrs, AttentionMask
from kiln.plugins.attention import onnx as attention_onnx
from kiln.plugins.attention.reference import attention
from tests.plugins.onnx_op import ELEM, close, run_form

SMAX = 16


def causal(position_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(SMAX)[None, None, None, :] <= position_ids[:, None, :, None]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("additive", [False, True])
def test_attention_forms(fused, dtype, hq, hkv, additive):
    torch.manual_seed(0)
    b, s, d = 2, 3, 16
    q = torch.randn(b, hq, s, d).to(dtype)
    keys, values = (torch.randn(b, hkv, SMAX, d).to(dtype) for _ in range(2))
    positions = torch.tensor([[0, 1, 2], [7, 8, 9]])
    mask = causal(positions)
    if additive:  # ALiBi-like: per-head slopes times distance, -30000 where not allowed
        slopes = torch.linspace(0.5, 0.05, hq)[None, :, None, None]
        distance = (torch.arange(SMAX)[None, None, None] - positions[:, None, :, None]).float()
        mask = torch.where(mask, slopes * distance, torch.tensor(-30000.0)).to(dtype)
    attrs = AttentionAttrs(num_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5,
                           max_seq_len=SMAX, dtype=ELEM[dtype])
    (got,) = run_form(
        lambda g, q_, k_, v_, m_: attention_onnx.emit(g, q_, k_, v_, AttentionMask(m_, additive),
                                                      attrs, fused),
        {"q": q, "keys": keys, "values": values, "mask": mask})
    assert close(got, attention(q, keys, values, mask, d ** -0.5), dtype)


def test_prefill_fp8_output_refuses_mismatched_buffers():
    """The paged prefill's FP8 output (kiln.plugins.attention.triton_reference): a scale goes
    with a float8_e4m3fn buffer, a smoothing vector has Hq * D values."""
    from kiln.plugins.attention import triton_reference as ref

    k = v = torch.zeros(2, 1, 16, 16)
    table = torch.tensor([[0]], dtype=torch.int32)
    ctx_lens = torch.tensor([4], dtype=torch.int32)
    q = torch.randn(4, 2, 16)
    args = (q, k, v, table, ctx_lens, torch.zeros(1, dtype=torch.int32),
            torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match="quant_scale and a float8_e4m3fn out go together"):
        ref.paged_prefill_attention(*args, torch.empty_like(q), scale=0.25,
                                    quant_scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="Hq \\* D = 32 values, found 16"):
        ref.paged_prefill_attention(*args, torch.empty_like(q, dtype=torch.float8_e4m3fn),
                                    scale=0.25, quant_scale=torch.tensor(1.0),
                                    pre_quant_scale=torch.ones(16))
