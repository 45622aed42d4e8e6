"""Quantized-projection kernels (Triton GEMVs/GEMMs, cuBLASLt paths) against their references.

Tolerances (tests/gpu/support.py): float32 1e-4, float16 4e-3, bfloat16 3e-2 (atol and rtol),
outputs of O(1). Kernel and reference quantize activations with the same IEEE division and
rounding (the one-token GEMVs: the same product by the float32 reciprocal of the scale, their
documented rule; see ``_reference``), so W8A8 inputs match exactly; what differs is float32
summation order, the final rounding to x's dtype, and for INT4 in 16-bit x the dequantized
weight rounded to x's dtype before the dot (2^-9 relative in bf16, averaging out over K), all
inside those tolerances.
cuBLASLt's rowwise FP8 adds the bias after rounding to bf16 (two roundings, still 3e-2).
FP8 at M > 1 (fp8 tl.dot, cuBLASLt) is held to 3e-2 for every x dtype: Hopper's FP8 MMAs
accumulate with fewer bits than float32 (seen on an H200: 2e-3 absolute off a float32 reference
at K = 1024, 1e-2 on 2 of 1M float16 outputs).
NaN never passes (assert_close checks finiteness first).
"""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.quant_linear import triton_reference as ref
from kiln.plugins.quant_linear.layout import engine_int4, repack_int4
from kiln.quantization.config import QuantConfig
from kiln.quantization.formats import quantize_weight, scale_from_amax
from tests.gpu.support import INTERPRET, assert_close, skip_unsupported, triton_device

pytestmark = pytest.mark.gpu

LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _kernels():
    pytest.importorskip("triton")
    from kiln.plugins.quant_linear import triton_kernels
    return triton_kernels


def _skip(dtype, device, fmt):
    skip_unsupported(dtype, device)
    if device.type == "cpu" and fmt in ("fp8", "int8_sq"):
        pytest.skip("W8A8 kernels (fp8 casts, 8-bit dots, cuBLASLt) run on GPUs only")
    if fmt == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm89+")


def _case(fmt, n, k, m, dtype, device, *, per_channel=True, static=True, bias=False,
          group_size=128):
    """(kernel name, args) of one call with fresh random inputs."""
    w = torch.randn(n, k, device=device) / k ** 0.5
    x = (torch.randn(m, k, device=device) * (1 + torch.rand(k, device=device))).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    if fmt in ("int4", "int4_frag"):  # the split-group or the MMA fragment layout
        packed, scale = quantize_weight(w, QuantConfig("int4_wo", group_size=group_size))
        weight = (engine_int4(packed, group_size, torch.bfloat16) if fmt == "int4_frag"
                  else repack_int4(packed, group_size))
        return "int4_weight_only_linear", (x, weight, scale, group_size, b)
    if fmt == "int8_wo":
        q, scale = quantize_weight(w, QuantConfig("int8_wo"))
        return "int8_weight_only_linear", (x, q, scale, b)
    act = "float8_e4m3fn" if fmt == "fp8" else "int8"
    quant = QuantConfig(fmt, weight_scales="per_channel" if per_channel else "per_tensor") \
        if fmt == "fp8" else QuantConfig(fmt)
    q, scale = quantize_weight(w, quant)
    # a static scale below amax/QMAX, so that the largest activations saturate
    s = scale_from_amax(x.float().abs().amax() * 0.7, act).reshape(1) if static else None
    return ("fp8_linear" if fmt == "fp8" else "int8_w8a8_linear"), (x, q, scale, s, b)


def _check(name, args, dtype, path=None):
    kernels = _kernels()
    fn = getattr(kernels, name) if path is None else None
    if fn is None:
        got = _call_path(kernels, name, path, args)
    else:
        got = fn(*args)
    want = _reference(name, args, path)
    assert got.shape == want.shape and got.dtype == dtype
    if name == "fp8_linear" and args[0].shape[0] > 1:
        dtype = torch.bfloat16  # FP8 tensor-core dots (Hopper) accumulate with fewer bits
    assert_close(got, want, dtype)


