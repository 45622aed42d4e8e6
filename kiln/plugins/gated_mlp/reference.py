"""PyTorch reference of the gated MLP plugin (see :mod:`.spec`; graph weight layout [in, out])."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, b_gate_up: torch.Tensor | None,
              w_down: torch.Tensor) -> torch.Tensor:
    gate_up = x @ w_gate_up
    if b_gate_up is not None:
        gate_up = gate_up + b_gate_up
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down
