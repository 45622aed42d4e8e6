"""Weight layouts of the quantized projections in torch engine files (build <-> kernels).

The checkpoint stores ``[out, in]`` weights as ``kiln.quantization.formats`` defines them. The
torch engine keeps fp8 and int8 weights exactly so (each output row contiguous: a decode GEMV
streams rows, and ``[N, K]`` row-major is the column-major ``[K, N]`` operand cuBLASLt's FP8 and
INT8 GEMMs take). INT4 is repacked (the Marlin/Machete idea: store what the kernel streams
best):

- checkpoint (ONNX order): byte ``j`` of a row holds input feature ``2j`` (low nibble) and
  ``2j + 1`` (high nibble);
- engine (``"int4_split_group"``): within each group of ``G`` input features, byte ``j < G/2``
  of the group holds feature ``j`` of the group in the low nibble and feature ``j + G/2`` in
  the high nibble.

So a kernel that reads a group's ``G/2`` bytes gets its two halves as two contiguous runs of
features with one shared scale: the low nibbles multiply ``x[g*G : g*G + G/2]`` and the high
nibbles ``x[g*G + G/2 : (g+1)*G]``, with no interleaving in registers. Nibbles stay 4-bit two's
complement values in [-8, 7]; scales stay float32 ``[out, in / G]``.
"""

from __future__ import annotations

import torch

from kiln.quantization.formats import pack_int4, unpack_int4

INT4_LAYOUT = "int4_split_group"
INT4_GROUP_SIZES = (32, 64, 128)  # what the kernels read; every kiln quantize group size


def check_group_size(group_size: int, in_features: int) -> None:
    if group_size not in INT4_GROUP_SIZES or in_features % group_size:
        raise ValueError(f"int4 group_size {group_size} with {in_features} input features: the "
                         f"torch backend's kernels read group sizes "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))} that divide the input dim")


def _split_order(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] int values -> [N, K] reordered so pack_int4 pairs feature j with j + G/2."""
    n, k = values.shape
    halves = values.view(n, k // group_size, 2, group_size // 2)  # [N, groups, half, j]
    return halves.transpose(2, 3).reshape(n, k)  # [N, groups, j, half]: (j, j + G/2) adjacent


def repack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Checkpoint int4 (ONNX order, uint8 [N, K/2]) -> the engine's split-group layout."""
    check_group_size(group_size, packed.shape[1] * 2)
    return pack_int4(_split_order(unpack_int4(packed), group_size)).contiguous()


def unpack_split_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """The engine layout (uint8 [N, K/2]) -> int8 values [N, K] in feature order."""
    n, half_k = packed.shape
    k = 2 * half_k
    pairs = unpack_int4(packed).view(n, k // group_size, group_size // 2, 2)  # [N, g, j, half]
    return pairs.transpose(2, 3).reshape(n, k)
