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
naming the kernel and its argument specialization (every argument's type, ``%16`` where Triton
took it as a multiple of 16 or a 16-byte aligned pointer, each constexpr's value), so that the
gap in the warm-up can be found and closed; compiles during a load are logged at DEBUG in the
same form, to compare with. :func:`late_compiles` returns what was recorded (GPU tests run a varied
workload and expect none).
"""

from __future__ import annotations

import contextlib
import json
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
                _record(describe(kwargs))
            elif logger.isEnabledFor(logging.DEBUG):
                logger.debug("compiled a Triton kernel variant: %s", describe(kwargs))
            return previous(*args, **kwargs) if previous is not None else None

        knobs.runtime.jit_post_compile_hook = hook
        _state["installed"] = True


def describe(hook_kwargs: dict) -> str:
    """A compiled variant, from the keyword arguments of Triton's post-compile hook: the
    kernel's name and options from ``repr``, then each argument with its specialization, from
    ``compile["specialization_data"]`` (Triton's own serialization) where there is one. Only
    ``repr`` where that is missing or unreadable: a hook must not fail a compile."""
    text = hook_kwargs.get("repr", "?")
    data = (hook_kwargs.get("compile") or {}).get("specialization_data")
    if not data:
        return text
    try:
        spec = json.loads(data)
        attrs = zip(spec["attrs_keys"], spec["attrs_vals"], strict=True)
        div16 = {key[0] for key, marks in attrs
                 if len(key) == 1 and any(m[0] == "tt.divisibility" for m in marks)}
        constants = zip(spec["constant_keys"], spec["constant_vals"], strict=True)
        consts = {key[0]: value for key, value in constants if len(key) == 1}
        args = []
        for i, (name, ty) in enumerate(spec["signature"].items()):
            if i in consts:
                value = consts[i]
                value = value["constexpr"] if isinstance(value, dict) else value
                args.append(f"{name}={value}")
            else:
                args.append(f"{name}: {ty}{' %16' if i in div16 else ''}")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return text
    return f"{text.split('(', 1)[0]}({', '.join(args)})"


def late_compiles() -> list[str]:
    """The kernel variants compiled after :func:`arm`, in order."""
    with _lock:
        return list(_late)


def _record(kernel: str) -> None:
    with _lock:
        _late.append(kernel)
    logger.warning("compiled a Triton kernel variant after the engine was loaded (a request "
                   "waited for the compiler; the load-time warm-up missed it): %s", kernel)
