"""Attention with KV-cache update plugin (see :mod:`.spec`)."""

from kiln.plugins.attention.spec import SPEC, AttentionAttrs, AttentionMask

__all__ = ["SPEC", "AttentionAttrs", "AttentionMask"]