def _reference(name, args, path=None):
    """The reference output of ``name`` on ``args``; for the W8A8 GEMVs (one token) on their
    documented quantization of x, ``x * (1 / s)`` rather than ``x / s`` (triton_kernels'
    ``_quantize``): the two differ by one quantization step where ``x / s`` lies within an ulp
    of a rounding tie (28 elements in 120 Llama-8B-shaped FP8 calls on an H200, up to 0.04 off
    outputs of O(1), past bf16's tolerance where an output is small)."""
    kernels = _kernels()
    x = args[0]
    if name == "fp8_linear":
        gemv = path == "gemv" or (path is None and x.shape[0] == 1)
    elif name == "int8_w8a8_linear":
        gemv = (path or kernels.int8_w8a8_path(x.shape[0], *args[1].shape,
                                               kernels._words_ok(args[1]))) == "gemv"
    else:
        gemv = False
    if not gemv:
        return getattr(ref, name)(*args)
    _, weight, weight_scale, input_scale, bias = args
    fp8 = name == "fp8_linear"
    qmax = ref.FP8_MAX if fp8 else ref.INT8_MAX
    s = ref._per_token_scale(x, qmax) if input_scale is None else input_scale.float().reshape(())
    v = x.float() * (torch.ones_like(s) / s)
    if fp8:
        q = v.clamp(-qmax, qmax).to(torch.float8_e4m3fn).double()
    else:
        q = torch.round(v).clamp(-128, qmax).double()
    ws = weight_scale.double().reshape(-1)
    acc = (q * s.double()) @ (weight.double() * (ws[:, None] if ws.numel() > 1 else ws)).T
    return ref._finish(acc.float(), bias, x.dtype)


def _call_path(kernels, name, path, args):
    """A path called directly (past the M-based choice), with the public function's scales."""
    x, weight = args[0], args[1]
    n = weight.shape[0]
    if name == "int4_weight_only_linear":
        return kernels.PATHS[name][path](x, weight, args[2].float().contiguous(), args[3],
                                         args[4])
    if name == "int8_weight_only_linear":
        return kernels.PATHS[name][path](x, weight, args[2].reshape(-1).float(), args[3])
    s = None if args[3] is None else args[3].reshape(-1).float()
    ws = args[2].reshape(-1).float()
    assert ws.numel() in (1, n)
    return kernels.PATHS[name][path](x, weight, ws, s, args[4])


FORMAT_CASES = [  # (fmt, dtype, per_channel, static, bias)
    ("fp8", torch.bfloat16, False, True, False), ("fp8", torch.bfloat16, True, True, True),
    ("fp8", torch.bfloat16, False, False, True), ("fp8", torch.bfloat16, True, False, False),
    ("fp8", torch.float16, False, True, True), ("fp8", torch.float16, True, False, False),
    ("fp8", torch.float32, True, True, False), ("fp8", torch.float32, False, False, True),
    ("int8_sq", torch.bfloat16, True, True, False), ("int8_sq", torch.bfloat16, True, False, True),
    ("int8_sq", torch.float16, True, True, True), ("int8_sq", torch.float32, True, False, False),
    ("int8_wo", torch.bfloat16, True, True, False), ("int8_wo", torch.bfloat16, True, True, True),
    ("int8_wo", torch.float16, True, True, True), ("int8_wo", torch.float32, True, True, False),
]


