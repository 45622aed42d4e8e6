"""content_hashes: sha256 of source files, memoized by (path, device, inode, size, mtime, ctime)."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from kiln.build_cache import hashes
from kiln.build_cache.hashes import MEMO_NAME, content_hashes


@pytest.fixture
def counted(monkeypatch):
    """The paths sha256_file read, in order."""
    read: list[str] = []
    real = hashes.sha256_file

    def counting(path, on_block=None):
        read.append(os.path.basename(path))
        return real(path, on_block)

    monkeypatch.setattr(hashes, "sha256_file", counting)
    return read


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name, data in (("a.safetensors", b"a" * 1000), ("config.json", b"{}")):
        (model / name).write_bytes(data)
    return [model / "a.safetensors", model / "config.json"]


def test_a_second_call_reads_no_file(files, tmp_path, counted):
    first = content_hashes(files, tmp_path)
    assert first == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert content_hashes(files, tmp_path) == first
    assert counted == ["a.safetensors", "config.json"]


def test_a_rewrite_with_the_same_size_and_mtime_is_hashed_again(files, tmp_path, counted):
    """mtime can be set back (rsync -t, touch -d); ctime cannot: the memo checks both."""
    content_hashes(files, tmp_path)
    path = files[0]
    st = path.stat()
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    assert content_hashes(files, tmp_path)[path] == hashlib.sha256(b"b" * 1000).hexdigest()
    assert counted == ["a.safetensors", "config.json", "a.safetensors"]


def test_a_replaced_file_is_hashed_again(files, tmp_path, counted):
    content_hashes(files, tmp_path)
    new = files[1].with_name("new")
    new.write_bytes(b"{}")
    os.replace(new, files[1])  # same bytes, another inode
    content_hashes(files, tmp_path)
    assert counted[-1] == "config.json" and len(counted) == 3


def test_a_file_changing_while_hashed_is_not_memoized(files, tmp_path, monkeypatch):
    real = hashes.sha256_file

    def racing(path, on_block=None):
        digest = real(path, on_block)
        with open(path, "ab") as f:
            f.write(b"+")
        return digest

    monkeypatch.setattr(hashes, "sha256_file", racing)
    content_hashes(files, tmp_path)
    monkeypatch.setattr(hashes, "sha256_file", real)
    assert content_hashes(files, tmp_path) == {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_damaged_memo_is_rebuilt(files, tmp_path, counted):
    (tmp_path / MEMO_NAME).write_text("{not json")
    assert len(content_hashes(files, tmp_path)) == 2
    assert len(content_hashes(files, tmp_path)) == 2
    assert len(counted) == 2


def test_an_interrupt_stops_the_hashing_threads(files, tmp_path, monkeypatch):
    """Ctrl-C in the caller: the threads stop at their next block, nothing is memoized."""
    started = threading.Event()

    def slow(path, on_block=None):
        started.set()
        while True:
            on_block(1)  # raises once the pool is told to stop

    def map_then_interrupt(pool, fn, items):  # the pool's threads run; Ctrl-C arrives
        for item in items:
            pool.submit(fn, item)
        started.wait(5)
        raise KeyboardInterrupt

    monkeypatch.setattr(hashes, "sha256_file", slow)
    monkeypatch.setattr(hashes.ThreadPoolExecutor, "map", map_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        content_hashes(files, tmp_path)
    assert not (tmp_path / MEMO_NAME).exists()
