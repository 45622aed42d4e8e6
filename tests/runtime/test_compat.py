"""kiln.runtime.compat: what the machine description imports, and Ctrl-C during those imports."""

from __future__ import annotations

import importlib

import pytest

from kiln.runtime import compat


def test_a_torch_engine_imports_no_other_runtime(monkeypatch):
    """Loading a torch engine probes no library (tensorrt_rtx's import takes seconds and once
    swallowed a Ctrl-C); onnx probes onnxruntime only."""
    probed = []
    monkeypatch.setattr(compat, "library_version", lambda m: probed.append(m))
    compat.describe_machine("torch")
    assert probed == []
    compat.describe_machine("onnx")
    assert probed == ["onnxruntime"]


def test_ctrl_c_turned_into_an_import_error_is_still_ctrl_c(monkeypatch):
    def import_module(name):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("initialization failed") from None  # as tensorrt_rtx does

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(KeyboardInterrupt):
        compat.library_version("tensorrt_rtx")


def test_a_broken_install_counts_as_absent(monkeypatch, caplog):
    def import_module(name):
        raise OSError("libnvinfer.so: cannot open shared object file")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib, "import_module", import_module)
    assert compat.library_version("tensorrt_rtx") is None
    assert "tensorrt_rtx is installed but fails to import" in caplog.text
