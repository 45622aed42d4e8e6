"""Triton greedy pass of the sampler: finite flags and argmax of every logits row in two kernels.

Same contract as :mod:`kiln.plugins.greedy.triton_reference`. The reference's torch ops are
eleven kernels per step (the isfinite test is four elementwise passes, then two reductions, two
casts and a concatenation); on an H200 with one 128,256-wide row they took ~70 us between two
batch-1 decode steps, ~40 of them in the two single-block reductions (benchmarks/GPU_NOTES.md,
"Issue 12, tenth pass"). A first version here, one program per row, took 26 us on that row:
one SM streaming 512 KB. So each row is split in ``S`` slices, enough that the step's
programs cover the GPU's SMs twice (one slice per row from 2 x SMs rows on):

- ``_slices_kernel``, one program per (row, slice): the slice's maximum, the index where it is
  first seen and whether every value is finite. Per lane it keeps the running maximum and its
  index (indices grow along a lane, so a strict ``>`` keeps the first; NaN never wins), then
  the lanes reduce to the largest value and the smallest index holding it.
- ``_rows_kernel``, one program per row: the same reduction over the row's slices, in order,
  which gives torch.argmax's first maximal index; the flag and index go to the outputs.

Neither kernel specializes on the row count or the slice count (one compiled variant each
serves every batch width: the torch executor compiles them while it loads); the vocabulary and
the row stride are specialized, as they are fixed per engine and let the loads vectorize.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 2048  # values per loop step of a slice (4 warps: 16 float32 per thread)
MAX_SLICES = 256  # the row kernel's tile


@triton.jit(do_not_specialize=["rows", "slices", "slice_len"])
def _slices_kernel(x_ptr, stride, vocab, part_ptr, rows, slices, slice_len,
                   BLOCK: tl.constexpr):
    row, piece = tl.program_id(0), tl.program_id(1)
    x_row = x_ptr + row.to(tl.int64) * stride
    lo = piece * slice_len
    hi = tl.minimum(lo + slice_len, vocab)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    where = tl.full([BLOCK], lo, tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        cols = start + lanes
        ok = cols < hi
        x = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        finite = (x == x) & (tl.abs(x) != float("inf"))  # NaN fails x == x
        bad = tl.where(ok & ~finite, 1, bad)
        take = x > best  # never for NaN: the lane keeps a valid index
        best = tl.where(take, x, best)
        where = tl.where(take, cols, where)
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, where, vocab), 0)
    at = row * slices + piece
    parts = rows * slices  # part_ptr: [3, rows, slices] (maximum bits, index, non-finite)
    tl.store(part_ptr + at, top.to(tl.int32, bitcast=True))
    tl.store(part_ptr + parts + at, first)
    tl.store(part_ptr + 2 * parts + at, tl.max(bad, 0))


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
    first = tl.where(first < vocab, first, 0)  # a row of NaNs: any valid index
    tl.store(packed_ptr + row, (tl.max(bad, 0) == 0).to(tl.float64))
    tl.store(packed_ptr + rows + row, first.to(tl.float64))
    tl.store(ids_ptr + row, first.to(tl.int64))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def slice_count(rows: int, vocab: int, sms: int) -> int:
    """Slices per row: programs for twice the SMs, each at least one ``BLOCK``."""
    return max(1, min(triton.cdiv(2 * sms, max(rows, 1)), triton.cdiv(vocab, BLOCK),
                      MAX_SLICES))


def finite_argmax(logits: torch.Tensor, *, slices: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``slices``: per row, default :func:`slice_count` for the logits' GPU."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"finite_argmax: need logits [B, V] with unit stride along V; found "
                         f"shape {tuple(logits.shape)}, strides {logits.stride()}")
    rows, vocab = logits.shape
    device = logits.device
    packed = torch.empty(2 * rows, dtype=torch.float64, device=device)
    ids = torch.empty(rows, dtype=torch.int64, device=device)
    if rows == 0:
        return packed, ids
    if slices is None:  # (Triton's CPU interpreter: as for an H100/H200's 132 SMs)
        sms = _sm_count(device.index if device.index is not None else
                        torch.cuda.current_device()) if device.type == "cuda" else 132
        slices = slice_count(rows, vocab, sms)
    if not 1 <= slices <= MAX_SLICES:
        raise ValueError(f"finite_argmax: slices must be 1..{MAX_SLICES}, found {slices}")
    slice_len = triton.cdiv(triton.cdiv(max(vocab, 1), slices), BLOCK) * BLOCK
    slices = max(1, triton.cdiv(vocab, slice_len))  # none empty
    part = torch.empty(3 * rows * slices, dtype=torch.int32, device=device)
    _slices_kernel[(rows, slices)](logits, logits.stride(0), vocab, part, rows, slices,
                                   slice_len, BLOCK=BLOCK, num_warps=4)
    _rows_kernel[(rows,)](part, vocab, packed, ids, rows, slices, MAX_SLICES=MAX_SLICES,
                          num_warps=4)
    return packed, ids
