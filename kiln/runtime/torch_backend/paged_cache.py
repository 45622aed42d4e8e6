"""The torch backend's paged KV cache: fixed-size blocks, a block table per sequence slot.

Layout: one tensor ``[num_layers, 2, num_blocks, Hkv, page_size, head_dim]`` (2 = keys,
values; keys stored after the rotary embedding). Layer i's keys are ``data[i, 0]``, a
``[num_blocks, Hkv, page_size, head_dim]`` view, the layout the paged-attention kernels read:
one key head's ``page_size`` rows of a block are contiguous. A slot's token at position p lives
in block ``tables[slot, p // page_size]``, row ``p % page_size``.

Invariants:
- Block 0 is never handed out. It is scratch: rows a CUDA graph pads its batch with write and
  read there, and unused table entries point at it, so no real sequence can see them.
- ``reserve(slot, n)`` is all or nothing: it either gives the slot enough blocks for n tokens
  or changes nothing and answers False (the request waits; nothing is half-allocated).
- ``release(slot)`` returns every block of the slot; the next sequence in it starts empty.

Non-goals: prefix sharing, copy-on-write, swapping to host memory, preemption.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kiln.errors import option
from kiln.runtime.errors import KVCacheError

logger = logging.getLogger(__name__)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockAllocator:
    """Free list of blocks and the block table of every slot (host side, numpy)."""

    def __init__(self, num_blocks: int, page_size: int, max_slots: int, max_seq_len: int):
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = cdiv(max_seq_len, page_size)
        if num_blocks < self.max_blocks_per_seq + 1:
            raise KVCacheError(
                f"the KV cache has {num_blocks} blocks of {page_size} tokens, too few for one "
                f"sequence of max_seq_len {max_seq_len} ({self.max_blocks_per_seq} blocks + 1 "
                f"scratch); raise {option('kv_cache_free_gpu_memory_fraction')} or lower "
                f"{option('max_seq_len')}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._owned: list[list[int]] = [[] for _ in range(max_slots)]
        # [max_slots, max_blocks_per_seq]; unused entries point at scratch block 0.
        self.tables = np.zeros((max_slots, self.max_blocks_per_seq), dtype=np.int32)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def capacity(self, slot: int) -> int:
        """Tokens the slot can hold with the blocks it has now."""
        return len(self._owned[self._check(slot)]) * self.page_size

    def reserve(self, slot: int, num_tokens: int) -> bool:
        owned = self._owned[self._check(slot)]
        if num_tokens > self.max_seq_len:
            return False
        need = cdiv(num_tokens, self.page_size) - len(owned)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._free.pop()
            self.tables[slot, len(owned)] = block
            owned.append(block)
        return True

    def release(self, slot: int) -> None:
        owned = self._owned[self._check(slot)]
        self._free.extend(reversed(owned))
        owned.clear()
        self.tables[slot, :] = 0

    def _check(self, slot: int) -> int:
        if not 0 <= slot < len(self._owned):
            raise ValueError(f"slot {slot} is outside [0, {len(self._owned)})")
        return slot


class PagedKVCache:
    """The cache tensor and its allocator (see the module docstring for the layout)."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
                 num_blocks: int, max_slots: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device):
        if page_size < 1 or page_size & (page_size - 1):
            raise KVCacheError(f"page_size must be a power of two, found {page_size}")
        self.allocator = BlockAllocator(num_blocks, page_size, max_slots, max_seq_len)
        self.page_size = page_size
        shape = (num_layers, 2, num_blocks, num_kv_heads, page_size, head_dim)
        # Zeros, not empty: masked kernel lanes never read it, but scratch reads stay finite.
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        logger.info("paged KV cache: %d blocks x %d tokens, %.2f GiB on %s", num_blocks,
                    page_size, self.data.numel() * self.data.element_size() / 2**30, device)

    @staticmethod
    def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
                    dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers (keys and values)."""
        return 2 * num_layers * num_kv_heads * page_size * head_dim * dtype.itemsize

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer i (local index), each [num_blocks, Hkv, page_size, D]."""
        return self.data[i, 0], self.data[i, 1]

    @property
    def num_tokens(self) -> int:
        """Tokens the whole cache holds (scratch block excluded)."""
        return (self.allocator.num_blocks - 1) * self.page_size


def blocks_for_memory(free_bytes: int, reserve_bytes: int, fraction: float,
                      block_bytes: int) -> int:
    """Blocks that fit in ``fraction`` of the memory left after ``reserve_bytes`` (activations)."""
    if not 0.0 < fraction <= 1.0:
        raise KVCacheError(f"kv_cache_free_gpu_memory_fraction must be in (0, 1], found "
                           f"{fraction}")
    usable = int((free_bytes - reserve_bytes) * fraction)
    return max(0, usable // block_bytes)
