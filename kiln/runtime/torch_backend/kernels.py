"""The torch backend's plugin kernels, as one set: Triton on GPUs, the PyTorch references anywhere.

The choice is explicit (``kernels="triton"`` or ``"reference"``); ``None`` means Triton on
CUDA devices and the references on the CPU. Asking for Triton where it cannot run is an error,
never a quiet switch to the references.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.errors import ConfigError

KERNEL_SETS = ("triton", "reference")
_OPS = {  # op -> plugin folder under kiln.plugins
    "rope_qkv_to_cache": "rotary",
    "paged_decode_attention": "attention",
    "paged_prefill_attention": "attention",
    "add_norm": "norm",
    "silu_and_mul": "gated_mlp",
    "gemv": "gemv",
    "fp8_linear": "quant_linear",
    "int8_w8a8_linear": "quant_linear",
    "int8_weight_only_linear": "quant_linear",
    "int4_weight_only_linear": "quant_linear",
    "fp8_takes_quantized": "quant_linear",
}


@dataclass(frozen=True)
class KernelSet:
    name: str
    rope_qkv_to_cache: Callable
    paged_decode_attention: Callable
    paged_prefill_attention: Callable
    add_norm: Callable
    silu_and_mul: Callable
    gemv: Callable  # single-row projections (batch-1 decode), optionally fed by silu*up
    fp8_linear: Callable  # quantized projections: kiln.plugins.quant_linear
    int8_w8a8_linear: Callable
    int8_weight_only_linear: Callable
    int4_weight_only_linear: Callable
    fp8_takes_quantized: Callable  # where fp8_linear takes an input its producer quantized


def load_kernels(name: str | None, device: torch.device) -> KernelSet:
    """The kernel set ``name`` for ``device`` (see the module docstring for ``None``)."""
    if name is None:
        name = "triton" if device.type == "cuda" else "reference"
    if name not in KERNEL_SETS:
        raise ConfigError(f"kernels must be one of {', '.join(KERNEL_SETS)}, found {name!r}")
    if name == "triton":
        if device.type != "cuda":
            raise ConfigError(f"Triton kernels need a CUDA device, found {device}; pass "
                              f"kernels='reference' to run the PyTorch references there")
        try:
            importlib.import_module("triton")
        except ImportError:
            raise ConfigError("Triton kernels need the triton package: pip install triton "
                              "(or pass kernels='reference')") from None
    module = "triton_kernels" if name == "triton" else "triton_reference"
    ops = {op: getattr(importlib.import_module(f"kiln.plugins.{folder}.{module}"), op)
           for op, folder in _OPS.items()}
    return KernelSet(name=name, **ops)
