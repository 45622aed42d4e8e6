"""kiln.runtime.torch_backend.compile_watch: Triton compiles after a load are recorded and said.

Triton is driven by hand here (no GPU): the test calls the post-compile hook the way Triton's
JIT does after a compile (keyword arguments, ``repr`` naming the kernel variant). Marked ``gpu``
although it needs no GPU: it needs Triton, which only the GPU machine's Python has (in the CPU
suite it would skip, and unmarked it was deselected from the GPU one, so it ran nowhere).
"""

from __future__ import annotations

import json
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


def test_a_variant_is_described_by_its_specialization():
    """Triton's serialized specialization: types, which arguments are multiples of 16 (or
    16-byte aligned pointers), constexpr values; its repr alone where that is missing."""
    data = json.dumps({"signature": {"x_ptr": "*bf16", "n": "i32", "m": "i32",
                                     "BLOCK": "constexpr", "PDL": "constexpr"},
                       "constant_keys": [[3], [4], [2]], "constant_vals": [64, {"constexpr": True}, 1],
                       "attrs_keys": [[0], [1]], "attrs_vals": [[["tt.divisibility", 16]],
                                                                [["tt.divisibility", 16]]]})
    kwargs = dict(repr="_k[num_warps=4](x_ptr: ())", compile={"specialization_data": data})
    assert compile_watch.describe(kwargs) == \
        "_k[num_warps=4](x_ptr: *bf16 %16, n: i32 %16, m=1, BLOCK=64, PDL=True)"
    assert compile_watch.describe({"repr": "_k(x)", "compile": {}}) == "_k(x)"
    assert compile_watch.describe({"repr": "_k(x)",
                                   "compile": {"specialization_data": "{}"}}) == "_k(x)"
