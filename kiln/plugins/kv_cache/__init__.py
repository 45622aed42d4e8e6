"""KV-cache update plugin (see :mod:`.spec`)."""

from kiln.plugins.kv_cache.spec import SPEC

__all__ = ["SPEC"]
