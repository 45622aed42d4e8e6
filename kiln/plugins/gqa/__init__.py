"""GroupQueryAttention plugin: rotary + KV-cache write + attention in one op (see :mod:`.spec`)."""

from kiln.plugins.gqa.spec import SPEC, GqaAttrs

__all__ = ["SPEC", "GqaAttrs"]
