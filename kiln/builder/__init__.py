"""Build step: kiln checkpoint -> engine dir (graph passes, plugins, engines per backend).

``kiln.builder.build(checkpoint_dir, output_dir, backend=..., ...)`` is the API (see
:mod:`kiln.builder.api`); backends register with :func:`register_backend` (see
:mod:`kiln.builder.backends` for the interface).

The names below are imported lazily (PEP 562): ``kiln build --help`` reads
:mod:`kiln.builder.options` without loading ONNX and torch through the builder.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BuildResult": "kiln.builder.api", "build": "kiln.builder.api",
    "Backend": "kiln.builder.backends", "BuildPlan": "kiln.builder.backends",
    "PartJob": "kiln.builder.backends", "PartResult": "kiln.builder.backends",
    "register_backend": "kiln.builder.backends", "BuildOptions": "kiln.builder.options",
}

__all__ = ["Backend", "BuildOptions", "BuildPlan", "BuildResult", "PartJob", "PartResult",
           "build", "register_backend"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.builder' has no attribute {name!r}")
