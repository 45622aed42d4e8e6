"""Norm plugin: RMSNorm / LayerNorm over the last axis (see :mod:`.spec`)."""

from kiln.plugins.norm.spec import SPEC, NormAttrs

__all__ = ["SPEC", "NormAttrs"]
