"""Triton paged attention (decode, packed prefill) against its PyTorch reference and torch SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.plugins.attention import triton_reference as ref
from kiln.quantization.formats import quantize_values, scale_from_amax
from tests.gpu.support import (
    TOLERANCE,
    alibi_slopes,
    assert_close,
    skip_unsupported,
    triton_device,
)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (query heads, key heads, head_dim): Llama-3-8B GQA, MQA, MHA with a non-power-of-two dim.
HEADS = [(32, 8, 128), (8, 1, 64), (4, 4, 80)]


def _kernels():
    pytest.importorskip("triton")
    from kiln.plugins.attention import triton_kernels
    return triton_kernels


def _paged_case(device, dtype, hkv, d, page, ctx_lens, seed):
    """A cache with shuffled blocks holding random keys/values for sequences of ctx_lens."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // page) for n in ctx_lens]
    num_blocks = sum(pages) + 3
    k = torch.randn(num_blocks, hkv, page, d, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, hkv, page, d, generator=g).to(device, dtype)
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(ctx_lens), max(pages), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[used:used + n].int()
        used += n
    return k, v, table.to(device), torch.tensor(ctx_lens, dtype=torch.int32, device=device)


# decode tiles of other sizes (num_warps, num_stages, BLOCK_N[, register cap]): 128 keys span
# pages of 16 and 64
DECODE_TILES = {"tile128": (4, 2, 128), "tile32": (1, 3, 32), "capped": (1, 3, 32, 168)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("variant", ["plain", "window", "alibi", "split4", "unsplit", "tile128",
                                     "tile32", "capped", "graph"])
def test_decode_matches_reference(dtype, heads, page, variant):
    """``graph``: the grid of a CUDA graph captured for 8,192 keys (33 splits), over short rows
    (each divides its keys among the splits)."""
    device = triton_device()
    skip_unsupported(dtype, device)
    hq, hkv, d = heads
    ctx = [1, 37, 300, 64, 129]
    k, v, table, ctx_lens = _paged_case(device, dtype, hkv, d, page, ctx, seed=hq + d + page)
    total = 9  # q rows are scattered in a larger packed tensor; other rows stay untouched
    q = torch.randn(total, hq, d, device=device).to(dtype)
    rows = torch.tensor([8, 0, 3, 5, 6], dtype=torch.int32, device=device)
    kw = dict(scale=d ** -0.5, max_ctx_len=320,
              sliding_window=50 if variant == "window" else None,
              alibi_slopes=alibi_slopes(hq, device) if variant == "alibi" else None)
    got = torch.full_like(q, float("nan"))
    _kernels().paged_decode_attention(q, k, v, table, ctx_lens, rows, got,
                                      num_splits={"split4": 4, "unsplit": 1,
                                                  "graph": 33}.get(variant),
                                      config=DECODE_TILES.get(variant),
                                      **{**kw, **({"max_ctx_len": 8192}
                                                  if variant == "graph" else {})})
    want = torch.full_like(q, float("nan"))
    ref.paged_decode_attention(q, k, v, table, ctx_lens, rows, want, **kw)
    untouched = torch.ones(total, dtype=torch.bool)
    untouched[rows.long().cpu()] = False
    assert torch.isnan(got[untouched.to(device)]).all(), "wrote rows it was not given"
    assert_close(got[rows.long()], want[rows.long()], dtype)


@pytest.mark.parametrize("page", [16, 64])
def test_decode_split_merge_repeats_bit_for_bit(page):
    """Split rows are merged by the last program of their splits (arrival counters): repeated
    calls give the same bits, whichever program arrives last, and leave every counter zero.
    Page 16: the rows use up to 19 splits, more than one merge tile of splits."""
    from kiln.plugins.split_counters import split_counters
    device = triton_device()
    hq, hkv, d = 32, 8, 128
    ctx = [1, 37, 300, 64, 129]
    k, v, table, ctx_lens = _paged_case(device, torch.float16, hkv, d, page, ctx, seed=11)
    q = torch.randn(len(ctx), hq, d, device=device).half()
    rows = torch.arange(len(ctx), dtype=torch.int32, device=device)
    outs = []
    for _ in range(3):
        out = torch.full_like(q, float("nan"))
        _kernels().paged_decode_attention(q, k, v, table, ctx_lens, rows, out, scale=d ** -0.5,
                                          max_ctx_len=8192, num_splits=33)
        assert not split_counters(device, "paged decode attention").any()
        outs.append(out)
    want = torch.empty_like(q)
    ref.paged_decode_attention(q, k, v, table, ctx_lens, rows, want, scale=d ** -0.5)
    assert_close(outs[0], want, torch.float16)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_decode_grid_beyond_the_counters_is_unsplit(monkeypatch):
    """More (row, key head) programs than the merge has counters for: the grid is not split
    (asking for the counters fails the test) and the output is the reference's."""
    kernels = _kernels()
    device = triton_device()
    hq, hkv, d = 8, 1, 64
    ctx = [300, 37, 129]
    k, v, table, ctx_lens = _paged_case(device, torch.float16, hkv, d, 64, ctx, seed=5)
    q = torch.randn(len(ctx), hq, d, device=device).half()
    rows = torch.arange(len(ctx), dtype=torch.int32, device=device)
    monkeypatch.setattr(kernels, "COUNTER_CAPACITY", 2)

    def refuse(*args):
        raise AssertionError("split beyond the counters")
    monkeypatch.setattr(kernels, "split_counters", refuse)
    got = torch.empty_like(q)
    kernels.paged_decode_attention(q, k, v, table, ctx_lens, rows, got, scale=d ** -0.5,
                                   num_splits=4)
    want = torch.empty_like(q)
    ref.paged_decode_attention(q, k, v, table, ctx_lens, rows, want, scale=d ** -0.5)
    assert_close(got, want, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("variant", ["plain", "window", "wide-window", "alibi"])
@pytest.mark.parametrize("page,config", [(64, None), (16, None), (64, (64, 128, 4, 2)),
                                         (64, (64, 64, 4, 3, True))],
                         ids=["page64", "page16", "tiles-span-pages", "tma"])
def test_prefill_matches_reference(dtype, heads, variant, page, config):
    device = triton_device()
    skip_unsupported(dtype, device)
    hq, hkv, d = heads
    if config is not None and len(config) > 4 and (device.type != "cuda" or d & (d - 1)):
        pytest.skip("TMA tiles: GPUs only, power-of-two head_dim")
    # (cached before, new queries): a fresh prefill, a later chunk, a one-token chunk, a long one
    chunks = [(0, 70), (100, 33), (5, 1), (0, 200)]
    ctx = [c + n for c, n in chunks]
    k, v, table, ctx_lens = _paged_case(device, dtype, hkv, d, page, ctx, seed=hq * d)
    lens = torch.tensor([n for _, n in chunks], dtype=torch.int32, device=device)
    starts = torch.cumsum(lens, 0, dtype=torch.int32) - lens
    q = torch.randn(int(lens.sum()), hq, d, device=device).to(dtype)
    kw = dict(scale=d ** -0.5, max_q_len=200,
              sliding_window={"window": 40, "wide-window": 150}.get(variant),
              alibi_slopes=alibi_slopes(hq, device) if variant == "alibi" else None)
    got = torch.full_like(q, float("nan"))
    _kernels().paged_prefill_attention(q, k, v, table, ctx_lens, starts, lens, got,
                                       config=config, **kw)
    want = torch.empty_like(q)
    ref.paged_prefill_attention(q, k, v, table, ctx_lens, starts, lens, want, **kw)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_prefill_and_decode_match_torch_sdpa(dtype):
    """A fresh causal prefill and a decode over it equal torch's scaled_dot_product_attention."""
    device = triton_device()
    skip_unsupported(dtype, device)
    hq, hkv, d, n, page = 32, 8, 128, 190, 64
    k, v, table, ctx_lens = _paged_case(device, dtype, hkv, d, page, [n], seed=7)
    keys = ref.gather_keys(k, table[0], n)  # [n, Hkv, D]
    values = ref.gather_keys(v, table[0], n)
    q = torch.randn(n, hq, d, device=device).to(dtype)
    got = torch.empty_like(q)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    _kernels().paged_prefill_attention(q, k, v, table, ctx_lens, zero, lens, got,
                                       scale=d ** -0.5, max_q_len=n)
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
        is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    assert_close(got, want, dtype)
    last = torch.empty(1, hq, d, device=device, dtype=dtype)
    _kernels().paged_decode_attention(q[-1:], k, v, table, ctx_lens, zero, last,
                                      scale=d ** -0.5, max_ctx_len=n)
    assert_close(last, want[-1:], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothed"])
@pytest.mark.parametrize("kind", ["prefill", "prefill-tma", "decode", "decode-split4",
                                  "decode-float8-cache"])
def test_fp8_output_is_the_projection_quantization(dtype, heads, smooth, kind):
    """With quant_scale (and o's smoothing) prefill, decode and the split merge write exactly
    what quantizing their own 16-bit output as the FP8 projection does would give (the same
    values; a zero's sign may differ, as in every FP8 quantization kernel); and the
    reference's values. Over a float8 cache the decode's dots run in float16 (WIDEN), and
    the output is still rounded to the model dtype first."""
    from kiln.plugins.quant_linear.triton_reference import quantize_fp8_input

    device = triton_device()
    skip_unsupported(dtype, device)
    hq, hkv, d = heads
    if kind == "prefill-tma" and (device.type != "cuda" or d & (d - 1)):
        pytest.skip("TMA tiles: GPUs only, power-of-two head_dim")
    chunks = [(0, 70), (100, 33), (0, 130)]
    ctx = [c + n for c, n in chunks]
    k, v, table, ctx_lens = _paged_case(device, dtype, hkv, d, 64, ctx, seed=hq + d)
    cache_scales = {}
    if kind == "decode-float8-cache":
        k, v, k_scale, v_scale = _quantize(k, v, torch.float8_e4m3fn)
        cache_scales = dict(k_scale=k_scale, v_scale=v_scale)
    g = torch.Generator().manual_seed(5)
    smoothing = (torch.rand(hq * d, generator=g) * 1.5 + 0.5).to(device) if smooth else None
    scale = torch.tensor(0.004, device=device)  # saturates the largest outputs at 448
    if kind.startswith("prefill"):
        lens = torch.tensor([n for _, n in chunks], dtype=torch.int32, device=device)
        starts = torch.cumsum(lens, 0, dtype=torch.int32) - lens
        q = torch.randn(int(lens.sum()), hq, d, device=device).to(dtype)
        args = (q, k, v, table, ctx_lens, starts, lens)
        kw = dict(scale=d ** -0.5, max_q_len=130)
        kernel, reference = _kernels().paged_prefill_attention, ref.paged_prefill_attention
        extra = dict(config=(64, 64, 4, 3, True)) if kind == "prefill-tma" else {}
    else:
        q = torch.randn(5, hq, d, device=device).to(dtype)
        rows = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
        args = (q, k, v, table, ctx_lens, rows)
        kw = dict(scale=d ** -0.5, max_ctx_len=200, **cache_scales)
        kernel, reference = _kernels().paged_decode_attention, ref.paged_decode_attention
        extra = dict(num_splits=4 if kind == "decode-split4" else 1)
    plain = torch.zeros_like(q)
    kernel(*args, plain, **kw, **extra)
    got = torch.zeros_like(q, dtype=torch.float8_e4m3fn)
    kernel(*args, got, quant_scale=scale, pre_quant_scale=smoothing, **kw, **extra)
    flat = plain.view(q.shape[0], hq * d)
    if smooth:
        flat = (flat.float() * smoothing).to(dtype)
    want_bits = quantize_fp8_input(flat, scale)[0].view(q.shape)
    assert torch.equal(got.float(), want_bits.float())  # values: -0 and +0 may differ in sign
    want = torch.zeros_like(got)
    reference(*args, want, quant_scale=scale, pre_quant_scale=smoothing, **kw)
    # the 16-bit outputs' tolerance, plus one FP8 step where they round apart (2^-3 relative)
    assert torch.isfinite(got.float()).all()
    torch.testing.assert_close(got.float() * scale, want.float() * scale,
                               atol=TOLERANCE[dtype][0], rtol=0.13)


QUANT_CACHES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.int8: "int8"}


def _quantize(k, v, cache_dtype):
    """(k, v, k_scale, v_scale): a float cache stored quantized, its amax a little saturated."""
    name = QUANT_CACHES[cache_dtype]
    scales = [scale_from_amax(x.float().abs().amax() * 0.8, name) for x in (k, v)]
    return (quantize_values(k, scales[0], name), quantize_values(v, scales[1], name), *scales)


@pytest.mark.parametrize("cache_dtype", list(QUANT_CACHES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,page", [((32, 8, 128), 64), ((8, 1, 64), 16), ((4, 4, 80), 16)],
                         ids=str)
@pytest.mark.parametrize("variant", ["unsplit", "split4", "window", "tile128", "tile32",
                                     "graph"])
def test_decode_quantized_cache_matches_reference(cache_dtype, dtype, heads, page, variant):
    device = triton_device()
    skip_unsupported(dtype, device)
    hq, hkv, d = heads
    ctx = [1, 37, 300, 64, 129]
    k, v, table, ctx_lens = _paged_case(device, dtype, hkv, d, page, ctx, seed=hq + d)
    k, v, k_scale, v_scale = _quantize(k, v, cache_dtype)
    q = torch.randn(9, hq, d, device=device).to(dtype)
    rows = torch.tensor([8, 0, 3, 5, 6], dtype=torch.int32, device=device)
    kw = dict(scale=d ** -0.5, max_ctx_len=320, k_scale=k_scale, v_scale=v_scale,
              sliding_window=50 if variant == "window" else None)
    got = torch.full_like(q, float("nan"))
    _kernels().paged_decode_attention(q, k, v, table, ctx_lens, rows, got,
                                      num_splits={"unsplit": 1, "split4": 4,
                                                  "graph": 33}.get(variant),
                                      config=DECODE_TILES.get(variant),
                                      **{**kw, **({"max_ctx_len": 8192}
                                                  if variant == "graph" else {})})
    want = torch.full_like(q, float("nan"))
    ref.paged_decode_attention(q, k, v, table, ctx_lens, rows, want, **kw)
    assert_close(got[rows.long()], want[rows.long()], dtype)


@pytest.mark.parametrize("cache_dtype", list(QUANT_CACHES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (4, 4, 80)], ids=str)
@pytest.mark.parametrize("variant,page,config", [
    ("plain", 64, None), ("window", 16, None), ("wide-window", 64, (64, 128, 4, 2)),
    ("window", 64, (64, 64, 4, 3, True))], ids=["default", "page16", "tiles-span-pages", "tma"])
def test_prefill_quantized_cache_matches_reference(cache_dtype, dtype, heads, variant, page,
                                                   config):
    """On GPUs the default tiles of head_dim 128 are TMA ones, those of 80 pointer loads."""
    device = triton_device()
    skip_unsupported(dtype, device)
    hq, hkv, d = heads
    if config is not None and len(config) > 4 and (device.type != "cuda" or d & (d - 1)):
        pytest.skip("TMA tiles: GPUs only, power-of-two head_dim")
    chunks = [(0, 70), (100, 33), (5, 1), (0, 200)]
    k, v, table, ctx_lens = _paged_case(device, dtype, hkv, d, page, [c + n for c, n in chunks],
                                        seed=hq * d)
    k, v, k_scale, v_scale = _quantize(k, v, cache_dtype)
    lens = torch.tensor([n for _, n in chunks], dtype=torch.int32, device=device)
    starts = torch.cumsum(lens, 0, dtype=torch.int32) - lens
    q = torch.randn(int(lens.sum()), hq, d, device=device).to(dtype)
    kw = dict(scale=d ** -0.5, max_q_len=200, k_scale=k_scale, v_scale=v_scale,
              sliding_window={"window": 40, "wide-window": 150}.get(variant))
    got = torch.full_like(q, float("nan"))
    _kernels().paged_prefill_attention(q, k, v, table, ctx_lens, starts, lens, got,
                                       config=config, **kw)
    want = torch.empty_like(q)
    ref.paged_prefill_attention(q, k, v, table, ctx_lens, starts, lens, want, **kw)
    assert_close(got, want, dtype)
