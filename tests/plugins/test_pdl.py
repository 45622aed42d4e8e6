"""When kiln's decode kernels launch with programmatic dependent launch (kiln/plugins/pdl: the
policy, which needs no Triton, so these run in `make test`)."""

from __future__ import annotations

import logging

import pytest
import torch

from kiln.plugins import pdl


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA device of a chosen compute capability (nothing runs on it)."""
    pdl._supported.cache_clear()
    pdl._setting.cache_clear()
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Fake GPU")
    yield capability
    pdl._supported.cache_clear()
    pdl._setting.cache_clear()


@pytest.mark.parametrize("setting,capability,want", [
    (None, (9, 0), True), ("1", (9, 0), True), ("0", (9, 0), False), (None, (10, 0), True),
    ("0", (10, 0), False), ("1", (8, 9), False), (None, (8, 9), False), (None, (8, 0), False),
    ("yes", (9, 0), True), ("yes", (8, 0), False)])
def test_on_by_default_from_sm90(gpu, monkeypatch, setting, capability, want):
    gpu["value"] = capability
    if setting is None:
        monkeypatch.delenv(pdl.ENV, raising=False)
    else:
        monkeypatch.setenv(pdl.ENV, setting)
    assert pdl.enabled(torch.device("cuda", 0)) is want


def test_never_on_a_cpu(gpu, monkeypatch):
    monkeypatch.setenv(pdl.ENV, "1")
    assert pdl.enabled(torch.device("cpu")) is False


def test_asking_for_it_below_sm90_is_said_once(gpu, monkeypatch, caplog):
    gpu["value"] = (8, 0)
    monkeypatch.setenv(pdl.ENV, "1")
    with caplog.at_level(logging.WARNING, logger=pdl.__name__):
        assert not pdl.enabled(torch.device("cuda", 0))
        assert not pdl.enabled(torch.device("cuda", 0))
    assert [r.getMessage() for r in caplog.records] == [
        "KILN_PDL=1 ignored on Fake GPU: programmatic dependent launch needs compute capability "
        "9.0 or newer"]


def test_the_default_below_sm90_says_nothing(gpu, monkeypatch, caplog):
    gpu["value"] = (8, 0)
    monkeypatch.delenv(pdl.ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger=pdl.__name__):
        assert not pdl.enabled(torch.device("cuda", 0))
    assert caplog.records == []


def test_a_value_other_than_0_or_1_is_said_once(gpu, monkeypatch, caplog):
    monkeypatch.setenv(pdl.ENV, "yes")
    with caplog.at_level(logging.WARNING, logger=pdl.__name__):
        assert pdl.enabled(torch.device("cuda", 0))
        assert pdl.enabled(torch.device("cuda", 0))
    assert [r.getMessage() for r in caplog.records] == [
        "KILN_PDL='yes' ignored: it takes 0 (off) or 1 (on); PDL stays at its default (on for "
        "compute capability 9.0 and newer)"]
