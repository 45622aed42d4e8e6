"""GPU kernels of the quantized projections: Triton GEMVs and tiled GEMMs, cuBLASLt for prefill.

Same contract as :mod:`kiln.plugins.quant_linear.triton_reference` (same names and signatures),
weights in the engine layouts of :mod:`kiln.plugins.quant_linear.layout`. Each function picks
its path from the token count ``M`` (a host shape, so every path is CUDA-graph capturable: no
host reads of device values):

- ``M == 1`` (batch-1 decode): a GEMV that streams each weight byte once. Each program owns
  ``BLOCK_N`` output rows, keeps ``[BLOCK_N, BLOCK_K]`` float32 partial products and reduces
  once at the end; per-channel scales are applied once per output. FP8/INT8 W8A8 quantize the
  input row on the fly (a per-token scale is an amax prologue in every program; x sits in L2).
- small ``M`` (decode batches): a tiled Triton GEMM computing ``y^T = W x^T`` ("swap AB": the
  weight fills the MMA's 64-row side, the few tokens its narrow side), the weight tile
  converted in registers (INT8/INT4 weight-only, into x's dtype, INT4 scaled per group before
  the dot) or fed as is (FP8 and INT8 W8A8: fp8 x fp8 -> f32, int8 x int8 -> exact int32).
  INT4 at 2..16 16-bit tokens has its own tensor-core kernel (``_int4_mma_kernel``: exact
  values from the words in the MMA operand layout, the group scale after each group's dot).
- INT4 weights in the MMA fragment layout (int32 words; what 16-bit engines store where the
  shape allows, layout.py) take the Gluon kernel up to 64 tokens (:mod:`.gluon_kernels`) and
  dequantize + cuBLAS beyond (:func:`fragments_path`).
- large ``M`` (prefill): cuBLASLt via ``torch._scaled_mm`` (FP8, tensorwise or rowwise scales,
  fast accumulation: see :func:`_scaled_mm`) and ``torch._int_mm`` (INT8 W8A8, plus a Triton
  epilogue), after a Triton kernel quantizes the activations; the weight-only formats stay on
  the Triton GEMM.

Integer and fp8 weights become float32 without I2F (a quarter-rate instruction that would cap
a GEMV near 4 TB/s): the byte goes into the mantissa of 2^23 (``0x4B000000 | u``) and a float
subtraction removes the offset, exact for every 8- and 4-bit value.

Non-goals: other activation layouts (x must be [M, K] with contiguous rows); split-K outside
the INT4 tensor-core kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kiln.plugins.gemv.epilogue import Epilogue, SiluMul
from kiln.plugins.gemv.triton_epilogue import (
    early_tiles,
    gemv_output,
    output_rows,
    row_tile,
    store_rows,
)
from kiln.plugins.pdl import enabled as pdl_enabled
from kiln.plugins.pdl.triton_kernels import prologue
from kiln.plugins.quant_linear import FP8_TRITON_MAX_M
from kiln.plugins.quant_linear.layout import FRAGMENT_GROUP_SIZES, check_group_size, int4_shape
from kiln.plugins.split_counters import CAPACITY as COUNTER_CAPACITY
from kiln.plugins.split_counters import split_counters

FP8_MAX = 448.0
INT8_MAX = 127.0
_ACT_NONE, _ACT_FP8, _ACT_INT8 = 0, 1, 2
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _round_half_even(v):
    # |v| <= 2^22: adding 1.5 * 2^23 leaves no fraction bits, so the add rounds (to nearest
    # even, the hardware mode) and the subtraction is exact
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize(x, s, inv_s, ACT: tl.constexpr, EXACT: tl.constexpr):
    """The quantized values of ``x / s`` as float32 (fp8 e4m3 or int8, the reference's rule).
    ``EXACT``: IEEE division, as the reference (the activation-quantization pass of the GEMMs);
    else ``x * inv_s`` with ``inv_s = 1 / s`` computed once (the GEMV, which quantizes x in
    every program: the per-element division cost 10-25% of its speed on an H200). The product
    is within an ulp of the quotient, so a value rounds the other way only within an ulp of a
    rounding tie."""
    if EXACT:
        v = tl.math.div_rn(x, s)
    else:
        v = x * inv_s
    if ACT == 1:
        return _round_to_e4m3(tl.clamp(v, -448.0, 448.0))
    return _round_half_even(tl.clamp(v, -128.0, 127.0))


@triton.jit
def _round_to_e4m3(v):
    """float32 ``v`` (|v| <= 448) rounded to the nearest e4m3 value, ties to even, as float32
    (torch's float8_e4m3fn cast; Triton's f32 -> fp8 conversion flipped about 0.1% of values
    against it on an H200). Normal range: round the float32 mantissa to 3 bits with the usual
    add-and-mask; below 2^-6, e4m3 is fixed-point in steps of 2^-9. Checked against torch over
    14M values including every tie (bit-equal). The result is exactly representable, so
    storing it as fp8 does not round again."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, _round_half_even(v * 512.0) * 0.001953125, normal)


@triton.jit
def _row_scale(x_row, k, QMAX: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-token scale amax(|x_row|) / QMAX (1 for an all-zero row)."""
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < k, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    a = tl.max(amax, 0)
    return tl.where(a > 0, a * (1.0 / QMAX), 1.0)  # the reference's rule (its docstring)


@triton.jit
def _act_scale(x_row, s_ptr, k, ACT: tl.constexpr, DYNAMIC: tl.constexpr, BLOCK_K: tl.constexpr):
    """The activation scale of one token: static (``*s_ptr``) or per token."""
    if not DYNAMIC:
        return tl.load(s_ptr)
    if ACT == 1:
        return _row_scale(x_row, k, 448.0, BLOCK_K)
    return _row_scale(x_row, k, 127.0, BLOCK_K)


@triton.jit
def _int8_to_f32(w):
    """int8 -> float32 exactly, via the mantissa of 2^23 (module docstring)."""
    u = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080  # 2^23 + (w + 128)
    return u.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _nibbles_to_f32(b):
    """uint8 bytes (as int32 0..255) -> (low, high) 4-bit two's complement values as float32."""
    lo = ((b & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
    hi = ((b >> 4) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
    return lo, hi


# --------------------------------------------------------------------------- M == 1: GEMVs
# A GEMV at one token is a weight stream: on an H200 each SM must take ~18 weight bytes per
# clock, and issues at most 128 thread-instructions per clock (64 on the integer pipe). So the
# instructions per weight byte decide the speed (benchmarks/GPU_NOTES.md counts them from
# the SASS): the bf16 GEMV spends 2 per byte. The kernels below keep the quantized formats near
# that: INT8/INT4 weights are read as 32-bit words and each value becomes float32 with one
# LOP3 (mask and magic in one) and one FADD, in place in the word (value * 2^b, the matching x
# scaled by 2^-b: exact); FP8 weights with the hardware e4m3x2 -> f16x2 conversion; the
# activation row is quantized with one cvt per two values instead of a bit-exact emulation.


@triton.jit
def _e4m3(v):
    """float32 -> the nearest e4m3 value (ties to even, saturating at +-448), as float32: the
    sm89+ ``cvt.rn.satfinite.e4m3x2.f32`` (one per two values, then back through f16x2), equal
    to torch's float8_e4m3fn cast of the clamped value (NaN stays NaN)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b16 q;
        .reg .b32 h;
        .reg .b16 lo, hi;
        cvt.rn.satfinite.e4m3x2.f32 q, $3, $2;
        cvt.rn.f16x2.e4m3x2 h, q;
        mov.b32 {lo, hi}, h;
        cvt.f32.f16 $0, lo;
        cvt.f32.f16 $1, hi;
        }""",
        "=r,=r,r,r", [v], dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _field(word, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """The BITS-bit two's complement field at bit SHIFT of int32 ``word`` (SHIFT + BITS <= 23),
    as float32 times 2^SHIFT, exactly: the field, sign bit flipped (offset binary), lands in
    the mantissa of 2^23 in one LOP3; an FADD removes 2^23 and the offset."""
    mask: tl.constexpr = ((1 << BITS) - 1) << SHIFT
    sign: tl.constexpr = (1 << (BITS - 1)) << SHIFT
    offset: tl.constexpr = 8388608.0 + sign
    return ((word & mask) ^ (0x4B000000 | sign)).to(tl.float32, bitcast=True) - offset


@triton.jit
def _fp8_tile(acc, w, x_ptr, k0, k, inv_s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc`` plus one tile's products: fp8 weight bytes ``w`` [BLOCK_N, BLOCK_K] (uint8: a
    masked load's 'other=0') by x's columns from ``k0``, quantized by ``inv_s``."""
    cols = k0 + tl.arange(0, BLOCK_K)
    x = _e4m3(tl.load(x_ptr + cols, mask=cols < k, other=0.0).to(tl.float32) * inv_s)
    prod = w.to(tl.float8e4nv, bitcast=True).to(tl.float32) * x[None, :]
    return acc + tl.sum(prod.reshape(BLOCK_N, BLOCK_K // 16, 16), 2)


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, ws_ptr, s_ptr, b_ptr, y_ptr, n, k, DYNAMIC: tl.constexpr,
                     WS_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                     EPILOGUE: tl.constexpr = 0, PAIR_HALF=0, table_ptr=None, table_stride=0,
                     index_ptr=None, slot_ptr=None, k_cache_ptr=None, v_cache_ptr=None,
                     c_stride_b=0, c_stride_h=0, c_stride_r=0, clip=0.0, k_scale_ptr=None,
                     v_scale_ptr=None, NUM_HEADS: tl.constexpr = 0,
                     NUM_KV_HEADS: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 0,
                     PAGE: tl.constexpr = 0, ROTARY: tl.constexpr = False,
                     CLIP: tl.constexpr = False, QUANT: tl.constexpr = False,
                     EARLY: tl.constexpr = 0):
    """y[n] = sum_k w[n, k] * e4m3(x[k] * (1 / s)) * s * ws[n] for fp8 weights [N, K] (as
    bytes): x quantized with one float32 reciprocal of s (``_quantize``'s inexact rule); the
    rows, the store and the early tiles (``EARLY``: 0-2, loaded before the PDL wait, see
    ``row_tile``) as :mod:`kiln.plugins.gemv.triton_epilogue`."""
    rows = output_rows(tl.program_id(0), BLOCK_N, EPILOGUE, PAIR_HALF)
    row_ok = rows < n
    w_rows = w_ptr + rows[:, None].to(tl.int64) * k
    if EARLY >= 1:
        w_first = row_tile(w_rows, row_ok, 0, k, BLOCK_K)
    if EARLY >= 2:
        w_second = row_tile(w_rows, row_ok, BLOCK_K, k, BLOCK_K)
    prologue(PDL)
    s = _act_scale(x_ptr, s_ptr, k, 1, DYNAMIC, BLOCK_K)
    inv_s = tl.math.div_rn(1.0, s)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 16], tl.float32)  # see the INT8 GEMV
    if EARLY >= 1:
        acc = _fp8_tile(acc, w_first, x_ptr, 0, k, inv_s, BLOCK_N, BLOCK_K)
    if EARLY >= 2:
        acc = _fp8_tile(acc, w_second, x_ptr, BLOCK_K, k, inv_s, BLOCK_N, BLOCK_K)
    for k0 in range(EARLY * BLOCK_K, k, BLOCK_K):
        acc = _fp8_tile(acc, row_tile(w_rows, row_ok, k0, k, BLOCK_K), x_ptr, k0, k, inv_s,
                        BLOCK_N, BLOCK_K)
    y = tl.sum(acc, 1) * s
    if WS_PER_ROW:
        y = y * tl.load(ws_ptr + rows, mask=row_ok, other=0.0)
    else:
        y = y * tl.load(ws_ptr)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    store_rows(y, rows, row_ok, y_ptr, BLOCK_N, EPILOGUE, PAIR_HALF, table_ptr, table_stride,
               index_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, c_stride_b, c_stride_h, c_stride_r,
               clip, k_scale_ptr, v_scale_ptr, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE, ROTARY,
               CLIP, QUANT)


@triton.jit
def _int8_words_to_f32(w):
    """int32 words of four int8 values -> four float32 tensors (bytes 0..3), exactly: the sign
    bits flipped once per word (offset binary, w + 128), then each byte moved into the
    mantissa of 2^23 by one PRMT; an FADD removes 2^23 + 128."""
    b0, b1, b2, b3 = tl.inline_asm_elementwise(
        """{
        .reg .b32 t;
        xor.b32 t, $4, 0x80808080;
        prmt.b32 $0, t, 0x4B000000, 0x7650;
        prmt.b32 $1, t, 0x4B000000, 0x7651;
        prmt.b32 $2, t, 0x4B000000, 0x7652;
        prmt.b32 $3, t, 0x4B000000, 0x7653;
        }""",
        "=r,=r,=r,=r,r", [w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
        is_pure=True, pack=1)
    return b0 - 8388736.0, b1 - 8388736.0, b2 - 8388736.0, b3 - 8388736.0


@triton.jit
def _int8_tile(acc, w, x_ptr, j0, k, s, inv_s, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_W: tl.constexpr):
    """``acc`` plus one tile's products: int8 weights as int32 words ``w`` [BLOCK_N, BLOCK_W]
    from word ``j0`` by x's columns (quantized by s where ``ACT`` is 2)."""
    b0, b1, b2, b3 = _int8_words_to_f32(w)
    # [BLOCK_N, BLOCK_W, 2, 2] -> [BLOCK_N, 4 * BLOCK_W]: weight 4j + p in column 4j + p
    wf = tl.join(tl.join(b0, b2), tl.join(b1, b3)).reshape(BLOCK_N, 4 * BLOCK_W)
    cols = 4 * j0 + tl.arange(0, 4 * BLOCK_W)
    x = tl.load(x_ptr + cols, mask=cols < k, other=0.0).to(tl.float32)
    if ACT == 2:
        x = _quantize(x, s, inv_s, 2, False)
    # the 16 products of each thread's 16-byte piece summed first: a small accumulator
    # (registers: twice the programs resident per SM, twice the loads in flight)
    return acc + tl.sum((wf * x[None, :]).reshape(BLOCK_N, BLOCK_W // 4, 16), 2)


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, ws_ptr, s_ptr, b_ptr, y_ptr, n, k, ACT: tl.constexpr,
                      DYNAMIC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_W: tl.constexpr, PDL: tl.constexpr = False,
                      EPILOGUE: tl.constexpr = 0, PAIR_HALF=0, table_ptr=None, table_stride=0,
                      index_ptr=None, slot_ptr=None, k_cache_ptr=None, v_cache_ptr=None,
                      c_stride_b=0, c_stride_h=0, c_stride_r=0, clip=0.0, k_scale_ptr=None,
                      v_scale_ptr=None, NUM_HEADS: tl.constexpr = 0,
                      NUM_KV_HEADS: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 0,
                      PAGE: tl.constexpr = 0, ROTARY: tl.constexpr = False,
                      CLIP: tl.constexpr = False, QUANT: tl.constexpr = False,
                      EARLY: tl.constexpr = 0):
    """y[n] = sum_k w[n, k] * x[k] * ws[n] for int8 weights [N, K] (K % 4 == 0), read as int32
    words, ``BLOCK_W`` words of each row per iteration; ``ACT`` 2 (SmoothQuant): x quantized
    to int8 by s (sums of integers, exact), else x as is (weight-only). ``EARLY``: as in the
    fp8 GEMV."""
    rows = output_rows(tl.program_id(0), BLOCK_N, EPILOGUE, PAIR_HALF)
    row_ok = rows < n
    words = k // 4
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None].to(tl.int64) * words
    if EARLY >= 1:
        w_first = row_tile(w_rows, row_ok, 0, words, BLOCK_W)
    if EARLY >= 2:
        w_second = row_tile(w_rows, row_ok, BLOCK_W, words, BLOCK_W)
    prologue(PDL)
    s = 1.0
    inv_s = 1.0
    if ACT == 2:
        s = _act_scale(x_ptr, s_ptr, k, 2, DYNAMIC, 4 * BLOCK_W)
        inv_s = tl.math.div_rn(1.0, s)
    acc = tl.zeros([BLOCK_N, BLOCK_W // 4], tl.float32)
    if EARLY >= 1:
        acc = _int8_tile(acc, w_first, x_ptr, 0, k, s, inv_s, ACT, BLOCK_N, BLOCK_W)
    if EARLY >= 2:
        acc = _int8_tile(acc, w_second, x_ptr, BLOCK_W, k, s, inv_s, ACT, BLOCK_N, BLOCK_W)
    for j0 in range(EARLY * BLOCK_W, words, BLOCK_W):
        acc = _int8_tile(acc, row_tile(w_rows, row_ok, j0, words, BLOCK_W), x_ptr, j0, k,
                         s, inv_s, ACT, BLOCK_N, BLOCK_W)
    if ACT == 2:  # integer products < 2^14: partials < K / (4 BLOCK_W) * 16 * 2^14 < 2^24 exact
        y = tl.sum(acc.to(tl.int32), 1).to(tl.float32) * s
    else:
        y = tl.sum(acc, 1)
    y = y * tl.load(ws_ptr + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    store_rows(y, rows, row_ok, y_ptr, BLOCK_N, EPILOGUE, PAIR_HALF, table_ptr, table_stride,
               index_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, c_stride_b, c_stride_h, c_stride_r,
               clip, k_scale_ptr, v_scale_ptr, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE, ROTARY,
               CLIP, QUANT)


@triton.jit
def _int4_words_to_f32(w):
    """int32 words of eight int4 values (byte p: value 2p in the low nibble, 2p + 1 in the high)
    -> eight float32 tensors, exactly. The sign bits are flipped once per word (offset binary,
    q + 8); each nibble at bit s lands in the mantissa of 2^(23 - s), whose unit is bit s, by one
    LOP3 (mask, or the magic exponent held in a register); an FADD removes 2^(23 - s) + 8."""
    v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
        """{
        .reg .b32 t, u, m0, m4, m8, m12;
        xor.b32 t, $8, 0x88888888;
        shr.u32 u, t, 16;
        mov.b32 m0, 0x4B000000;
        mov.b32 m4, 0x49000000;
        mov.b32 m8, 0x47000000;
        mov.b32 m12, 0x45000000;
        lop3.b32 $0, t, 0x0000000F, m0, 0xEA;
        lop3.b32 $1, t, 0x000000F0, m4, 0xEA;
        lop3.b32 $2, t, 0x00000F00, m8, 0xEA;
        lop3.b32 $3, t, 0x0000F000, m12, 0xEA;
        lop3.b32 $4, u, 0x0000000F, m0, 0xEA;
        lop3.b32 $5, u, 0x000000F0, m4, 0xEA;
        lop3.b32 $6, u, 0x00000F00, m8, 0xEA;
        lop3.b32 $7, u, 0x0000F000, m12, 0xEA;
        }""",
        "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    # 2^23 + 8, 2^19 + 8, 2^15 + 8, 2^11 + 8
    return (v0 - 8388616.0, v1 - 524296.0, v2 - 32776.0, v3 - 2056.0,
            v4 - 8388616.0, v5 - 524296.0, v6 - 32776.0, v7 - 2056.0)


@triton.jit
def _int4_weights(w_rows, s_rows, row_ok, g0, n_groups, WORDS: tl.constexpr,
                  GROUPS: tl.constexpr):
    """Groups ``[g0, g0 + GROUPS)`` of an int4 GEMV program's rows: their int32 words
    [BLOCK_N, GROUPS, WORDS] and scales [BLOCK_N, GROUPS] (0 past the last group or row)."""
    g = g0 + tl.arange(0, GROUPS)
    g_ok = g < n_groups
    j = tl.arange(0, WORDS)
    w = tl.load(w_rows + (g[:, None] * WORDS + j[None, :])[None, :, :],
                mask=row_ok[:, None, None] & g_ok[None, :, None], other=0)
    s = tl.load(s_rows + g[None, :], mask=row_ok[:, None] & g_ok[None, :], other=0.0)
    return w, s


@triton.jit
def _int4_tile(acc, w, s, x_ptr, g0, n_groups, HALF: tl.constexpr, GROUPS: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """``acc`` plus groups ``[g0, g0 + GROUPS)``'s products (:func:`_int4_weights`)."""
    g = g0 + tl.arange(0, GROUPS)
    g_ok = g < n_groups
    f = tl.arange(0, HALF)
    l0, h0, l1, h1, l2, h2, l3, h3 = _int4_words_to_f32(w)
    # [BLOCK_N, GROUPS, WORDS, 2, 2] -> [BLOCK_N, GROUPS, HALF]: feature 4j + p
    lo = tl.join(tl.join(l0, l2), tl.join(l1, l3)).reshape(BLOCK_N, GROUPS, HALF)
    hi = tl.join(tl.join(h0, h2), tl.join(h1, h3)).reshape(BLOCK_N, GROUPS, HALF)
    x_lo = x_ptr + g[:, None] * (2 * HALF) + f[None, :]  # [GROUPS, HALF]
    xl = tl.load(x_lo, mask=g_ok[:, None], other=0.0).to(tl.float32)
    xh = tl.load(x_lo + HALF, mask=g_ok[:, None], other=0.0).to(tl.float32)
    # each group's products summed per feature pair, its scale applied once per pair
    part = tl.sum((lo * xl[None, :, :] + hi * xh[None, :, :]).reshape(
        BLOCK_N, GROUPS, HALF // 16, 16), 3)
    return acc + part * s[:, :, None]


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, n, k, HALF: tl.constexpr,
                      GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      PDL: tl.constexpr = False, EARLY: tl.constexpr = 0):
    """y[n] = sum over groups g of s[n, g] * (lo . x[gG : gG+G/2] + hi . x[gG+G/2 : (g+1)G]),
    ``GROUPS`` groups per iteration. The split-group bytes are read as int32 words: byte p of
    word j of a group holds feature 4j + p (low nibble) and G/2 + 4j + p (high nibble).
    No epilogues: measured slower with the rotary (GPU_NOTES.md, thirteenth pass). ``EARLY``
    (0 or 1): the first iteration's weights and scales loaded before the PDL wait (as
    ``kiln.plugins.gemv.triton_epilogue.row_tile``)."""
    WORDS: tl.constexpr = HALF // 4
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    n_groups = k // (2 * HALF)
    w_rows = (w_ptr.to(tl.pointer_type(tl.int32))
              + rows[:, None, None].to(tl.int64) * (n_groups * WORDS))
    s_rows = ws_ptr + rows[:, None].to(tl.int64) * n_groups
    if EARLY:
        w_first, s_first = _int4_weights(w_rows, s_rows, row_ok, 0, n_groups, WORDS, GROUPS)
    prologue(PDL)
    acc = tl.zeros([BLOCK_N, GROUPS, HALF // 16], tl.float32)
    if EARLY:
        acc = _int4_tile(acc, w_first, s_first, x_ptr, 0, n_groups, HALF, GROUPS, BLOCK_N)
    for g0 in range(EARLY * GROUPS, n_groups, GROUPS):
        w, s = _int4_weights(w_rows, s_rows, row_ok, g0, n_groups, WORDS, GROUPS)
        acc = _int4_tile(acc, w, s, x_ptr, g0, n_groups, HALF, GROUPS, BLOCK_N)
    y = tl.sum(tl.sum(acc, 2), 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def _int4_pairs_asm(magic: str, one: str, minus_offset: str, fma: str) -> tl.constexpr:
    """PTX of :func:`_int4_words_to_halves` for one 16-bit float type (its constants)."""
    lines = [f"mov.b32 c, {magic};", f"mov.b32 one, {one};", f"mov.b32 neg, {minus_offset};",
             "lop3.b32 d0, $8, 0x000F000F, c, 0x6A;"]
    for s in (1, 2, 3):
        lines += [f"shr.u32 u, $8, {4 * s};", f"lop3.b32 d{s}, u, 0x000F000F, c, 0x6A;"]
    lines += [f"{fma} d{s}, d{s}, one, neg;" for s in range(4)]
    lines += [f"mov.b32 {{${s}, ${s + 4}}}, d{s};" for s in range(4)]
    return tl.constexpr("{ .reg .b32 c, one, neg, u, d0, d1, d2, d3;\n" + "\n".join(lines) + "\n}")


# (magic, one, minus offset) of the int4 -> 16-bit pair conversion, per type (also the Gluon
# kernel's, gluon_kernels)
INT4_PAIR_CONSTANTS = {"bf16": ("0x43084308", "0x3F803F80", "0xC308C308"),
                       "f16": ("0x64086408", "0x3C003C00", "0xE408E408")}
_INT4_TO_BF16 = _int4_pairs_asm(*INT4_PAIR_CONSTANTS["bf16"], "fma.rn.bf16x2")
_INT4_TO_F16 = _int4_pairs_asm(*INT4_PAIR_CONSTANTS["f16"], "fma.rn.f16x2")


@triton.jit
def _int4_words_to_halves(w, BF16: tl.constexpr):
    """int32 words of eight int4 values (two's complement) -> eight 16-bit float tensors
    (bfloat16 if ``BF16`` else float16), exactly. Nibbles 2p and 2p + 1 of 16-bit half h of
    ``w >> 4s`` (s = 0..3) land in one 16-bit float pair with one LOP3: bits under the mask
    0x000F000F become ``w ^ c``, the rest ``c`` (lut 0x6A), with c = the magic 128.0 (bf16) or
    1024.0 (f16), whose unit is 1, plus 8 in each nibble's position (flipping its sign bit:
    offset binary). One FMA (x 1 - 136, or - 1032) per pair leaves the value. Output r holds
    the pair's low half for r < 4, its high half for r >= 4: nibble s of bytes 0/2 or 1/3."""
    if BF16:
        return tl.inline_asm_elementwise(_INT4_TO_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w],
                                         dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_INT4_TO_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)


# The token count m is not specialized (nor in the GEMMs below): a step's token count is
# any number, and m = 16, 32, 48, 64 compiled a variant of their own during requests
# that the load-time warm-up (other counts) had not (tests/gpu/test_warm_up_gpu.py).
@triton.jit(do_not_specialize=["m"])
def _int4_mma_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, part_ptr, count_ptr, m, n, k,
                     stride_xm, stride_ym, HALF: tl.constexpr, GROUPS: tl.constexpr,
                     SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_M: tl.constexpr, PDL: tl.constexpr = False):
    """y^T tile [BLOCK_N rows, BLOCK_M tokens] = sum over groups g of s[:, g] * (q_g @ x_g^T)
    on tensor cores, for a few tokens (decode batches), ``GROUPS`` groups per iteration. Each
    group's int32 words become exact 16-bit values in 2.75 instructions per weight byte
    (:func:`_int4_words_to_halves`) feeding four dots: pair register r of word j holds
    features 4j + (0, 2) + (0, HALF, 1, HALF + 1)[r], so each dot's K index 2j + h is one pair
    register, already in the operand layout (no shuffles); x is read whole per group (vector
    loads the pipeliner can prefetch) and split to match. The group's scale multiplies its
    float32 dot once per output (the reference's q * s, summed).

    ``SPLITS > 1`` (split-K, for shapes with few row tiles): program (i, j, s) sums the s-th of
    ``SPLITS`` equal runs of groups and writes it to ``part [SPLITS, m, n]``; the last of a
    tile's programs to arrive (a counter per tile, reset by that program for the next call)
    adds the runs in split order, so the result does not depend on which program is last."""
    prologue(PDL)
    WORDS: tl.constexpr = HALF // 4
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    tok = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_ok = tok < m
    n_groups = k // (2 * HALF)
    w_rows = (w_ptr.to(tl.pointer_type(tl.int32))
              + rows[:, None].to(tl.int64) * (n_groups * WORDS))
    s_rows = ws_ptr + rows.to(tl.int64) * n_groups
    j = tl.arange(0, WORDS)
    x_toks = x_ptr + tok[None, :].to(tl.int64) * stride_xm
    f = tl.arange(0, 2 * HALF)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    per_split = n_groups // SPLITS
    first = tl.program_id(2) * per_split
    for g0 in range(first, first + per_split, GROUPS):
        for gi in tl.static_range(GROUPS):
            g = g0 + gi
            w = tl.load(w_rows + g * WORDS + j[None, :], mask=row_ok[:, None], other=0)
            q0, q1, q2, q3, q4, q5, q6, q7 = _int4_words_to_halves(w, x_ptr.dtype.element_ty
                                                                    == tl.bfloat16)
            # the group's x read whole (vector loads, pipelined), then split into the dots'
            # operands: feature hi * HALF + 4j + 2h + p goes to operand (hi, p), K index 2j + h
            xg = tl.load(x_toks + g * (2 * HALF) + f[:, None], mask=tok_ok[None, :], other=0.0)
            x_lo, x_hi = tl.split(xg.reshape(2, WORDS, 2, 2, BLOCK_M).permute(4, 1, 2, 3, 0))
            x0, x2 = tl.split(x_lo)  # [BLOCK_M, WORDS, 2] each
            x1, x3 = tl.split(x_hi)
            part = tl.dot(tl.join(q0, q4).reshape(BLOCK_N, 2 * WORDS),
                          x0.reshape(BLOCK_M, 2 * WORDS).T)
            part = tl.dot(tl.join(q1, q5).reshape(BLOCK_N, 2 * WORDS),
                          x1.reshape(BLOCK_M, 2 * WORDS).T, part)
            part = tl.dot(tl.join(q2, q6).reshape(BLOCK_N, 2 * WORDS),
                          x2.reshape(BLOCK_M, 2 * WORDS).T, part)
            part = tl.dot(tl.join(q3, q7).reshape(BLOCK_N, 2 * WORDS),
                          x3.reshape(BLOCK_M, 2 * WORDS).T, part)
            acc += part * tl.load(s_rows + g, mask=row_ok, other=0.0)[:, None]
    ok = row_ok[:, None] & tok_ok[None, :]
    last = True
    if SPLITS > 1:
        runs = part_ptr + tok[None, :].to(tl.int64) * n + rows[:, None]
        tl.store(runs + tl.program_id(2) * m * n, acc, mask=ok)
        tl.debug_barrier()  # every thread's run stored before the counter says so
        tile = count_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        last = tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu") == SPLITS - 1
        if last:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for split in tl.static_range(SPLITS):  # in split order: deterministic
                acc += tl.load(runs + split * m * n, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(tile, 0, sem="relaxed", scope="gpu")
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        out = y_ptr + tok[None, :].to(tl.int64) * stride_ym + rows[:, None]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- M > 1: GEMMs


@triton.jit
def _tile_ids(m, n, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr):
    """(n tile, m tile) of this program, GROUP_N weight tiles sharing a sweep over the tokens
    so they stay in L2 (the usual grouped ordering)."""
    pid = tl.program_id(0)
    tiles_n, tiles_m = tl.cdiv(n, BLOCK_N), tl.cdiv(m, BLOCK_M)
    per_group = GROUP_N * tiles_m
    first_n = (pid // per_group) * GROUP_N
    group_n = min(tiles_n - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_n, (pid % per_group) // group_n


@triton.jit
def _store_tile(acc, y_ptr, ws_ptr, as_ptr, b_ptr, rn, rm, m, n, stride_ym,
                WS_MODE: tl.constexpr, AS_PER_ROW: tl.constexpr, HAS_AS: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] (y^T) (* weight scale: WS_MODE 0 none, 1 scalar, 2 [n])
    (* input scale[m]) + bias[n] -> y[m, n]."""
    n_ok, m_ok = rn < n, rm < m
    out = acc.to(tl.float32)
    if HAS_AS:
        if AS_PER_ROW:
            out = out * tl.load(as_ptr + rm, mask=m_ok, other=0.0)[None, :]
        else:
            out = out * tl.load(as_ptr)
    if WS_MODE == 2:
        out = out * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)[:, None]
    if WS_MODE == 1:
        out = out * tl.load(ws_ptr)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y = y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None]
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit(do_not_specialize=["m"])
def _w8_gemm_kernel(a_ptr, w_ptr, ws_ptr, as_ptr, b_ptr, y_ptr, m, n, k, stride_am, stride_ym,
                    MODE: tl.constexpr, WS_MODE: tl.constexpr, AS_PER_ROW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_N: tl.constexpr):
    """y^T tile = W [BLOCK_N, K] @ A^T [K, BLOCK_M]; MODE 0: A = x, int8 W converted to x's
    dtype; 1: A = fp8 q, fp8 W; 2: A = int8 q, int8 W, exact int32 accumulation of per-tile
    bf16 dots (Triton's int8 tl.dot gave wrong sums in this swapped orientation on an H200,
    Triton 3.6: to look into)."""
    tile_n, tile_m = _tile_ids(m, n, BLOCK_N, BLOCK_M, GROUP_N)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (rn % n)[:, None].to(tl.int64) * k + rk[None, :]  # rows past n: re-read
    a_ptrs = a_ptr + (rm % m)[None, :].to(tl.int64) * stride_am + rk[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.int32 if MODE == 2 else tl.float32)
    for k0 in range(0, k, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            a = tl.load(a_ptrs)
        else:
            k_ok = rk + k0 < k
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
            a = tl.load(a_ptrs, mask=k_ok[:, None], other=0)
        if MODE == 0:
            acc = tl.dot(_int8_to_f32(w).to(a.dtype), a, acc, input_precision=PRECISION)
        elif MODE == 1:  # fp8 operands arrive as their bytes (uint8), see the GEMV
            acc = tl.dot(w.to(tl.float8e4nv, bitcast=True), a.to(tl.float8e4nv, bitcast=True),
                         acc)
        else:  # int8 x int8 as bf16 (exact) dots; one tile's sum < BLOCK_K * 2^14 is exact
            part = tl.dot(_int8_to_f32(w).to(tl.bfloat16), _int8_to_f32(a).to(tl.bfloat16))
            acc += part.to(tl.int32)
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    _store_tile(acc, y_ptr, ws_ptr, as_ptr, b_ptr, rn, rm, m, n, stride_ym,
                WS_MODE, AS_PER_ROW, MODE != 0, HAS_BIAS)


@triton.jit(do_not_specialize=["m"])
def _int4_gemm_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, m, n, k, stride_xm, stride_ym,
                      HALF: tl.constexpr, GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                      GROUP_N: tl.constexpr):
    """y^T tile = sum over groups of (lo * s) @ x_lo^T + (hi * s) @ x_hi^T, ``GROUPS`` groups
    per iteration (``n_groups % GROUPS == 0``), weights dequantized into x's dtype."""
    tile_n, tile_m = _tile_ids(m, n, BLOCK_N, BLOCK_M, GROUP_N)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, HALF)
    n_groups = k // (2 * HALF)
    w_ptrs = w_ptr + (rn % n)[:, None].to(tl.int64) * (k // 2) + j[None, :]  # [BLOCK_N, HALF]
    x_ptrs = x_ptr + (rm % m)[None, :].to(tl.int64) * stride_xm + j[:, None]  # [HALF, BLOCK_M]
    s_ptrs = ws_ptr + (rn % n).to(tl.int64) * n_groups
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g0 in range(0, n_groups, GROUPS):
        for gi in tl.static_range(GROUPS):
            g = g0 + gi
            w = tl.load(w_ptrs + g * HALF).to(tl.int32)
            s = tl.load(s_ptrs + g)[:, None]
            xl = tl.load(x_ptrs + g * (2 * HALF))
            xh = tl.load(x_ptrs + g * (2 * HALF) + HALF)
            lo, hi = _nibbles_to_f32(w)
            acc = tl.dot((lo * s).to(xl.dtype), xl, acc, input_precision=PRECISION)
            acc = tl.dot((hi * s).to(xh.dtype), xh, acc, input_precision=PRECISION)
    _store_tile(acc, y_ptr, ws_ptr, ws_ptr, b_ptr, rn, rm, m, n, stride_ym, 0, False, False,
                HAS_BIAS)


# --------------------------------------------------------------------------- dequantization


@triton.jit
def _dequant_int8_kernel(w_ptr, ws_ptr, out_ptr, n, k, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """out[n, k] = w[n, k] * ws[n] in out's dtype (weight-only INT8, for cuBLAS)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows < n)[:, None] & (cols < k)[None, :]
    offs = rows[:, None].to(tl.int64) * k + cols[None, :]
    w = _int8_to_f32(tl.load(w_ptr + offs, mask=ok, other=0))
    s = tl.load(ws_ptr + rows, mask=rows < n, other=0.0)
    tl.store(out_ptr + offs, (w * s[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_int4_kernel(w_ptr, ws_ptr, out_ptr, n, k, HALF: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """out[n, k] = value * its group's scale in out's dtype (split-group INT4, for cuBLAS)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    j = tl.arange(0, HALF)
    n_groups = k // (2 * HALF)
    ok = (rows < n)[:, None, None] & (g < n_groups)[None, :, None]
    byte = rows[:, None, None].to(tl.int64) * (k // 2) + (g[:, None] * HALF + j[None, :])[None]
    lo, hi = _nibbles_to_f32(tl.load(w_ptr + byte, mask=ok, other=0).to(tl.int32))
    s = tl.load(ws_ptr + rows[:, None].to(tl.int64) * n_groups + g[None, :],
                mask=(rows < n)[:, None] & (g < n_groups)[None, :], other=0.0)[:, :, None]
    cols = g[:, None] * (2 * HALF) + j[None, :]
    out = out_ptr + rows[:, None, None].to(tl.int64) * k + cols[None]
    tl.store(out, (lo * s).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HALF, (hi * s).to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_int8(weight: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    _dequant_int8_kernel[(triton.cdiv(n, 16), triton.cdiv(k, 256))](
        weight, ws, out, n, k, BLOCK_N=16, BLOCK_K=256, num_warps=4)
    return out


def dequantize_int4(weight: torch.Tensor, ws: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    n, k = weight.shape[0], 2 * weight.shape[1]
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    groups = max(1, 128 // group_size)
    _dequant_int4_kernel[(triton.cdiv(n, 16), triton.cdiv(k // group_size, groups))](
        weight, ws, out, n, k, HALF=group_size // 2, BLOCK_N=16, GROUPS=groups, num_warps=4)
    return out


@triton.jit
def _fragment_values(w_ptr, tile0, c0, n_chunks, R: tl.constexpr, C: tl.constexpr):
    """int32 values [16 R, 64 C] (rows 16 tile0 .., features 64 c0 ..; ``R`` row tiles and ``C``
    chunks) of INT4 weights in the fragment layout (layout.py: nibble 4p + 2h + r of word
    [i, c, 4g + t, j] is row 16i + 8r + g, feature 64c + 16t + 4j + 2h + p): the words loaded
    contiguously (512 bytes a tile and chunk), their nibbles put in order in registers."""
    ri = tl.arange(0, R)
    ci = tl.arange(0, C)
    li = tl.arange(0, 128)  # 4 lane + j
    word = (((tile0 + ri)[:, None, None].to(tl.int64) * n_chunks + (c0 + ci)[None, :, None])
            * 128 + li[None, None, :])
    w = tl.load(w_ptr + word)  # [R, C, 128]
    v = (w[:, :, :, None] >> (4 * tl.arange(0, 8))[None, None, None, :]) & 0xF
    v = tl.reshape((v ^ 8) - 8, [R, C, 8, 4, 4, 2, 2, 2])  # (i, c, g, t, j, p, h, r)
    v = tl.permute(v, [0, 7, 2, 1, 3, 4, 6, 5])  # (i, r, g, c, t, j, h, p)
    return tl.reshape(v, [16 * R, 64 * C])


@triton.jit
def _dequant_fragments_kernel(w_ptr, ws_ptr, out_ptr, k, GROUP: tl.constexpr,
                              R: tl.constexpr, C: tl.constexpr):
    """out[n, k] = value * its group's scale in out's dtype (fragment-order INT4, for cuBLAS):
    a program converts R row tiles by C chunks."""
    tile0 = tl.program_id(0) * R
    c0 = tl.program_id(1) * C
    v = _fragment_values(w_ptr, tile0, c0, k // 64, R, C).to(tl.float32)
    rows = tile0 * 16 + tl.arange(0, 16 * R)
    cols = c0 * 64 + tl.arange(0, 64 * C)
    s = tl.load(ws_ptr + rows[:, None].to(tl.int64) * (k // GROUP) + (cols // GROUP)[None, :])
    out = out_ptr + rows[:, None].to(tl.int64) * k + cols[None, :]
    tl.store(out, (v * s).to(out_ptr.dtype.element_ty))


def dequantize_fragments(words: torch.Tensor, ws: torch.Tensor, group_size: int,
                         dtype: torch.dtype) -> torch.Tensor:
    n, k = int4_shape(words)
    out = torch.empty((n, k), dtype=dtype, device=words.device)
    chunks = math.gcd(k // 64, 4)
    _dequant_fragments_kernel[(n // 16, k // 64 // chunks)](
        words, ws, out, k, GROUP=group_size, R=1, C=chunks, num_warps=4)
    return out


# --------------------------------------------------------------------------- activations


@triton.jit
def _quant_rows_kernel(x_ptr, s_in_ptr, q_ptr, s_out_ptr, k, stride_xm, ACT: tl.constexpr,
                       DYNAMIC: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per token: q[m, :] (fp8 or int8) and its scale s[m] (static or amax/QMAX)."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    s = _act_scale(x_row, s_in_ptr, k, ACT, DYNAMIC, BLOCK_K)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < k, other=0.0).to(tl.float32)
        q = _quantize(x, s, s, ACT, True)
        tl.store(q_ptr + row.to(tl.int64) * k + cols, q.to(q_ptr.dtype.element_ty), mask=cols < k)
    tl.store(s_out_ptr + row, s)


@triton.jit(do_not_specialize=["m"])
def _int_epilogue_kernel(acc_ptr, s_ptr, ws_ptr, b_ptr, y_ptr, m, n, stride_ym,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = int32 acc * s[m] * ws[n] (+ bias[n]) in y's dtype (after torch._int_mm)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < m)[:, None] & (rn < n)[None, :]
    acc = tl.load(acc_ptr + rm[:, None].to(tl.int64) * n + rn[None, :], mask=ok, other=0)
    out = acc.to(tl.float32) * tl.load(s_ptr + rm, mask=rm < m, other=0.0)[:, None]
    out = out * tl.load(ws_ptr + rn, mask=rn < n, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=rn < n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :],
             out.to(y_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- configs
# From benchmarks/quant_kernels.py's sweep on an H200 (commit a518f1a's kernels, Llama-3.1-8B
# shapes, M = 1): the best of 9 candidates per shape, within 3% of the next best.


def w8_gemv_config(n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, early tiles) of the fp8/int8 GEMV (BLOCK_K in
    bytes; early tiles: loaded before the PDL wait, 0-2; a config may leave them out: 0).

    One early tile on ``o`` and ``down``: their weights start streaming while decode attention
    or the gate/up GEMV's tail runs. On ``qkv`` and ``gate_up`` (after a norm) they gain
    nothing: the norm, a one-program kernel, waits on memory behind them. An H200's FP8
    batch-1 step, in us (GPU_NOTES.md, fifteenth pass): 2,475 with none, 2,416 so, 2,418 with
    one on each, 2,426 with two on ``down``, 2,437-2,457 with two on ``o``."""
    if n >= 16384:
        return 32, 256, 4, 4, 0  # gate_up: fp8 3.56 TB/s, int8 3.63
    if k >= 8192:
        return 8, 2048, 8, 3, 1  # down: 3.28, 3.29
    if n <= 4096:
        return 4, 2048, 4, 3, 1  # o: 2.31, 2.31
    return 8, 1024, 4, 3, 0  # qkv: 2.54, 2.59


def int4_gemv_config(n: int, k: int, group_size: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, bytes of a row per iteration, num_warps, num_stages, early: 0 or 1) of the int4
    GEMV; early: the first iteration's loads before the PDL wait, on ``o`` (and ``down``,
    which at one token runs the tensor-core kernel instead), as ``w8_gemv_config``; a config
    may leave it out: 0."""
    if n >= 16384:
        return 16, 256, 4, 4, 0  # gate_up: 1.86 TB/s
    return 4, 1024, 4, 3, int(k >= 8192 or n <= 4096)  # qkv 1.34, o 1.20, down 1.58


def int4_mma_config(n: int, k: int, m: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_N, BLOCK_M, groups per iteration, num_warps, num_stages, splits) of the int4
    tensor-core kernel (groups per iteration and splits: at most; divisors of the row's
    groups)."""
    # H200 sweeps (Llama-3.1-8B shapes, us, g128): the best or within 3%. Split-K pays where
    # the row tiles are few (o, down: 128 of them at 32 rows). A warp's 16-row mma tiles share
    # the group's activations, shuffled into the operand layout once per warp: 32 rows a warp
    # (BLOCK_N 128 on 4 warps, 64 on 2) spend 4.2 instructions per weight byte where 16 spend
    # 5.0 (issue12_fourteenth_pass/int4_mma_rows_*.json; quant_kernels_int4_split_results.json)
    if m <= 8:
        if n >= 4 * k:
            return 128, 8, 2, 4, 3, 1  # gate_up 27.4 (31.4 at 16 rows a warp; M = 1)
        return 32, 8, 2, 2, 4, 2 if n > k else 4  # qkv 9.4 (unsplit 11.1), o 7.2, down 15.6
    if n >= 4 * k:
        return 64, 16, 2, 2, 3, 1  # gate_up 34.7 (16 rows on 1 warp: 40.9; M = 16)
    if n <= k:
        return 64, 16, 2, 2, 3, 4  # o 8.4 (32-row tiles in 2 splits: 9.1), down 19.2 (23.8)
    return 32, 16, 2, 2, 4, 2  # qkv 11.7 (unsplit 13.3)


# Largest M on the INT4 tensor-core kernel (a program's token tile is 8 or 16 wide).
INT4_MMA_MAX_M = 16


def gemm_config(m: int, eight_bit_a: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages) of the tiled GEMMs (BLOCK_N weight
    rows by BLOCK_M tokens); ``eight_bit_a``: fp8/int8 activations (twice the K per byte)."""
    if m <= 16:
        return 64, 16, 256 if eight_bit_a else 128, 4, 4
    if m <= 32:
        return 64, 32, 256 if eight_bit_a else 128, 4, 4
    if m <= 64:
        return 64, 64, 128, 4, 4
    if m <= 256:
        return 128, 64, 128 if eight_bit_a else 64, 4, 4
    return 128, 128, 128 if eight_bit_a else 64, 8, 3


# Largest M on the Triton GEMM before cuBLASLt takes over (W8A8 formats; FP8_TRITON_MAX_M is
# the package's, shared with the reference).
INT8_TRITON_MAX_M = 64


# --------------------------------------------------------------------------- checks


def _check_x_weight(fn: str, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                    k_per_col: int = 1) -> tuple[int, int, int]:
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES or (x.shape[0] and x.stride(1) != 1):
        raise ValueError(f"{fn}: x must be [M, K] float16/bfloat16/float32 with contiguous rows, "
                         f"found {tuple(x.shape)} {x.dtype} strides {x.stride()}")
    if weight.dim() != 2 or weight.dtype != dtype or not weight.is_contiguous():
        raise ValueError(f"{fn}: weight must be a contiguous 2-D {dtype} tensor, found "
                         f"{tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape[0], weight.shape[1] * k_per_col
    if x.shape[1] != k:
        raise ValueError(f"{fn}: x has {x.shape[1]} input features, the weight {k}")
    if weight.device != x.device:
        raise ValueError(f"{fn}: x and weight must be on one device, found {x.device} and "
                         f"{weight.device}")
    return x.shape[0], n, k


def _check_x_fragments(fn: str, x: torch.Tensor, words: torch.Tensor,
                       group_size: int) -> tuple[int, int, int]:
    """(M, N, K) of an int4 weight in the fragment layout (int32 [N/16, K/64, 32, 4])."""
    if words.dim() != 4 or tuple(words.shape[2:]) != (32, 4) or not words.is_contiguous():
        raise ValueError(f"{fn}: an int32 weight is the fragment layout, contiguous "
                         f"[N/16, K/64, 32, 4], found {tuple(words.shape)}")
    if group_size not in FRAGMENT_GROUP_SIZES:
        raise ValueError(f"{fn}: int4 group_size {group_size} in the fragment layout: it holds "
                         f"group sizes {', '.join(map(str, FRAGMENT_GROUP_SIZES))}")
    n, k = int4_shape(words)
    _check_x_weight(fn, x, words.view(n, k // 8), torch.int32, k_per_col=8)
    return x.shape[0], n, k


def _vector(fn: str, what: str, t: torch.Tensor | None, sizes: tuple[int, ...],
            ) -> torch.Tensor | None:
    """A scale or bias as a flat tensor (float32 for scales), checking its element count."""
    if t is None:
        return None
    if t.numel() not in sizes:
        raise ValueError(f"{fn}: {what} must have {' or '.join(map(str, sizes))} elements, "
                         f"found shape {tuple(t.shape)}")
    return t.reshape(-1) if what == "bias" else t.reshape(-1).float()


def _scales(fn: str, x: torch.Tensor, n: int, weight_scale: torch.Tensor, per_tensor_ok: bool,
            input_scale: torch.Tensor | None, bias: torch.Tensor | None):
    ws = _vector(fn, "weight_scale", weight_scale, (1, n) if per_tensor_ok else (n,))
    return ws, _vector(fn, "input_scale", input_scale, (1,)), _vector(fn, "bias", bias, (n,))


# --------------------------------------------------------------------------- launchers


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8 views (the kernels bitcast them back after masked loads)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _launch_w8_gemv(x, weight, ws, s, bias, act, config=None, epilogue=None):
    n, k = weight.shape
    block_n, block_k, warps, stages, *early = config or w8_gemv_config(n, k)
    y, epilogue_args, finish = gemv_output(epilogue, n, block_n, x)
    pdl = pdl_enabled(x.device)
    common = dict(DYNAMIC=s is None, HAS_BIAS=bias is not None, BLOCK_N=block_n, PDL=pdl,
                  EARLY=early_tiles("w8 gemv", early, pdl), num_warps=warps,
                  num_stages=stages, launch_pdl=pdl, **epilogue_args)
    args = (x, _bytes(weight), ws, s if s is not None else ws, bias if bias is not None else ws,
            y, n, k)
    if act == _ACT_FP8:
        _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
            *args, WS_PER_ROW=ws.numel() > 1, BLOCK_K=block_k, **common)
    else:
        _int8_gemv_kernel[(triton.cdiv(n, block_n),)](
            *args, ACT=act, BLOCK_W=block_k // 4, **common)
    return finish(y)


def _words_ok(weight: torch.Tensor) -> bool:
    """int8 GEMV reads rows as int32 words: K % 4 == 0 and a 4-byte aligned weight."""
    return weight.shape[1] % 4 == 0 and weight.data_ptr() % 4 == 0


def _launch_w8_gemm(a, weight, ws, a_scale, bias, out_dtype, mode, config=None):
    m, k = a.shape
    n = weight.shape[0]
    if config is None:
        config = gemm_config(m, mode != 0)
        if a.dtype == torch.float32:  # ieee fp32 dots: small tiles (registers, shared memory)
            config = (64, 32, 32, 4, 2)
    block_n, block_m, block_k, warps, stages = config
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(n, block_n) * triton.cdiv(m, block_m),)
    _w8_gemm_kernel[grid](
        _bytes(a), _bytes(weight), ws, a_scale if a_scale is not None else ws,
        bias if bias is not None else ws, y, m, n, k, a.stride(0), y.stride(0), MODE=mode,
        WS_MODE=2 if ws.numel() > 1 else 1, AS_PER_ROW=a_scale is not None and a_scale.numel() > 1,
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", BLOCK_N=block_n,
        BLOCK_M=block_m, BLOCK_K=block_k, GROUP_N=8, num_warps=warps, num_stages=stages)
    return y


def _quantize_rows(x, input_scale, act):
    """(q [M, K] fp8/int8, s [M] float32) by the Triton activation kernel."""
    m, k = x.shape
    # One Triton pass dividing exactly, as the reference (_quantize); the torch ops it replaced
    # for fp8 made four passes over [M, K] float32 and cost FP8 prefill its lead over bf16 on o
    # and down (H200).
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if act == _ACT_FP8 else torch.int8,
                    device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    _quant_rows_kernel[(m,)](x, input_scale if input_scale is not None else s, q, s, k,
                             x.stride(0), ACT=act, DYNAMIC=input_scale is None,
                             BLOCK_K=min(2048, triton.next_power_of_2(k)), num_warps=4)
    return q, s


# --------------------------------------------------------------------------- paths
# Each path takes the public function's arguments after checking (flat float32 scales); the
# public functions pick one by M, the benchmark and tests call them by name through PATHS.


def _fp8_gemv(x, weight, ws, s, bias, config=None, epilogue=None):
    return _launch_w8_gemv(x, weight, ws, s, bias, _ACT_FP8, config, epilogue)


def _fp8_triton(x, weight, ws, s, bias, config=None):
    q, s_rows = _quantize_rows(x, s, _ACT_FP8)
    return _launch_w8_gemm(q, weight, ws, s_rows, bias, x.dtype, _ACT_FP8, config)


def _fp8_scaled_mm_ok(x, n, k, ws, s) -> bool:
    tensorwise = ws.numel() == 1 and s is not None
    return k % 16 == 0 and n % 16 == 0 and (tensorwise or x.dtype == torch.bfloat16)


def _fp8_scaled_mm(x, weight, ws, s, bias, config=None):
    """cuBLASLt: tensorwise scales when both are scalars, else rowwise (bf16 output only)."""
    q, s_rows = _quantize_rows(x, s, _ACT_FP8)
    return _scaled_mm(q, s, s_rows, weight, ws, bias, x.dtype)


def _scaled_mm(q, s, s_rows, weight, ws, bias, out_dtype):
    """``torch._scaled_mm`` of the quantized input ``q`` (its static scale ``s``, or None and
    per-row ``s_rows``).

    Fast accumulation (``use_fast_accum``, as vLLM's and TensorRT-LLM's FP8 GEMMs on Hopper):
    the tensor cores' partial sums are not promoted to float32 every few K steps. On an H200 it
    took the 8B shapes' GEMMs at 2,048 tokens 5-8% faster, the relative L2 error against an
    exact float32 product of the same FP8 operands 0.0021-0.0033 instead of 0.0017 (K = 4096
    and 14336; the bf16 output's own rounding is ~0.002): GPU_NOTES.md, "Issue 12, sixth pass".
    """
    m, n = q.shape[0], weight.shape[0]
    if ws.numel() == 1 and s is not None:
        y = torch._scaled_mm(q, weight.t(), s.reshape(()), ws.reshape(()), out_dtype=out_dtype,
                             use_fast_accum=True)
    else:
        scale_b = ws.reshape(1, n) if ws.numel() == n else ws.reshape(1, 1).expand(1, n)
        y = torch._scaled_mm(q, weight.t(), s_rows.view(m, 1), scale_b.contiguous(),
                             out_dtype=torch.bfloat16, use_fast_accum=True)
    return y if bias is None else y.add_(bias)  # rounds twice: within an ulp of one rounding


def _int8_gemv(x, weight, ws, s, bias, config=None, epilogue=None):
    return _launch_w8_gemv(x, weight, ws, s, bias, _ACT_INT8, config, epilogue)


def _int8_triton(x, weight, ws, s, bias, config=None):
    q, s_rows = _quantize_rows(x, s, _ACT_INT8)
    return _launch_w8_gemm(q, weight, ws, s_rows, bias, x.dtype, _ACT_INT8, config)


def _int_mm_ok(m, n, k) -> bool:
    return m > 16 and k % 8 == 0 and n % 8 == 0  # torch._int_mm's (cuBLASLt's) limits


def _int8_int_mm(x, weight, ws, s, bias, config=None):
    q, s_rows = _quantize_rows(x, s, _ACT_INT8)
    m, n = x.shape[0], weight.shape[0]
    acc = torch._int_mm(q, weight.t())  # [M, N] int32, exact
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _int_epilogue_kernel[(triton.cdiv(m, 32), triton.cdiv(n, 128))](
        acc, s_rows, ws, bias if bias is not None else ws, y, m, n, y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return y


def _int8_wo_gemv(x, weight, ws, bias, config=None, epilogue=None):
    return _launch_w8_gemv(x, weight, ws, None, bias, _ACT_NONE, config, epilogue)


def _int8_wo_triton(x, weight, ws, bias, config=None):
    return _launch_w8_gemm(x, weight, ws, None, bias, x.dtype, _ACT_NONE, config)


def _int4_gemv(x, weight, ws, group_size, bias, config=None):
    n, k = weight.shape[0], 2 * weight.shape[1]
    block_n, block_bytes, warps, stages, *early = config or int4_gemv_config(n, k, group_size)
    half = group_size // 2
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    pdl = pdl_enabled(x.device)
    early = early_tiles("int4 gemv", early, pdl, most=1)
    _int4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, ws, bias if bias is not None else ws, y, n, k, HALF=half,
        GROUPS=max(1, block_bytes // half), HAS_BIAS=bias is not None, BLOCK_N=block_n,
        PDL=pdl, EARLY=early, num_warps=warps, num_stages=stages, launch_pdl=pdl)
    return y


def _int4_mma(x, weight, ws, group_size, bias, config=None):
    m, k = x.shape
    n = weight.shape[0]
    block_n, block_m, groups, warps, stages, *splits = config or int4_mma_config(n, k, m)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    splits = math.gcd(k // group_size, max(1, splits[0]) if splits else 1)
    if grid[0] * grid[1] > COUNTER_CAPACITY:
        splits = 1
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    runs = counters = y
    if splits > 1:
        runs = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        counters = split_counters(x.device, "int4 split-K")
    pdl = pdl_enabled(x.device)
    _int4_mma_kernel[(*grid, splits)](
        x, weight, ws, bias if bias is not None else ws, y, runs, counters, m, n, k,
        x.stride(0), y.stride(0), HALF=group_size // 2,
        GROUPS=math.gcd(k // group_size // splits, groups), SPLITS=splits,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_M=block_m, PDL=pdl,
        num_warps=warps, num_stages=stages, launch_pdl=pdl)
    return y


def _int4_triton(x, weight, ws, group_size, bias, config=None):
    m, k = x.shape
    n = weight.shape[0]
    if config is None:
        block_n, block_m, _, warps, stages = gemm_config(m, False)
        if x.dtype == torch.float32:
            block_n, block_m, warps, stages = 64, 32, 4, 2
    else:
        block_n, block_m, _, warps, stages = config
    n_groups = k // group_size
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n) * triton.cdiv(m, block_m),)
    _int4_gemm_kernel[grid](
        x, weight, ws, bias if bias is not None else ws, y, m, n, k, x.stride(0), y.stride(0),
        HALF=group_size // 2, GROUPS=math.gcd(n_groups, max(1, 128 // group_size)),
        HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_N=block_n, BLOCK_M=block_m, GROUP_N=8, num_warps=warps, num_stages=stages)
    return y


def _int8_wo_dequant(x, weight, ws, bias, config=None):
    """Prefill: the weight dequantized into x's dtype once (3 bytes of traffic per weight),
    then cuBLAS: the Triton GEMM converts each tile once per token tile instead."""
    return F.linear(x, dequantize_int8(weight, ws, x.dtype), bias)


def _int4_dequant(x, weight, ws, group_size, bias, config=None):
    return F.linear(x, dequantize_int4(weight, ws, group_size, x.dtype), bias)


def _int4_fragments(x, weight, ws, group_size, bias, config=None, epilogue=None):
    """The Gluon kernel; silu * up fused where the rows split into whole tiles, any other
    epilogue applied after (the rotary in the INT4 GEMV was slower: thirteenth pass)."""
    if isinstance(epilogue, SiluMul) and weight.shape[0] % 2 == 0:
        return _gluon().int4_fragments_linear(x, weight, ws, group_size, bias, config,
                                              silu_mul=True)
    y = _gluon().int4_fragments_linear(x, weight, ws, group_size, bias, config)
    return y if epilogue is None else epilogue.apply(y)


def _int4_fragments_dequant(x, weight, ws, group_size, bias, config=None):
    return F.linear(x, dequantize_fragments(weight, ws, group_size, x.dtype), bias)


def gluon_missing() -> str | None:
    """Why the fragment-layout INT4 kernel cannot run here (None: it can)."""
    try:
        _gluon()
    except ImportError as e:
        return (f"triton {triton.__version__} has no usable triton.experimental.gluon ({e}); "
                f"the INT4 fragment kernel was tested with Triton 3.6")
    return None


def _gluon():
    from kiln.plugins.quant_linear import gluon_kernels  # Gluon: experimental (its docstring)
    return gluon_kernels


# Smallest M where weight-only projections dequantize and call cuBLAS (benchmarks/quant_kernels.py).
DEQUANT_MIN_M = 256

PATHS = {
    "fp8_linear": {"gemv": _fp8_gemv, "triton": _fp8_triton, "scaled_mm": _fp8_scaled_mm},
    "int8_w8a8_linear": {"gemv": _int8_gemv, "triton": _int8_triton, "int_mm": _int8_int_mm},
    "int8_weight_only_linear": {"gemv": _int8_wo_gemv, "triton": _int8_wo_triton,
                                "dequant": _int8_wo_dequant},
    "int4_weight_only_linear": {"gemv": _int4_gemv, "mma": _int4_mma, "triton": _int4_triton,
                                "dequant": _int4_dequant, "fragments": _int4_fragments,
                                "fragments_dequant": _int4_fragments_dequant},
}


# --------------------------------------------------------------------------- public functions


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None, *,
               epilogue: Epilogue | None = None) -> torch.Tensor:
    if x.dtype == torch.float8_e4m3fn:  # quantized already, by the kernel before it
        y = _fp8_linear_quantized(x, weight, weight_scale, input_scale, bias, out_dtype)
        return y if epilogue is None else epilogue.apply(y)
    m, n, k = _check_x_weight("fp8_linear", x, weight, torch.float8_e4m3fn)
    ws, s, b = _scales("fp8_linear", x, n, weight_scale, True, input_scale, bias)
    return _run(x, n, fp8_path(x, n, k, ws, s), "fp8_linear", weight, ws, s, b,
                epilogue=epilogue)


def fp8_takes_quantized(m: int, n: int, k: int, weight_scale: torch.Tensor,
                        input_scale: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether fp8_linear on these ``m`` rows of ``dtype`` would quantize them in a pass of its
    own (the cuBLASLt path with a static input scale), which the kernel before it can do
    instead (the contract, triton_reference)."""
    tensorwise = weight_scale.numel() == 1
    return (input_scale is not None and m > FP8_TRITON_MAX_M and k % 16 == 0 and n % 16 == 0
            and (tensorwise or dtype == torch.bfloat16))


def _fp8_linear_quantized(q, weight, weight_scale, input_scale, bias, out_dtype):
    fn = "fp8_linear"
    if q.dim() != 2 or (q.shape[0] and q.stride(1) != 1) or out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: an FP8 x must be [M, K] with contiguous rows, and out_dtype "
                         f"float16/bfloat16/float32, found {tuple(q.shape)} and {out_dtype}")
    m, k, n = q.shape[0], q.shape[1], weight.shape[0]
    if not fp8_takes_quantized(m, n, k, weight_scale, input_scale, out_dtype):
        raise ValueError(f"{fn}: an FP8 x of {m} rows is not taken here (fp8_takes_quantized "
                         f"says where it is); pass the {out_dtype} activations")
    if weight.dtype != torch.float8_e4m3fn or weight.shape[1] != k:
        raise ValueError(f"{fn}: weight must be float8_e4m3fn [N, {k}], found "
                         f"{tuple(weight.shape)} {weight.dtype}")
    ws, s, b = _scales(fn, q, n, weight_scale, True, input_scale, bias)
    s_rows = s.expand(m).contiguous() if ws.numel() > 1 else None
    return _scaled_mm(q, None if ws.numel() > 1 else s, s_rows, weight, ws, b, out_dtype)


def fp8_path(x: torch.Tensor, n: int, k: int, ws: torch.Tensor, s: torch.Tensor | None) -> str:
    m = x.shape[0]
    if m == 1:
        return "gemv"
    if m <= FP8_TRITON_MAX_M or not _fp8_scaled_mm_ok(x, n, k, ws, s):
        return "triton"
    return "scaled_mm"


def int8_w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     input_scale: torch.Tensor | None, bias: torch.Tensor | None = None, *,
                     epilogue: Epilogue | None = None) -> torch.Tensor:
    m, n, k = _check_x_weight("int8_w8a8_linear", x, weight, torch.int8)
    ws, s, b = _scales("int8_w8a8_linear", x, n, weight_scale, False, input_scale, bias)
    return _run(x, n, int8_w8a8_path(m, n, k, _words_ok(weight)), "int8_w8a8_linear", weight,
                ws, s, b, epilogue=epilogue)


def int8_w8a8_path(m: int, n: int, k: int, words_ok: bool = True) -> str:
    # the GEMV's float32 partial sums (K / BLOCK_K * 16 integer products < 2^14 each) stay
    # exact while K < 64 * BLOCK_K
    if m == 1 and words_ok and k < 64 * w8_gemv_config(n, k)[1]:
        return "gemv"
    return "int_mm" if m > INT8_TRITON_MAX_M and _int_mm_ok(m, n, k) else "triton"


def int8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, *,
                            epilogue: Epilogue | None = None) -> torch.Tensor:
    m, n, k = _check_x_weight("int8_weight_only_linear", x, weight, torch.int8)
    ws, _, b = _scales("int8_weight_only_linear", x, n, weight_scale, False, None, bias)
    return _run(x, n, weight_only_path(m, _words_ok(weight)), "int8_weight_only_linear", weight,
                ws, b, epilogue=epilogue)


def weight_only_path(m: int, words_ok: bool = True) -> str:
    """``words_ok``: the GEMV can read the weight as int32 words (always for INT4)."""
    return "gemv" if m == 1 and words_ok else "triton" if m < DEQUANT_MIN_M else "dequant"


def int4_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            group_size: int, bias: torch.Tensor | None = None, *,
                            epilogue: Epilogue | None = None) -> torch.Tensor:
    fn = "int4_weight_only_linear"
    if weight.dtype == torch.int32:
        m, n, k = _check_x_fragments(fn, x, weight, group_size)
    else:
        m, n, k = _check_x_weight(fn, x, weight, torch.uint8, k_per_col=2)
        check_group_size(group_size, k)
    if tuple(weight_scale.shape) != (n, k // group_size):
        raise ValueError(f"{fn}: weight_scale must be [{n}, {k // group_size}] (one scale per "
                         f"group of {group_size}), found {tuple(weight_scale.shape)}")
    ws = weight_scale.float().contiguous()
    b = _vector(fn, "bias", bias, (n,))
    path = (fragments_path(x) if weight.dtype == torch.int32
            else int4_path(m, x.dtype, group_size, n, k))
    return _run(x, n, path, fn, weight, ws, group_size, b, epilogue=epilogue)


def fragments_path(x: torch.Tensor) -> str:
    """INT4 weights in the fragment layout: the Gluon kernel for up to 64 16-bit tokens whose
    rows are 16-byte aligned (its loads), dequantized once + cuBLAS otherwise. Llama-3.1-8B's
    four projections, us, against the split-group layout (H200, issue12_twenty_seventh_session;
    H100 with up to eight token tiles a program, issue12_twenty_eighth_session): 1 token 46.0
    vs 59.6 (H100 50.1 vs 66.5), 16 tokens 67.7 vs 76.8, 32 129 vs 193, 64 271 vs 220 (H100);
    dequantized at 128 tokens 394 vs 456 (H100), where the Gluon kernel took 477."""
    m = x.shape[0]
    if (x.dtype != torch.float32 and m <= FRAGMENTS_MAX_M and x.stride(0) % 8 == 0
            and x.data_ptr() % 16 == 0):
        return "fragments"
    return "fragments_dequant"


# Largest M on the Gluon kernel (beyond, dequantize + cuBLAS; fragments_path)
FRAGMENTS_MAX_M = 64


def int4_path(m: int, dtype: torch.dtype, group_size: int, n: int = 0, k: int = 0) -> str:
    """Tensor cores for a few tokens in 16 bits (1.5-2x the tiled GEMM at M = 16 on an H200),
    and at one token for the MLP's shapes, N >= 4K (gate_up) and K >= 3N (down, split over K):
    30.8 and 16.1 us on an H200 against the GEMV's 33.2 and 19.7 (group 128; the GEMV stays for
    the other shapes at one token: benchmarks/GPU_NOTES.md). The dots take K >= 16, and a
    group's words make K = group_size / 4; float32 keeps the exact float32 GEMM."""
    if dtype == torch.float32 or group_size < 64:
        return weight_only_path(m)
    if 1 < m <= INT4_MMA_MAX_M or (m == 1 and group_size == 128 and (n >= 4 * k or k >= 3 * n)):
        return "mma"
    return weight_only_path(m)


# the paths that fuse an epilogue into their kernel (where it fits: triton_epilogue, or silu *
# up in the INT4 Gluon kernel); not the INT4 GEMV, measured slower with the rotary (GPU_NOTES.md,
# "Issue 12, thirteenth pass")
_FUSING_PATHS = (_fp8_gemv, _int8_gemv, _int8_wo_gemv, _int4_fragments)


def _run(x: torch.Tensor, n: int, path: str, fn: str, *args,
         epilogue: Epilogue | None = None) -> torch.Tensor:
    run = PATHS[fn][path]
    if x.shape[0] == 0:
        y = x.new_empty((0, n))
    elif epilogue is not None and run in _FUSING_PATHS:
        return run(x, *args, epilogue=epilogue)
    else:
        y = run(x, *args)
    return y if epilogue is None else epilogue.apply(y)