@pytest.mark.parametrize("m", [1, 3, 16, 100, 2048])
@pytest.mark.parametrize("shape", [(300, 200), (512, 1024)], ids=str)
@pytest.mark.parametrize("fmt,dtype,per_channel,static,bias", FORMAT_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_w8_matches_reference(fmt, dtype, per_channel, static, bias, shape, m):
    device = triton_device()
    _skip(dtype, device, fmt)
    if device.type == "cpu" and m > 16:
        pytest.skip("interpreter: small M only")
    name, args = _case(fmt, *shape, m, dtype, device, per_channel=per_channel, static=static,
                       bias=bias)
    _check(name, args, dtype)


@pytest.mark.parametrize("m", [1, 3, 16, 100, 2048])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(300, 384), (512, 1024)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_int4_matches_reference(bias, dtype, shape, group_size, m):
    device = triton_device()
    _skip(dtype, device, "int4")
    if device.type == "cpu" and m > 16:
        pytest.skip("interpreter: small M only")
    name, args = _case("int4", *shape, m, dtype, device, bias=bias, group_size=group_size)
    _check(name, args, dtype)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("shape", LLAMA_8B, ids=str)
@pytest.mark.parametrize("fmt", ["fp8", "int8_sq", "int8_wo", "int4", "int4_frag"])
def test_llama_8b_shapes(fmt, shape, m):
    device = triton_device()
    if device.type == "cpu":
        pytest.skip("large shapes run on GPUs")
    _skip(torch.bfloat16, device, fmt)
    name, args = _case(fmt, *shape, m, torch.bfloat16, device, static=fmt != "int8_sq")
    _check(name, args, torch.bfloat16)


@pytest.mark.parametrize("m", [3, 100, 2048])
@pytest.mark.parametrize("name,path", [
    ("fp8_linear", "triton"), ("fp8_linear", "scaled_mm"), ("int8_w8a8_linear", "triton"),
    ("int8_w8a8_linear", "int_mm")], ids=str)
@pytest.mark.parametrize("per_channel,static", [(False, True), (True, False)])
def test_every_w8a8_path(name, path, per_channel, static, m):
    """Each path at M it is not chosen for (the choice is a kernel choice, not numerics)."""
    device = triton_device()
    fmt = "fp8" if name == "fp8_linear" else "int8_sq"
    _skip(torch.bfloat16, device, fmt)
    if path == "int_mm" and m <= 16:
        pytest.skip("torch._int_mm needs M > 16")
    _, args = _case(fmt, 256, 512, m, torch.bfloat16, device, per_channel=per_channel,
                    static=static, bias=True)
    _check(name, args, torch.bfloat16, path=path)


@pytest.mark.parametrize("m", [3, 100, 300])
@pytest.mark.parametrize("fmt,path", [("int8_wo", "triton"), ("int8_wo", "dequant"),
                                      ("int4", "triton"), ("int4", "dequant")], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_every_weight_only_path(fmt, path, m, dtype):
    """Each weight-only path at M it is not chosen for, ragged N (K whole groups)."""
    device = triton_device()
    _skip(dtype, device, fmt)
    name, args = _case(fmt, 200, 512, m, dtype, device, bias=True)
    _check(name, args, dtype, path=path)


@pytest.mark.parametrize("m", [1, 2, 8, 9, 16, 100])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_int4_tensor_core_path(bias, dtype, group_size, m):
    """The INT4 tensor-core kernel at the token counts of both its tiles (8 and 16 wide, and
    several tiles), ragged N, K of several groups."""
    device = triton_device()
    if device.type == "cpu":
        pytest.skip("inline PTX and tensor cores run on GPUs only")
    name, args = _case("int4", 200, 4 * group_size, m, dtype, device, bias=bias,
                       group_size=group_size)
    _check(name, args, dtype, path="mma")


def _gpu_only():
    device = triton_device()
    if device.type == "cpu":
        pytest.skip("Gluon, inline PTX and tensor cores run on GPUs only")
    return device


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 33, 64, 65, 300])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("shape", [(128, 512), (48, 1024)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_int4_fragments_match_reference(bias, dtype, shape, group_size, m):
    """INT4 in the MMA fragment layout: the Gluon kernel up to 64 16-bit tokens (one to eight
    8-token tiles a program, the last partly filled), dequantize + cuBLAS beyond and for
    float32."""
    device = _gpu_only()
    kernels = _kernels()
    name, args = _case("int4_frag", *shape, m, dtype, device, bias=bias, group_size=group_size)
    assert args[1].dtype == torch.int32
    want = "fragments" if dtype != torch.float32 and m <= 64 else "fragments_dequant"
    assert kernels.fragments_path(args[0]) == want
    _check(name, args, dtype)


@pytest.mark.parametrize("m", [1, 9, 64, 100, 300])
@pytest.mark.parametrize("path", ["fragments", "fragments_dequant"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_fragment_path(path, dtype, m):
    """Each fragment-layout path at M it is not chosen for (the Gluon kernel up to 300 tokens),
    208 rows (13 tiles), K of three groups of 128."""
    _gpu_only()
    name, args = _case("int4_frag", 208, 384, m, dtype, torch.device("cuda"), bias=True)
    assert args[1].dtype == torch.int32
    _check(name, args, dtype, path=path)


@pytest.mark.parametrize("m", [1, 8, 20, 64])
@pytest.mark.parametrize("config,group_size", [
    ((1, 1), 64), ((2, 1), 64), ((2, 1), 128), ((2, 2), 128), ((4, 4), 128), ((8, 4), 128),
    ((16, 2), 128)], ids=str)
def test_int4_fragment_kernel_configs(config, group_size, m):
    """Every warps x chunks split of a row's 32 chunks (K = 2048) gives the reference's values,
    at one to eight token tiles; a split that is not whole groups is refused."""
    device = _gpu_only()
    kernels = _kernels()
    name, args = _case("int4_frag", 64, 2048, m, torch.bfloat16, device, bias=True,
                       group_size=group_size)
    x, words, scale, group_size, bias = args
    ws = scale.float().contiguous()
    got = kernels.PATHS[name]["fragments"](x, words, ws, group_size, bias, config)
    assert_close(got, ref.int4_weight_only_linear(*args), torch.bfloat16)
    if group_size == 128:
        with pytest.raises(ValueError, match="span whole groups of 128"):
            kernels.PATHS[name]["fragments"](x, words, ws, group_size, bias, (1, 1))


def test_int4_fragments_unaligned_rows_are_dequantized():
    """x rows not 16-byte aligned (a view one column in) cannot feed the Gluon kernel's 16-byte
    loads: the dequantized path runs them, right."""
    device = _gpu_only()
    kernels = _kernels()
    name, args = _case("int4_frag", 64, 512, 4, torch.bfloat16, device, bias=True,
                       group_size=64)
    wide = torch.zeros(4, 513, dtype=torch.bfloat16, device=device)
    wide[:, 1:] = args[0]
    x = wide[:, 1:]
    assert kernels.fragments_path(x) == "fragments_dequant"
    got = kernels.int4_weight_only_linear(x, *args[1:])
    assert_close(got, ref.int4_weight_only_linear(*args), torch.bfloat16)


@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("group_size,groups,splits", [(128, 8, 4), (64, 12, 8), (128, 7, 4)],
                         ids=["even", "gcd-4", "prime"])  # splits actually run: 4, 4, 1
def test_int4_split_k(m, group_size, groups, splits):
    """Split-K over the groups: the reference's values, the same bits on every call (the runs
    are added in split order, whichever program is last), and counters left at zero for the
    next call (a second shape's call after it is right too)."""
    device = triton_device()
    if device.type == "cpu":
        pytest.skip("inline PTX and tensor cores run on GPUs only")
    kernels = _kernels()
    name, args = _case("int4", 200, groups * group_size, m, torch.bfloat16, device, bias=True,
                       group_size=group_size)
    x, weight, scale, _, bias = args
    ws = scale.float().contiguous()
    config = kernels.int4_mma_config(200, groups * group_size, m)[:5] + (splits,)
    first = kernels.PATHS[name]["mma"](x, weight, ws, group_size, bias, config)
    assert_close(first, ref.int4_weight_only_linear(*args), torch.bfloat16)
    for _ in range(3):
        again = kernels.PATHS[name]["mma"](x, weight, ws, group_size, bias, config)
        assert torch.equal(again, first)
    _, other = _case("int4", 96, 4 * group_size, m, torch.bfloat16, device, group_size=group_size)
    got = kernels.PATHS[name]["mma"](*other[:2], other[2].float().contiguous(), group_size, None,
                                     config)
    assert_close(got, ref.int4_weight_only_linear(*other), torch.bfloat16)


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq", "int8_wo"])
@pytest.mark.parametrize("n,k", [(200, 512), (96, 768), (64, 96)], ids=str)
def test_w8_gemv_early_tiles_change_no_output(fmt, n, k):
    """Weight tiles loaded before the PDL wait (the config's fifth item): the same outputs,
    bit for bit, as the loop alone. 256-byte tiles: two whole (512), a third after them
    (768), one partial and one past K (96)."""
    device = triton_device()
    if device.type != "cuda" or INTERPRET or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("early tiles are loaded under PDL only: an sm90+ GPU")
    _skip(torch.bfloat16, device, fmt)
    kernels = _kernels()
    name, args = _case(fmt, n, k, 1, torch.bfloat16, device, bias=True)
    x, weight = args[0], args[1]
    gemv = kernels.PATHS[name]["gemv"]
    scales = (args[2].reshape(-1).float(),) if fmt == "int8_wo" else \
        (args[2].reshape(-1).float(), args[3].reshape(-1).float())
    outs = [gemv(x, weight, *scales, args[-1], config=(8, 256, 4, 3, early))
            for early in (0, 1, 2)]
    assert torch.isfinite(outs[0]).all()
    assert_close(outs[0], _reference(name, args), torch.bfloat16)
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    with pytest.raises(ValueError, match="early tiles are 0 to 2, found 3"):
        gemv(x, weight, *scales, args[-1], config=(8, 256, 4, 3, 3))


@pytest.mark.parametrize("group_size,k", [(128, 1024), (64, 640), (128, 384)], ids=str)
def test_int4_gemv_early_iteration_changes_no_output(group_size, k):
    """The int4 GEMV's first iteration loaded before the PDL wait: the same outputs, bit for
    bit. 256 bytes a row per iteration: two iterations of 4 groups (1024, g128), 2.5 of 4 (640,
    g64), one partial (384, g128)."""
    device = triton_device()
    if device.type != "cuda" or INTERPRET or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("early loads run under PDL only: an sm90+ GPU")
    kernels = _kernels()
    name, args = _case("int4", 200, k, 1, torch.bfloat16, device, bias=True,
                       group_size=group_size)
    x, packed, scale, _, bias = args
    gemv = kernels.PATHS[name]["gemv"]
    scale = scale.float().contiguous()
    outs = [gemv(x, packed, scale, group_size, bias, config=(4, 256, 4, 3, early))
            for early in (0, 1)]
    assert_close(outs[0], _reference(name, args), torch.bfloat16)
    assert torch.equal(outs[1], outs[0])
    with pytest.raises(ValueError, match="early tiles are 0 to 1, found 2"):
        gemv(x, packed, scale, group_size, bias, config=(4, 256, 4, 3, 2))


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq", "int8_wo", "int4"])
@pytest.mark.parametrize("m", [1, 16, 100])
def test_cuda_graph_capture(fmt, m):
    device = triton_device()
    if device.type != "cuda" or INTERPRET:
        pytest.skip("CUDA graphs need a GPU")
    _skip(torch.bfloat16, device, fmt)
    name, args = _case(fmt, 1024, 2048, m, torch.bfloat16, device, static=fmt == "fp8",
                       bias=True)
    fn = getattr(_kernels(), name)
    fn(*args)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        args[0].copy_(torch.randn_like(args[0]))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, _reference(name, args), torch.bfloat16)


def test_rejects_bad_inputs():
    device = triton_device()
    kernels = _kernels()
    x = torch.randn(2, 64, device=device)
    w8 = torch.zeros(32, 64, dtype=torch.int8, device=device)
    ws = torch.ones(32, device=device)
    with pytest.raises(ValueError, match="input features"):
        kernels.int8_weight_only_linear(x[:, :48], w8, ws)
    with pytest.raises(ValueError, match="weight must be"):
        kernels.int8_weight_only_linear(x, w8.float(), ws)
    with pytest.raises(ValueError, match="x must be"):
        kernels.int8_weight_only_linear(x.to(torch.int32), w8, ws)
    with pytest.raises(ValueError, match="weight_scale"):
        kernels.int8_w8a8_linear(x, w8, ws[:3], None)
    with pytest.raises(ValueError, match="input_scale"):
        kernels.int8_w8a8_linear(x, w8, ws, ws)
    w4 = torch.zeros(32, 32, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="group_size"):
        kernels.int4_weight_only_linear(x, w4, torch.ones(32, 1, device=device), 48)
    with pytest.raises(ValueError, match="weight_scale"):
        kernels.int4_weight_only_linear(x, w4, torch.ones(32, 2, device=device), 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("m", [65, 300])
def test_fp8_linear_takes_its_input_quantized_already(dtype, per_channel, m):
    """Where ``fp8_takes_quantized`` says so, an FP8 x (quantized by the kernel before, with the
    static input scale) gives what the bf16/fp16/fp32 x gives, bit for bit (the same cuBLASLt
    call after the same quantization); elsewhere an FP8 x is refused in one line."""
    device = triton_device()
    _skip(dtype, device, "fp8")
    kernels = _kernels()
    name, (x, w, ws, s, b) = _case("fp8", 512, 1024, m, dtype, device, per_channel=per_channel,
                                   bias=True)
    takes = kernels.fp8_takes_quantized(m, 512, 1024, ws, s, dtype)
    assert takes == (not per_channel or dtype == torch.bfloat16)
    assert ref.fp8_takes_quantized(m, 512, 1024, ws, s, dtype)  # the reference takes any
    q, _ = kernels._quantize_rows(x, s.reshape(-1).float(), kernels._ACT_FP8)
    if not takes:
        with pytest.raises(ValueError, match="fp8_takes_quantized"):
            kernels.fp8_linear(q, w, ws, s, b, out_dtype=dtype)
        return
    got = kernels.fp8_linear(q, w, ws, s, b, out_dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, kernels.fp8_linear(x, w, ws, s, b))
    assert torch.equal(ref.fp8_linear(q, w, ws, s, b, out_dtype=dtype),
                       ref.fp8_linear(x, w, ws, s, b))
    assert not kernels.fp8_takes_quantized(64, 512, 1024, ws, s, dtype)
    assert not kernels.fp8_takes_quantized(m, 512, 1024, ws, None, dtype)
