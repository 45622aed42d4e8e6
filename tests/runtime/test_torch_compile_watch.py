"""kiln.runtime.torch_backend.compile_watch: Triton compiles after a load are recorded and said.

Triton is driven by hand here (no GPU): the test calls the post-compile hook the way Triton's
JIT does after a compile (keyword arguments, ``repr`` naming the kernel variant). Marked ``gpu``
although it needs no GPU: it needs Triton, which only the GPU machine's Python has (in the CPU
suite it would skip, and unmarked it was deselected from the GPU one, so it ran nowhere).
"""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")

from kiln.runtime.torch_backend import compile_watch  # noqa: E402


@pytest.fixture
def watch(monkeypatch):
    from triton import knobs

    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook",
                        lambda **kwargs: seen.append(kwargs["repr"]))
    monkeypatch.setattr(compile_watch, "_state",
                        {"installed": False, "armed": False, "loading": 0})
    monkeypatch.setattr(compile_watch, "_late", [])
    return seen


def _compile(name: str) -> None:
    from triton import knobs

    knobs.runtime.jit_post_compile_hook(key=None, repr=name, fn=None, compile={},
                                        is_manual_warmup=False, already_compiled=False)


def test_compiles_during_a_load_are_expected_and_later_ones_are_said(watch, caplog):
    with caplog.at_level(logging.WARNING, logger=compile_watch.__name__):
        _compile("before any engine")  # nothing loaded yet: not late
        with compile_watch.loading():
            _compile("warm-up variant")
        assert compile_watch.late_compiles() == [] and caplog.records == []
        _compile("_prefill_kernel(n: i32 D)")
        with compile_watch.loading():  # a second engine's warm-up is not late either
            _compile("second warm-up")
    assert compile_watch.late_compiles() == ["_prefill_kernel(n: i32 D)"]
    assert [r.getMessage().endswith("_prefill_kernel(n: i32 D)") for r in caplog.records] == [True]
    # the hook that was there before is still called, for every compile
    assert watch == ["before any engine", "warm-up variant", "_prefill_kernel(n: i32 D)",
                     "second warm-up"]


def test_install_chains_once(watch):
    from triton import knobs

    with compile_watch.loading():
        pass
    hook = knobs.runtime.jit_post_compile_hook
    with compile_watch.loading():
        pass
    assert knobs.runtime.jit_post_compile_hook is hook
    _compile("x")
    assert watch == ["x"] and compile_watch.late_compiles() == ["x"]
