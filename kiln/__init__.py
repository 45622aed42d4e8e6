"""kiln: an ahead-of-time compiler for large language models.

HF checkpoint --convert_checkpoint--> kiln checkpoint --build--> engine dir --run--> tokens.
See docs/ and the README for the formats and commands.

The public names below are imported lazily (PEP 562), so ``import kiln`` and the CLI start
without loading ONNX, the builder or the runtime until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "convert_checkpoint": "kiln.converters.convert",
    "quantize": "kiln.quantization.quantize",
    "build": "kiln.builder",
    "BuildOptions": "kiln.builder",
    "engine_for_model": "kiln.build_cache",  # HF checkpoint -> cached engine dir
    "LLM": "kiln.runtime",
    "AsyncLLM": "kiln.runtime",
    "SamplingParams": "kiln.runtime",
    "CompletionResult": "kiln.runtime",
    "ExecutorOptions": "kiln.runtime",  # LLM(engine_dir, ExecutorOptions(device="cpu"))
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
