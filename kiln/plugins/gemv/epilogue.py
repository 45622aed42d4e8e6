"""Epilogues of a one-row projection: the op that reads its output next, run by the same kernel.

At batch-1 decode every kernel of a layer costs its launch and its wait, more than the work of
the small ops that follow a projection. A projection given an epilogue returns the
epilogue's result instead of its own output:

- :class:`SiluMul` on the gated MLP's ``[gate | up]`` projection: ``silu(gate) * up``
  ``[M, I]`` (:mod:`kiln.plugins.gated_mlp`'s contract);
- :class:`RopeToCache` on the ``qkv`` projection: keys and values into the paged cache, the
  rotated queries ``[M, Hq, D]`` returned (:mod:`kiln.plugins.rotary`'s ``rope_qkv_to_cache``).

Each epilogue carries the kernel set's op it replaces (``op``). A kernel that can fuse it (the
bf16, FP8 and INT8 GEMVs at one row, :mod:`kiln.plugins.gemv.triton_epilogue`; silu * up in the
INT4 Gluon kernel up to 64 tokens, :mod:`kiln.plugins.quant_linear.gluon_kernels`) does; any
other path computes the projection and calls :meth:`apply` on it: the same values, one kernel
more.
The references always do the latter. The fused kernels are tested against the unfused ops.
On an H200 the epilogues gained ~45 us per FP8 token. The rotary in the INT4 GEMV was slower,
so it is not fused there (benchmarks/GPU_NOTES.md, "Issue 12, thirteenth pass").

Fusing needs both values of each output pair in one program: the GEMV programs own
``BLOCK_N / 2`` row pairs ``(r, r + half)`` (:func:`pair_half`) instead of ``BLOCK_N``
consecutive rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EPILOGUE_NONE, EPILOGUE_SILU_MUL, EPILOGUE_ROPE = 0, 1, 2


@dataclass(slots=True)
class SiluMul:
    """``silu(gate) * up`` of a ``[gate | up]`` projection; ``op``: the kernel set's
    ``silu_and_mul``. The FP8 output of ``silu_and_mul`` (``quant_scale``) is not an
    epilogue: at one row the down projection quantizes its own input."""

    op: Callable

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        return self.op(y)


@dataclass(slots=True)
class RopeToCache:
    """``rope_qkv_to_cache`` of a ``qkv`` projection (``op``: the kernel set's), with its
    arguments after the projection's output."""

    op: Callable
    table: torch.Tensor | None
    table_index: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    clip: float | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        return self.op(y, self.table, self.table_index, self.k_cache, self.v_cache,
                       self.slot_mapping, num_heads=self.num_heads,
                       num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, clip=self.clip,
                       k_scale=self.k_scale, v_scale=self.v_scale)


Epilogue = SiluMul | RopeToCache


def pair_half(epilogue: Epilogue, n: int, block_n: int) -> int | None:
    """The distance between the two rows of an output pair of ``epilogue`` on an ``n``-row
    projection whose GEMV programs own ``block_n`` rows, or None where the pairing does not
    fit (each program's ``block_n / 2`` pairs must lie in one half-span)."""
    pairs = block_n // 2
    if isinstance(epilogue, SiluMul):
        half = n // 2
    else:
        heads = epilogue.num_heads + 2 * epilogue.num_kv_heads
        if n != heads * epilogue.head_dim or epilogue.head_dim % 2:
            return None
        half = epilogue.head_dim // 2
    if block_n % 2 or n % 2 or pairs == 0 or half % pairs:
        return None
    return half
