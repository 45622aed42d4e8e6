"""gqa plugin: GroupQueryAttention matches the rotary + kv_cache + attention references for
each row kind it serves (padded prompts, decodes of different lengths, a continued prefill),
with GQA/MQA head groups, a sliding window, float32 and float16; invalid mixes are refused."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from kiln.graph.emitter import GraphEmitter, MemorySink
from kiln.plugins.gqa import GqaAttrs
from kiln.plugins.gqa import onnx as gqa_onnx
from kiln.plugins.gqa.reference import gqa
from tests.plugins.onnx_op import ELEM, close

SMAX, D = 24, 16


def run_gqa(qkv, past_key, past_value, past_len, last_index, cos, sin, attrs):
    """The plugin's node in a graph whose int32 lengths are computed as the decoder does."""
    g = GraphEmitter("gqa", MemorySink())
    elem = ELEM[qkv.dtype]
    names = [g.input(n, elem, list(t.shape)) for n, t in
             (("qkv", qkv), ("past_key", past_key), ("past_value", past_value), ("cos", cos),
              ("sin", sin))]
    seqlens = g.op("Cast", g.op("Add", g.input("past_len", TensorProto.INT64, ["b"]),
                                g.input("last_index", TensorProto.INT64, ["b"])),
                   to=TensorProto.INT32)
    total = g.op("Cast", g.op("Add", g.op("ReduceMax", "past_len", keepdims=1),
                              g.int64s(qkv.shape[1])), to=TensorProto.INT32)
    out = gqa_onnx.emit(g, names[0], (names[1], names[2]), ("present_key", "present_value"),
                        seqlens, total, names[3], names[4], attrs)
    for value in (out, "present_key", "present_value"):
        g.outputs.append(helper.make_tensor_value_info(value, elem, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(g.model().SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds = {"qkv": qkv, "past_key": past_key, "past_value": past_value, "cos": cos, "sin": sin,
             "past_len": past_len, "last_index": last_index}
    return [torch.from_numpy(np.asarray(r)) for r in
            session.run(None, {k: v.numpy() for k, v in feeds.items()})]


def tables(dtype):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    freqs = torch.arange(SMAX).float()[:, None] * inv_freq
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


# (past_len per row, tokens per row): the row kinds GroupQueryAttention takes in one run.
CASES = {"prompts": ([0, 0, 0], [5, 2, 1]), "decodes": ([7, 0, 12], [1, 1, 1]),
         "continued": ([9], [6])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1), (2, 2)])
@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gqa_matches_reference(dtype, hq, hkv, window, case):
    torch.manual_seed(0)
    past, lengths = CASES[case]
    b, s = len(past), max(lengths)
    attrs = GqaAttrs(num_heads=hq, num_kv_heads=hkv, head_dim=D, scale=0.3,
                     sliding_window=window)
    qkv = torch.randn(b, s, (hq + 2 * hkv) * D).to(dtype)
    past_key, past_value = (torch.randn(b, hkv, SMAX, D).to(dtype) for _ in range(2))
    past_len = torch.tensor(past)
    last_index = torch.tensor(lengths) - 1
    cos, sin = tables(dtype)
    got_out, got_k, got_v = run_gqa(qkv, past_key, past_value, past_len, last_index, cos, sin,
                                    attrs)
    want_out, want_k, want_v = gqa(qkv, past_key, past_value, past_len, cos, sin, attrs)
    for row, (start, n) in enumerate(zip(past, lengths, strict=True)):
        valid = slice(0, start + n)  # the op leaves cache rows past a row's length undefined
        assert close(got_k[row, :, valid], want_k[row, :, valid], dtype)
        assert close(got_v[row, :, valid], want_v[row, :, valid], dtype)
        assert close(got_out[row, :n], want_out[row, :n], dtype)
        assert torch.isfinite(got_out[row, :n]).all()


def test_a_continued_prefill_cannot_share_a_run():
    """Why kiln.runtime.rows runs a continued prefill alone under this plugin."""
    attrs = GqaAttrs(num_heads=2, num_kv_heads=1, head_dim=D, scale=0.25, sliding_window=None)
    qkv = torch.randn(2, 3, 4 * D)
    caches = [torch.zeros(2, 1, SMAX, D) for _ in range(2)]
    with pytest.raises(Exception, match="batch_size must be 1"):
        run_gqa(qkv, *caches, torch.tensor([4, 0]), torch.tensor([2, 2]), *tables(torch.float32),
                attrs)
