"""Triton greedy pass of the sampler: finite flags and argmax of every logits row.

Same contract as :mod:`kiln.plugins.greedy.triton_reference` (float16, bfloat16 and float32
logits). The reference's torch ops run nine kernels per step (the isfinite test is four
elementwise passes, then two reductions, two casts and a concatenation); with the sampler's
float32 copy of the logits and the copy to the host, an H200 spent ~70 us between two batch-1
decode steps on one 128,256-wide row, ~40 of them in the two single-block reductions
(benchmarks/GPU_NOTES.md, "Issue 12, tenth pass"). Every program below keeps, per lane, the
running maximum and the index where it was first seen (indices grow along a lane, so a strict
``>`` keeps the first; NaN never wins) and whether every value was finite; the lanes then
reduce to the largest value and the smallest index holding it, which is torch.argmax's first
maximal index.

Two forms, by the number of rows (:func:`default_slices`; measured on an H200, float32 rows of
128,256):

- Whole rows (``_whole_rows_kernel``, one program per row, 8,192-value steps of 8 warps): for
  64 rows and more, where the rows alone fill the GPU. 512 rows: 71 us, 1,024: 138 us (the
  torch ops: 452 and 869).
- Sliced rows, under 64 rows: one program streaming a row is one SM reading 512 KB (26 us for
  one row), so ``_slices_kernel`` reduces each of ``slices`` pieces of every row (2,048-value
  steps of 4 warps; programs for 8 x the SMs) and ``_rows_kernel`` reduces each row's pieces
  in order. One row in 63 slices: 5.8 us (the torch ops: 57).

No kernel specializes on the row or slice count (one compiled variant each serves every batch
width; the torch executor compiles them while it loads). The vocabulary, the row stride and
the slice length (always a multiple of the 2,048-value step) are specialized: Triton then
knows every step's start and the row's end to be multiples of 16 and loads 16 bytes at a time
(``ld.global.v4``; with the slice length unspecialized the sliced kernel's loads were scalar).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

WHOLE = (8192, 8)  # (values per loop step, warps) of the whole-row kernel
SLICED = (2048, 4)  # the same for a slice
MAX_SLICES = 256  # the row kernel's tile
WHOLE_FROM_ROWS = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _scan(x_row, lo, hi, vocab, BLOCK: tl.constexpr, MASK_HI: tl.constexpr):
    """(maximum, first index of it or ``vocab``, any non-finite) of ``x_row[lo:hi]``."""
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    where = tl.full([BLOCK], lo, tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        cols = start + lanes
        ok = cols < hi if MASK_HI else cols < vocab
        x = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        finite = (x == x) & (tl.abs(x) != float("inf"))  # NaN fails x == x
        bad = tl.where(ok & ~finite, 1, bad)
        take = x > best  # never for NaN: the lane keeps a valid index
        best = tl.where(take, x, best)
        where = tl.where(take, cols, where)
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, where, vocab), 0), tl.max(bad, 0)


@triton.jit
def _store(packed_ptr, ids_ptr, rows, row, first, bad, vocab):
    first = tl.where(first < vocab, first, 0)  # a row of NaNs: any valid index
    tl.store(packed_ptr + row, (bad == 0).to(tl.float64))
    tl.store(packed_ptr + rows + row, first.to(tl.float64))
    tl.store(ids_ptr + row, first.to(tl.int64))


@triton.jit(do_not_specialize=["rows"])
def _whole_rows_kernel(x_ptr, stride, vocab, packed_ptr, ids_ptr, rows, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride
    _, first, bad = _scan(x_row, 0, vocab, vocab, BLOCK=BLOCK, MASK_HI=False)
    _store(packed_ptr, ids_ptr, rows, row, first, bad, vocab)


@triton.jit(do_not_specialize=["rows", "slices"])
def _slices_kernel(x_ptr, stride, vocab, part_ptr, rows, slices, slice_len,
                   BLOCK: tl.constexpr):
    row, piece = tl.program_id(0), tl.program_id(1)
    x_row = x_ptr + row.to(tl.int64) * stride
    lo = piece * slice_len
    top, first, bad = _scan(x_row, lo, tl.minimum(lo + slice_len, vocab), vocab, BLOCK=BLOCK,
                            MASK_HI=True)
    at = row * slices + piece
    parts = rows * slices  # part_ptr: [3, rows, slices] (maximum bits, index, non-finite)
    tl.store(part_ptr + at, top.to(tl.int32, bitcast=True))
    tl.store(part_ptr + parts + at, first)
    tl.store(part_ptr + 2 * parts + at, bad)


@triton.jit(do_not_specialize=["rows", "slices"])
def _rows_kernel(part_ptr, vocab, packed_ptr, ids_ptr, rows, slices,
                 MAX_SLICES: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, MAX_SLICES)
    ok = s < slices
    at = row * slices + s
    parts = rows * slices
    best = tl.load(part_ptr + at, mask=ok, other=0).to(tl.float32, bitcast=True)
    best = tl.where(ok, best, float("-inf"))
    where = tl.load(part_ptr + parts + at, mask=ok, other=0)
    bad = tl.load(part_ptr + 2 * parts + at, mask=ok, other=0)
    top = tl.max(best, 0)
    first = tl.min(tl.where(ok & (best == top), where, vocab), 0)
    _store(packed_ptr, ids_ptr, rows, row, first, tl.max(bad, 0), vocab)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_slices(rows: int, vocab: int, sms: int) -> int:
    """Slices per row (module docstring): 1 (whole rows) from 64 rows, else programs for
    8 x the SMs, each at least one 2,048-value step."""
    if rows >= WHOLE_FROM_ROWS:
        return 1
    return max(1, min(triton.cdiv(8 * sms, max(rows, 1)), triton.cdiv(vocab, SLICED[0]),
                      MAX_SLICES))


def finite_argmax(logits: torch.Tensor, *, slices: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``slices``: per row (1: the whole-row kernel), default :func:`default_slices` for the
    logits' GPU."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"finite_argmax: need logits [B, V] with unit stride along V; found "
                         f"shape {tuple(logits.shape)}, strides {logits.stride()}")
    if logits.dtype not in DTYPES:
        raise ValueError(f"finite_argmax: logits must be float16, bfloat16 or float32; found "
                         f"{logits.dtype} (the reference takes any float dtype)")
    rows, vocab = logits.shape
    device = logits.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _finite_argmax(logits, rows, vocab, device, slices)


def _finite_argmax(logits: torch.Tensor, rows: int, vocab: int, device: torch.device,
                   slices: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    packed = torch.empty(2 * rows, dtype=torch.float64, device=device)
    ids = torch.empty(rows, dtype=torch.int64, device=device)
    if rows == 0:
        return packed, ids
    if slices is None:  # (Triton's CPU interpreter: as for an H100/H200's 132 SMs)
        sms = _sm_count(device.index if device.index is not None else
                        torch.cuda.current_device()) if device.type == "cuda" else 132
        slices = default_slices(rows, vocab, sms)
    if not 1 <= slices <= MAX_SLICES:
        raise ValueError(f"finite_argmax: slices must be 1..{MAX_SLICES}, found {slices}")
    block, warps = SLICED
    slice_len = triton.cdiv(triton.cdiv(max(vocab, 1), slices), block) * block
    slices = max(1, triton.cdiv(vocab, slice_len))  # none empty
    if slices == 1:
        block, warps = WHOLE
        _whole_rows_kernel[(rows,)](logits, logits.stride(0), vocab, packed, ids, rows,
                                    BLOCK=block, num_warps=warps)
        return packed, ids
    part = torch.empty(3 * rows * slices, dtype=torch.int32, device=device)
    _slices_kernel[(rows, slices)](logits, logits.stride(0), vocab, part, rows, slices,
                                   slice_len, BLOCK=block, num_warps=warps)
    _rows_kernel[(rows,)](part, vocab, packed, ids, rows, slices, MAX_SLICES=MAX_SLICES,
                          num_warps=4)
    return packed, ids
