"""Streaming safetensors I/O: readable by the safetensors library, pinned bytes, corrupt input."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.errors import CheckpointError
from kiln.tensorio import (
    StreamingWriter,
    all_finite,
    first_non_finite,
    read_header,
    read_tensor,
    write_tensors,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
            "a.bias": torch.randn(7, generator=g),
            "ids": torch.arange(4, dtype=torch.int64)}


def test_written_file_loads_with_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    write_tensors(path, _tensors(), {"rank": "0"})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"rank": "0"}
        for name, want in _tensors().items():
            assert torch.equal(f.get_tensor(name), want)


def test_golden_bytes(tmp_path):
    """Pins the on-disk layout: header order = declaration order, compact JSON, 8-byte padding."""
    path = tmp_path / "x.safetensors"
    write_tensors(path, _tensors(), {"rank": "0"})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    assert data[8:8 + n].rstrip(b" ") == (
        b'{"__metadata__":{"rank":"0"},"b.weight":{"dtype":"BF16","shape":[5,3],'
        b'"data_offsets":[0,30]},"a.bias":{"dtype":"F32","shape":[7],"data_offsets":[30,58]},'
        b'"ids":{"dtype":"I64","shape":[4],"data_offsets":[58,90]}}')
    assert hashlib.sha256(data[8 + n:]).hexdigest() == hashlib.sha256(
        b"".join(t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in _tensors().values())
    ).hexdigest()


def test_reads_library_files_and_row_ranges(tmp_path):
    path = tmp_path / "lib.safetensors"
    save_file(_tensors(), path)
    infos, _ = read_header(path)
    assert torch.equal(read_tensor(infos["b.weight"]), _tensors()["b.weight"])
    assert torch.equal(read_tensor(infos["b.weight"], rows=(1, 4)), _tensors()["b.weight"][1:4])


def test_row_chunks_and_unwritten_detection(tmp_path):
    full = torch.randn(6, 2)
    writer = StreamingWriter(tmp_path / "x.safetensors", [("w", torch.float32, (6, 2))])
    writer.write_rows("w", full[3:], 3)
    writer.write_rows("w", full[:3], 0)
    writer.close()
    infos, _ = read_header(tmp_path / "x.safetensors")
    assert torch.equal(read_tensor(infos["w"]), full)
    partial = StreamingWriter(tmp_path / "y.safetensors", [("w", torch.float32, (6, 2))])
    partial.write_rows("w", full[:3], 0)
    with pytest.raises(RuntimeError, match="not fully written"):
        partial.close()


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:5], "shorter than a header"),
    (lambda b: struct.pack("<Q", 1 << 40) + b[8:], "header length"),
    (lambda b: b[:8] + b"{" * 8 + b[16:], "not valid JSON"),
])
def test_corrupt_files_are_reported(tmp_path, damage, message):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


@pytest.mark.parametrize("values, finite", [
    ([1.0, -2.0, 3.0], True),
    ([60000.0, 60000.0], True),  # the float16 sum overflows, the values do not
    ([float("inf"), float("-inf")], False),  # the sum is NaN
    ([1.0, float("nan")], False),
    ([float("-inf")], False),
])
def testall_finite(values, finite):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert all_finite(torch.tensor(values, dtype=dtype)) is finite, dtype
    assert all_finite(torch.tensor([5, 7], dtype=torch.int64))  # integers are not checked
    nan8 = torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn)
    assert all_finite(nan8)
    nan8.view(torch.uint8)[1] = 0x7F  # e4m3fn's NaN (it has no inf)
    assert not all_finite(nan8) and first_non_finite(nan8) == 1
