"""Fixtures shared across test packages: a tiny Hugging Face model and an empty build cache."""

from __future__ import annotations

import gc

import pytest

from tests.models import hf_model_with_tokenizer


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """llama-gqa (2 layers, vocab 128) with a tokenizer beside it; read-only by tests (copy it
    to change it: ``hf_copy`` in tests/build_cache)."""
    return hf_model_with_tokenizer("llama-gqa", tmp_path_factory.mktemp("hf") / "llama-gqa")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty build cache, the default one of this test ($KILN_CACHE_DIR); its directory is
    not made (tests check that refusals leave none)."""
    from kiln.build_cache.store import EngineCache

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))
    return EngineCache()


@pytest.fixture(autouse=True)
def _checks_warn_afresh(monkeypatch):
    """The engine checks say each warning once a process (kiln.runtime.loader.warn_once): each
    test is a fresh process for them, whatever ran before it in this worker."""
    monkeypatch.setattr("kiln.runtime.loader._WARNED", set())


@pytest.fixture(autouse=True)
def _unfreeze_gc():
    """kiln bench and kiln serve freeze the objects alive once their engine is loaded
    (kiln.runtime.core.freeze_loaded_objects); run in this process, that would keep earlier
    tests' garbage out of the collector's reach: give it back after each test."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
