"""Fixtures of the build cache tests: a tiny HF model, an empty cache, a record of builds."""

from __future__ import annotations

import errno
import shutil

import pytest

from kiln.build_cache import api, store


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    """A private copy of the tiny model that a test may change."""
    return shutil.copytree(tiny_hf, tmp_path / "model")


@pytest.fixture
def cache_dir(tmp_path):
    """An empty cache root, also as $KILN_CACHE_DIR (no test touches the user's cache). Set
    through its own MonkeyPatch, so a test's ``monkeypatch.undo()`` keeps it."""
    root = tmp_path / "kiln-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_CACHE_DIR", str(root))
        yield root


@pytest.fixture
def builds(monkeypatch):
    """The labels of the sources converted and built in this test, in order (what ran)."""
    done: list[str] = []
    real = api._convert_and_build

    def recording(tmp, request, *args, **kwargs):
        done.append(request.source.label)
        return real(tmp, request, *args, **kwargs)

    monkeypatch.setattr(api, "_convert_and_build", recording)
    return done


@pytest.fixture
def read_only_locks(monkeypatch):
    """Lock files that cannot be opened for writing, as on a read-only file system."""

    class ReadOnly:
        def __init__(self, path, **_):  # filelock opens the file here
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(store, "ReadWriteLock", ReadOnly)
    monkeypatch.setattr(store, "_warned_unlocked", False)
