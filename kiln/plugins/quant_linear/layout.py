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

16-bit engines store INT4 projections of group 64 or 128 whose output rows are a multiple of 16
in a second layout, ``"int4_mma_fragments"``, the operand order of the tensor cores' m16n8k16
MMA, which the Gluon kernel (:mod:`.gluon_kernels`) loads straight into registers:

- int32 words ``[N / 16, K / 64, 32, 4]``: tile ``i`` (rows ``16i ..``), chunk ``c`` (features
  ``64c ..``), lane ``(g, t) = (lane // 4, lane % 4)``, k-tile ``j``;
- nibble ``b = 4p + 2h + r`` of a word holds row ``16i + 8r + g``, feature
  ``64c + 16t + 4j + 2h + p``: the A fragment of lane ``(g, t)`` for k-tile ``j`` (its pair
  registers ``2h + r``, low half ``p = 0``), so lane ``t``'s activations for a chunk's four
  k-tiles are 16 contiguous features.

The tensor's dtype says its layout (int32: fragments, uint8: split groups), so kernels and
references read either; float32 engines and other shapes keep the split-group layout.
"""

from __future__ import annotations

import torch

from kiln.quantization.formats import pack_int4, unpack_int4

INT4_LAYOUT = "int4_mma_fragments"  # the metadata of engines that may hold both layouts
INT4_LAYOUTS = ("int4_split_group", INT4_LAYOUT)  # what this kiln reads (the first: all uint8)
FRAGMENT_GROUP_SIZES = (64, 128)  # a 64-feature chunk lies in one group
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


def takes_fragments(n: int, k: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether an engine of ``dtype`` stores an ``[n, k]`` INT4 weight as MMA fragments."""
    return (dtype in (torch.bfloat16, torch.float16) and group_size in FRAGMENT_GROUP_SIZES
            and n % 16 == 0 and k % group_size == 0)


def pack_fragments(values: torch.Tensor) -> torch.Tensor:
    """int8 values ``[N, K]`` in [-8, 7] (N % 16 == 0, K % 64 == 0) -> int32 words
    ``[N / 16, K / 64, 32, 4]`` in the MMA fragment order (module docstring)."""
    n, k = values.shape
    v = values.view(n // 16, 2, 8, k // 64, 4, 4, 2, 2)  # (i, r, g, c, t, j, h, p)
    nibbles = v.permute(0, 3, 2, 4, 5, 7, 6, 1)  # (i, c, g, t, j, p, h, r): nibble 4p + 2h + r
    packed = pack_int4(nibbles.reshape(n // 16, k // 64, 32, 4, 8))  # 4 bytes, low nibble first
    return packed.contiguous().view(torch.int32).view(n // 16, k // 64, 32, 4)


def unpack_fragments(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fragments`: int8 values ``[N, K]`` in feature order."""
    tiles, chunks = words.shape[:2]
    nibbles = unpack_int4(words.contiguous().view(torch.uint8))  # [.., 32, 4, 8]
    v = nibbles.view(tiles, chunks, 8, 4, 4, 2, 2, 2)  # (i, c, g, t, j, p, h, r)
    return v.permute(0, 7, 2, 1, 3, 4, 6, 5).reshape(16 * tiles, 64 * chunks)


def engine_int4(packed: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Checkpoint int4 (ONNX order, uint8 ``[N, K/2]``) -> the layout a ``dtype`` engine stores
    (:func:`takes_fragments`: fragments, else split groups)."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    check_group_size(group_size, k)
    if takes_fragments(n, k, group_size, dtype):
        return pack_fragments(unpack_int4(packed))
    return repack_int4(packed, group_size)


def engine_int4_entry(shape: tuple[int, ...], group_size: int, dtype: torch.dtype,
                      ) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of :func:`engine_int4`'s result for a checkpoint int4 weight of ``shape``
    (``[N, K/2]``), without the data (the builder sizes its file before packing)."""
    n, k = shape[0], 2 * shape[1]
    if takes_fragments(n, k, group_size, dtype):
        return torch.int32, (n // 16, k // 64, 32, 4)
    return torch.uint8, tuple(shape)


def int4_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(N, K) of an engine INT4 weight in either layout."""
    if weight.dtype == torch.int32:
        return 16 * weight.shape[0], 64 * weight.shape[1]
    return weight.shape[0], 2 * weight.shape[1]


def unpack_engine_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """An engine INT4 weight in either layout -> int8 values ``[N, K]`` in feature order."""
    if weight.dtype == torch.int32:
        return unpack_fragments(weight)
    return unpack_split_int4(weight, group_size)
