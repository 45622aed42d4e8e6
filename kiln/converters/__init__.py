"""HF checkpoint -> kiln checkpoint. One module per architecture family, registered by HF name.

The names below are imported lazily (PEP 562), so ``kiln.converters.options`` (the CLI's
option definitions) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"converter_for": "kiln.converters.base", "register": "kiln.converters.base",
         "supported_architectures": "kiln.converters.base"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.converters' has no attribute {name!r}")
