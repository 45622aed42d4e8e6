"""kiln: an ahead-of-time compiler for large language models.

HF checkpoint --convert_checkpoint--> kiln checkpoint --build--> engine dir --run--> tokens.
See docs/ and the README for the formats and commands.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kiln.converters.convert import convert_checkpoint  # noqa: E402

__all__ = ["__version__", "convert_checkpoint"]
