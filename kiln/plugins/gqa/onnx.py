"""ONNX form of the gqa plugin (see :mod:`.spec`); its decomposed form is the other plugins'."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.plugins.gqa.spec import DOMAIN, GqaAttrs

if TYPE_CHECKING:
    from kiln.graph.emitter import GraphEmitter


def emit(g: GraphEmitter, qkv: str, past: tuple[str, str], present: tuple[str, str],
         seqlens_k: str, total_length: str, cos: str, sin: str, attrs: GqaAttrs) -> str:
    """out [B, S, Hq * D]; writes the caches to the values named ``present``."""
    window = -1 if attrs.sliding_window is None else attrs.sliding_window
    out, _, _ = g.op("GroupQueryAttention", qkv, "", "", *past, seqlens_k, total_length, cos, sin,
                     outputs=[None, *present], domain=DOMAIN, num_heads=attrs.num_heads,
                     kv_num_heads=attrs.num_kv_heads, scale=attrs.scale, local_window_size=window,
                     do_rotary=1, rotary_interleaved=0)
    return out
