"""Residual-norm plugin: residual add + norm in one op (see :mod:`.spec`)."""

from kiln.plugins.residual_norm.spec import SPEC

__all__ = ["SPEC"]
