"""KV-cache plugin: both forms write rows past_len[b]..+S of each batch row, nothing else."""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.kv_cache import onnx as kv_onnx
from kiln.plugins.kv_cache.reference import update_cache
from tests.plugins.onnx_op import run_form


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("past_len,s", [([0, 5, 9], 3), ([7], 1), ([0, 0], 12)])
def test_cache_update(fused, dtype, past_len, s):
    torch.manual_seed(0)
    b = len(past_len)
    past = torch.randn(b, 2, 12, 8).to(dtype)
    new = torch.randn(b, 2, s, 8).to(dtype)
    lengths = torch.tensor(past_len)
    (got,) = run_form(lambda g, p, n, l_: kv_onnx.emit(g, p, n, l_, "present", fused),
                      {"past": past, "new": new, "past_len": lengths})
    want = update_cache(past, new, lengths)
    assert torch.equal(got, want)
    assert not torch.equal(want, past)
