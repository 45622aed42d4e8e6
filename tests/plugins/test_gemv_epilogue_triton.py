"""One-row GEMVs with a fused epilogue (silu * up, rotary into the KV cache) against the same
GEMV followed by the unfused Triton op: bit for bit.

Both sides compute each output row with the same arithmetic (a row's sum does not depend on
which program owns it) and round it to the projection's dtype before the op, so q, the cache
bytes and the activation must be equal, not close. The fused side is given an op that raises,
so a call that quietly fell back to the unfused op fails instead of passing.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kiln.plugins.gemv.epilogue import RopeToCache, SiluMul, pair_half
from kiln.quantization.config import QuantConfig
from kiln.quantization.formats import quantize_weight, scale_from_amax
from tests.gpu.support import INTERPRET, skip_unsupported, triton_device

pytestmark = pytest.mark.gpu

FORMATS = ["bf16", "fp8", "int8_sq", "int8_wo"]


def _must_not_run(*args, **kwargs):
    raise AssertionError("the epilogue ran unfused")


def _projection(fmt, n, k, dtype, device, bias):
    """fn(x, epilogue=None) -> the format's one-row projection of a random [n, k] weight."""
    pytest.importorskip("triton")
    if fmt != "bf16" and (device.type != "cuda" or INTERPRET):
        pytest.skip("the 8-bit GEMVs' inline PTX runs on GPUs only")
    if fmt == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm89+")
    from kiln.plugins.gemv import triton_kernels as gemv
    from kiln.plugins.quant_linear import triton_kernels as ql
    w = torch.randn(n, k, device=device) / k ** 0.5
    b = torch.randn(n, device=device).to(dtype) if bias else None
    if fmt == "bf16":
        w = w.to(dtype)
        return lambda x, epilogue=None: gemv.gemv(x, w, b, epilogue=epilogue)
    if fmt == "int8_wo":
        q, scale = quantize_weight(w, QuantConfig("int8_wo"))
        return lambda x, epilogue=None: ql.int8_weight_only_linear(x, q, scale, b,
                                                                   epilogue=epilogue)
    quant = QuantConfig(fmt, weight_scales="per_channel") if fmt == "fp8" else QuantConfig(fmt)
    q, scale = quantize_weight(w, quant)
    act = "float8_e4m3fn" if fmt == "fp8" else "int8"
    s = scale_from_amax(torch.tensor(3.0, device=device), act).reshape(1)
    fn = ql.fp8_linear if fmt == "fp8" else ql.int8_w8a8_linear
    return lambda x, epilogue=None: fn(x, q, scale, s, b, epilogue=epilogue)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(28672, 4096), (512, 256), (96, 64)], ids=str)
def test_silu_mul_epilogue_is_the_unfused_op(fmt, dtype, shape):
    device = triton_device()
    skip_unsupported(dtype, device)
    from kiln.plugins.gated_mlp.triton_kernels import silu_and_mul
    n, k = shape
    project = _projection(fmt, n, k, dtype, device, bias=True)
    x = torch.randn(1, k, device=device).to(dtype)
    got = project(x, SiluMul(_must_not_run))
    want = silu_and_mul(project(x))
    assert got.shape == (1, n // 2) and got.dtype == dtype
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)


ROPE_CASES = [  # (heads, kv heads, head dim), cache dtype, clip, rotary
    *itertools.product([(32, 8, 128)], ["model", torch.float8_e4m3fn, torch.int8], [None],
                       [True]),
    *itertools.product([(4, 2, 64), (6, 6, 32)], ["model", torch.float8_e4m3fn],
                       [None, 0.75], [True, False]),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads,cache_dtype,clip,rotary", ROPE_CASES, ids=str)
def test_rope_epilogue_is_the_unfused_op(fmt, dtype, heads, cache_dtype, clip, rotary):
    device = triton_device()
    skip_unsupported(dtype, device)
    from kiln.plugins.rotary.triton_kernels import rope_qkv_to_cache
    hq, hkv, d = heads
    n, k = (hq + 2 * hkv) * d, 512
    project = _projection(fmt, n, k, dtype, device, bias=fmt == "int8_wo")
    cache_dtype = dtype if cache_dtype == "model" else cache_dtype
    quantized = cache_dtype != dtype
    blocks, page = 5, 16
    table = torch.randn(40, d, device=device) if rotary else None
    index = torch.tensor([33], dtype=torch.int32, device=device)
    slots = torch.tensor([3 * page + 7], dtype=torch.int32, device=device)
    scales = {}
    if quantized:
        scales = dict(k_scale=torch.tensor(0.02, device=device),
                      v_scale=torch.tensor(0.03, device=device))
    x = torch.randn(1, k, device=device).to(dtype)
    caches = [tuple(torch.zeros(blocks, hkv, page, d, device=device).to(cache_dtype)
                    for _ in "kv") for _ in range(2)]

    def epilogue(op, cache):
        return RopeToCache(op, table, index, *cache, slots, hq, hkv, d, clip, **scales)

    got = project(x, epilogue(_must_not_run, caches[0]))
    want = epilogue(rope_qkv_to_cache, caches[1]).apply(project(x))
    assert got.shape == (1, hq, d) and got.dtype == dtype
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)
    (k_got, v_got), (k_want, v_want) = caches
    written = k_want.float().abs().sum((1, 3)) > 0
    assert written.sum() == 1 and written[3, 7]  # one row written, at the slot
    for a, b in ((k_got, k_want), (v_got, v_want)):
        assert torch.equal(a.view(torch.uint8) if quantized else a,
                           b.view(torch.uint8) if quantized else b)


