"""Gated (SwiGLU) MLP plugin (see :mod:`.spec`)."""

from kiln.plugins.gated_mlp.spec import SPEC, GatedMlpAttrs

__all__ = ["SPEC", "GatedMlpAttrs"]
