"""Triton compiles after an engine is loaded: kernel variants a step compiles at first use.

Triton compiles one variant of a kernel per specialization of its arguments (an integer equal
to 1, a multiple of 16, or neither; pointer alignment; constexprs), the first time a launch
needs it: 0.2-1 s each for the attention and projection kernels on an H200. The torch
executor compiles the variants it can foresee while it loads (``_warm_up_kernels``); a
variant it missed is compiled during someone's request, who waits for it (``kiln serve``'s
first requests on an H200 waited 1.3-1.9 s, benchmarks/GPU_NOTES.md).

The executor loads inside :func:`loading`, which chains a post-compile hook into
``triton.knobs`` (process-wide, once). Once an engine has loaded, each compile outside any
load (another executor's load-time warm-up is not late) is recorded and logged at WARNING,
naming the kernel and its argument specialization, so that the gap in the warm-up can be
found and closed. :func:`late_compiles` returns what was recorded (GPU tests run a varied
workload and expect none).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_state = {"installed": False, "armed": False, "loading": 0}
_late: list[str] = []


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """An engine loads (and warms up) inside: its compiles are expected; afterwards, armed."""
    _install()
    with _lock:
        _state["loading"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["loading"] -= 1
            _state["armed"] = True


def _install() -> None:
    """Chain the hook into Triton's ``jit_post_compile_hook`` (idempotent)."""
    with _lock:
        if _state["installed"]:
            return
        from triton import knobs

        previous = knobs.runtime.jit_post_compile_hook

        def hook(*args, **kwargs):
            if _state["armed"] and not _state["loading"]:
                _record(kwargs.get("repr", "?"))
            return previous(*args, **kwargs) if previous is not None else None

        knobs.runtime.jit_post_compile_hook = hook
        _state["installed"] = True


def late_compiles() -> list[str]:
    """The kernel variants compiled after :func:`arm`, in order."""
    with _lock:
        return list(_late)


def _record(kernel: str) -> None:
    with _lock:
        _late.append(kernel)
    logger.warning("compiled a Triton kernel variant after the engine was loaded (a request "
                   "waited for the compiler; the load-time warm-up missed it): %s", kernel)