def test_a_pairing_that_does_not_fit_runs_the_op_after():
    """head_dim 6: three pairs per half, not a multiple of the 4 pairs of an 8-row program."""
    device = triton_device()
    from kiln.plugins.rotary.triton_kernels import rope_qkv_to_cache
    hq, hkv, d = 2, 1, 6
    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    project = _projection("bf16", (hq + 2 * hkv) * d, 64, dtype, device, bias=False)
    cache = tuple(torch.zeros(2, hkv, 4, d, device=device).to(dtype) for _ in "kv")
    index = torch.tensor([0], dtype=torch.int32, device=device)
    epilogue = RopeToCache(rope_qkv_to_cache, torch.randn(3, d, device=device), index, *cache,
                           index, hq, hkv, d)
    assert pair_half(epilogue, (hq + 2 * hkv) * d, 8) is None
    x = torch.randn(1, 64, device=device).to(dtype)
    assert torch.equal(project(x, epilogue), epilogue.apply(project(x)))
    with pytest.raises(AssertionError, match="ran unfused"):
        project(x, RopeToCache(_must_not_run, None, index, *cache, index, hq, hkv, d))


def _int4_fragments(n, k, dtype, device, bias, group_size):
    """fn(x, epilogue=None) -> an INT4 projection in the MMA fragment layout (16-bit engines):
    the Gluon kernel up to 64 tokens, which fuses silu * up."""
    pytest.importorskip("triton")
    if device.type != "cuda" or INTERPRET:
        pytest.skip("Gluon, inline PTX and tensor cores run on GPUs only")
    from kiln.plugins.quant_linear import triton_kernels as ql
    from kiln.plugins.quant_linear.layout import engine_int4
    w = torch.randn(n, k, device=device) / k ** 0.5
    b = torch.randn(n, device=device).to(dtype) if bias else None
    packed, scale = quantize_weight(w, QuantConfig("int4_wo", group_size=group_size))
    words = engine_int4(packed, group_size, dtype)
    assert words.dtype == torch.int32
    return lambda x, epilogue=None: ql.int4_weight_only_linear(x, words, scale, group_size, b,
                                                               epilogue=epilogue)


@pytest.mark.parametrize("m", [1, 8, 20, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,group_size,bias", [
    ((28672, 4096), 128, False), ((512, 256), 128, True), ((96, 128), 64, True)], ids=str)
def test_int4_fragments_fuse_silu_mul(shape, group_size, bias, dtype, m):
    """silu * up in the INT4 Gluon kernel (a program takes gate tile i and up tile i + N / 32,
    one to eight token tiles): its gate and up sums are the unfused kernel's, so the result is
    the unfused kernel then the gated-MLP op, bit for bit."""
    device = triton_device()
    from kiln.plugins.gated_mlp.triton_kernels import silu_and_mul
    n, k = shape
    project = _int4_fragments(n, k, dtype, device, bias, group_size)
    x = torch.randn(m, k, device=device).to(dtype)
    got = project(x, SiluMul(_must_not_run))
    want = silu_and_mul(project(x))
    assert got.shape == (m, n // 2) and got.dtype == dtype
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)


def test_int4_fragments_run_silu_mul_after_where_it_does_not_fit():
    """An odd number of 16-row tiles (48 rows: gate and up halves of 24) cannot pair whole
    tiles: the op runs after the kernel; past 64 tokens (the dequantized path) too."""
    device = triton_device()
    from kiln.plugins.gated_mlp.triton_kernels import silu_and_mul
    for n, m in ((48, 4), (96, 65)):
        project = _int4_fragments(n, 128, torch.bfloat16, device, True, 64)
        x = torch.randn(m, 128, device=device).to(torch.bfloat16)
        assert torch.equal(project(x, SiluMul(silu_and_mul)), silu_and_mul(project(x)))
        with pytest.raises(AssertionError, match="ran unfused"):
            project(x, SiluMul(_must_not_run))
