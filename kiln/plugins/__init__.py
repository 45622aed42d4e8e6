"""Fused operations: spec, PyTorch reference, ONNX forms (and kernels), one folder each.

Each ``kiln/plugins/<op>/`` holds ``spec.py`` (attributes, shapes, the :class:`PluginSpec`
registered under the op's name), ``reference.py`` (PyTorch), ``onnx.py`` (``emit(...,
fused=True|False)``: the fused and the decomposed ONNX forms) and, where one pays, a Triton
kernel (``triton*.py``, for the torch backend). Build switches ``--<op>_plugin
auto|enable|disable`` choose the form (:func:`resolve_plugins`).
"""

from kiln.plugins import (  # noqa: F401 (registers)
    attention,
    gated_mlp,
    gqa,
    kv_cache,
    norm,
    residual_norm,
    rotary,
)
from kiln.plugins.registry import (
    PLUGINS,
    PluginContext,
    PluginMode,
    PluginSpec,
    resolve_plugins,
)

__all__ = ["PLUGINS", "PluginContext", "PluginMode", "PluginSpec", "resolve_plugins"]
