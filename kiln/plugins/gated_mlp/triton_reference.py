"""PyTorch reference of the Triton gated-MLP activation: ``silu(gate) * up``.

Contract, shared with :mod:`kiln.plugins.gated_mlp.triton_kernels`: ``silu_and_mul(gate_up)``
takes the fused projection ``[T, 2*I]`` (``[gate | up]`` per row, the layout of the canonical
``mlp.gate_up`` weight) and returns ``[T, I]`` in its dtype; SiLU in float32, one rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)
