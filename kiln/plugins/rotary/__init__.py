"""Rotary embedding plugin (see :mod:`.spec`)."""

from kiln.plugins.rotary.spec import SPEC, RotaryAttrs

__all__ = ["SPEC", "RotaryAttrs"]
