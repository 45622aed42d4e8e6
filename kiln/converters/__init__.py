"""HF checkpoint -> kiln checkpoint. One module per architecture family, registered by HF name."""

from kiln.converters.base import converter_for, register, supported_architectures

__all__ = ["converter_for", "register", "supported_architectures"]
