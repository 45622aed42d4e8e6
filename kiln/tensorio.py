"""Bounded-memory safetensors I/O: read single tensors (or row ranges), stream tensors out.

The safetensors library's ``save_file`` needs every tensor in memory at once, and reading
through its memory map grows resident memory by every page touched. Conversion must stay
under a fixed memory budget whatever the model size, so this module reads with ``pread``
into fresh buffers and writes a file whose header is known up front, tensor by tensor.

Format (https://github.com/huggingface/safetensors#format): 8-byte little-endian header
length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
{str: str}}`` padded with spaces to a multiple of 8, then the data, offsets relative to it.
Files written here load with the safetensors library (tested).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import UNREADABLE_JSON, CheckpointError

DTYPE_NAMES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAME_OF_DTYPE = {v: k for k, v in DTYPE_NAMES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


# how to replace a damaged file kiln did not write (read_header's default remedy)
REDOWNLOAD = "re-download or re-export it"


def read_header(path: Path, remedy: str = REDOWNLOAD,
                ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: (tensors by name, metadata). ``remedy`` ends
    the message of a damaged file: how to get a good one (kiln's own files say which command
    writes them again)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _corrupt(path, remedy, f"file is {size} bytes, shorter than a header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise _corrupt(path, remedy, f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except UNREADABLE_JSON as e:
            raise _corrupt(path, remedy, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, remedy, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    tensors = {name: _tensor_info(path, name, entry, start, size, remedy)
               for name, entry in header.items()}
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: dict, start: int, size: int,
                 remedy: str) -> TensorInfo:
    try:
        dtype = DTYPE_NAMES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(path, remedy, f"tensor {name!r} has a malformed entry ({e!r})") from None
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * dtype.itemsize or begin < 0:
        raise _corrupt(path, remedy, f"tensor {name!r} spans {end - begin} bytes, its shape "
                                     f"{list(shape)} and dtype need {numel * dtype.itemsize}")
    if start + end > size:
        raise _corrupt(path, remedy, f"tensor {name!r} ends at byte {start + end}, past the end "
                                     f"of the {size}-byte file (truncated?)")
    return TensorInfo(path, dtype, shape, start + begin, start + end)


def _corrupt(path: Path, remedy: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file: {why}; {remedy}")


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a tensor (or rows ``[start, stop)`` of its first dim) into fresh memory."""
    shape = list(info.shape)
    begin, nbytes = info.begin, info.nbytes
    if rows is not None:
        row_bytes = nbytes // shape[0] if shape[0] else 0
        begin += rows[0] * row_bytes
        shape[0] = rows[1] - rows[0]
        nbytes = shape[0] * row_bytes
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    fd = os.open(info.path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], begin + done)
            if got == 0:
                raise _corrupt(info.path, REDOWNLOAD, "unexpected end of file")
            done += got
    finally:
        os.close(fd)
    return buf.view(info.dtype).reshape(shape)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or +-inf in a (cast) chunk.

    A sum is the cheapest pass (about half a min/max): any NaN or inf makes it NaN or inf. A
    sum of finite values can overflow too (float16: past 65504), so a non-finite sum is
    confirmed by min/max, which NaN and inf reach exactly.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype is torch.float8_e4m3fn:  # no sum on the CPU; no inf, and NaN is S.1111.111
        return not bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    if torch.isfinite(t.sum()):
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def first_non_finite(t: torch.Tensor) -> int | None:
    """Index along dim 0 of the first row holding a NaN or +-inf (None if all are finite)."""
    if not t.is_floating_point():
        return None
    if t.dtype.itemsize == 1:  # float8: no isfinite kernel on the CPU; widening is exact
        t = t.float()
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1))
    rows = (bad.any(dim=1) if bad.dim() > 1 else bad).nonzero()
    return int(rows[0]) if len(rows) else None


class StreamingWriter:
    """Write a safetensors file whose tensor names, dtypes and shapes are known up front.

    Tensors are written in any order (each to its own offset), and large ones in row chunks
    (:meth:`write_rows`). :meth:`close` checks every byte was written.
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self._layout: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, dtype, shape in entries:
            numel = 1
            for d in shape:
                numel *= int(d)
            nbytes = numel * dtype.itemsize
            header[name] = {"dtype": NAME_OF_DTYPE[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (offset, nbytes, tuple(int(d) for d in shape), dtype)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self._remaining = {name: nbytes for name, (_, nbytes, _, _) in self._layout.items()}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite(struct.pack("<Q", len(blob)) + blob, 0)
        os.ftruncate(self._fd, self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_rows(name, tensor, 0)

    def write_rows(self, name: str, tensor: torch.Tensor, row_start: int) -> None:
        """Write ``tensor`` as rows ``[row_start, row_start + len(tensor))`` of ``name``."""
        offset, nbytes, shape, dtype = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:] and tensor.dim() > 0:
            raise ValueError(f"{name}: expected {dtype} rows of {shape[1:]}, got "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
        # (a GPU's tensor comes to the host here: kiln quantize --device cuda's lm_head had
        # been a TypeError)
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._pwrite(memoryview(data), self._data_start + offset + row_start * row_bytes)
        self._remaining[name] -= data.nbytes

    def _pwrite(self, data: bytes | memoryview, pos: int) -> None:
        view = memoryview(data)
        while view.nbytes:
            done = os.pwrite(self._fd, view, pos)
            view, pos = view[done:], pos + done

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        unwritten = sorted(n for n, left in self._remaining.items() if left != 0)
        if unwritten:
            raise RuntimeError(f"{self.path}: tensors not fully written: {unwritten}")


def write_tensors(path: Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """Write a whole dict of tensors (small files: tests, fixtures)."""
    writer = StreamingWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], metadata)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()


def iter_row_chunks(rows: int, row_bytes: int, budget: int = 64 << 20) -> Iterable[tuple[int, int]]:
    """Split ``rows`` into ``[start, stop)`` chunks of at most ``budget`` bytes (>= 1 row)."""
    step = max(1, budget // max(1, row_bytes))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)
