"""The paged KV cache's allocator, sizing, and the host-side step plan built from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.runtime.executor import SequenceChunk
from kiln.runtime.torch_backend.cuda_graphs import default_batch_sizes
from kiln.runtime.torch_backend.inputs import Uploader, make_plan
from kiln.runtime.torch_backend.paged_cache import (
    BlockAllocator,
    KVCacheError,
    PagedKVCache,
    blocks_for_memory,
)


def test_reserve_is_all_or_nothing_and_release_returns_blocks():
    alloc = BlockAllocator(num_blocks=9, page_size=4, max_slots=3, max_seq_len=16)
    assert alloc.num_free == 8  # block 0 is scratch
    assert alloc.reserve(0, 10) and alloc.capacity(0) == 12
    assert alloc.reserve(0, 12) and alloc.num_free == 5  # already covered: nothing taken
    assert alloc.reserve(1, 16) and alloc.num_free == 1
    assert not alloc.reserve(2, 5)  # needs 2 blocks, 1 free: nothing taken
    assert alloc.num_free == 1 and alloc.capacity(2) == 0
    assert not alloc.reserve(2, 17)  # over max_seq_len
    handed = set(alloc.tables[0, :3]) | set(alloc.tables[1, :4])
    assert 0 not in handed and len(handed) == 7
    alloc.release(1)
    assert alloc.num_free == 5 and not alloc.tables[1].any()
    assert alloc.reserve(2, 5) and alloc.capacity(2) == 8


def test_bad_slots_and_sizes():
    alloc = BlockAllocator(num_blocks=9, page_size=4, max_slots=3, max_seq_len=16)
    with pytest.raises(ValueError, match="outside"):
        alloc.reserve(3, 1)
    with pytest.raises(KVCacheError, match="too few"):
        BlockAllocator(num_blocks=4, page_size=4, max_slots=1, max_seq_len=16)
    with pytest.raises(KVCacheError, match="power of two"):
        PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=8, page_size=12, num_blocks=9,
                     max_slots=1, max_seq_len=16, dtype=torch.float32, device=torch.device("cpu"))


def test_cache_layout_and_sizing():
    cache = PagedKVCache(num_layers=2, num_kv_heads=3, head_dim=8, page_size=4, num_blocks=6,
                         max_slots=2, max_seq_len=16, dtype=torch.float16,
                         device=torch.device("cpu"))
    k, v = cache.layer(1)
    assert k.shape == (6, 3, 4, 8) and k.is_contiguous() and v.data_ptr() > k.data_ptr()
    assert cache.num_tokens == 20
    per_block = PagedKVCache.block_bytes(2, 3, 8, 4, torch.float16)
    assert per_block == 2 * 2 * 3 * 4 * 8 * 2
    assert blocks_for_memory(10_000 + 100 * per_block, 10_000, 0.5, per_block) == 50
    with pytest.raises(KVCacheError, match="fraction"):
        blocks_for_memory(1 << 30, 0, 1.5, per_block)


def test_plan_packs_chunks_and_addresses_blocks():
    alloc = BlockAllocator(num_blocks=9, page_size=4, max_slots=3, max_seq_len=16)
    alloc.reserve(2, 7)
    alloc.reserve(0, 3)
    plan = make_plan([SequenceChunk(2, [5, 6, 7], 4), SequenceChunk(0, [9], 2)], alloc)
    assert plan.tokens.tolist() == [5, 6, 7, 9]
    assert plan.positions.tolist() == [4, 5, 6, 2]
    b2, b0 = alloc.tables[2, 1], alloc.tables[0, 0]
    assert plan.slot_mapping.tolist() == [b2 * 4, b2 * 4 + 1, b2 * 4 + 2, b0 * 4 + 2]
    assert plan.last_rows.tolist() == [2, 3] and plan.ends.tolist() == [7, 3]
    assert plan.dec.tolist() == [1] and plan.pre.tolist() == [0] and not plan.all_decode
    assert np.array_equal(plan.tables, alloc.tables[[2, 0]])


def test_uploaded_arrays_each_start_16_bytes_aligned():
    """Triton specializes pointers on 16-byte divisibility: packed end to end, the index arrays
    of a step took alignments that depended on the sizes before them, and the attention
    kernels compiled new variants during requests on a GPU (kiln.runtime.torch_backend.inputs)."""
    arrays = [np.arange(n, dtype=np.int32) + 100 * n for n in (3, 1, 5, 4, 7, 2)]
    arrays.append(np.arange(6, dtype=np.int32).reshape(2, 3))
    views = Uploader(torch.device("cpu"), capacity=8).upload(arrays)  # grows: 4 + 4 + 8 + ...
    for array, view in zip(arrays, views, strict=True):
        assert view.data_ptr() % 16 == 0 and np.array_equal(view.numpy(), array)


def test_graph_batch_sizes():
    assert default_batch_sizes(1) == [1]
    sizes = default_batch_sizes(512)
    assert sizes[:6] == [1, 2, 4, 8, 16, 32] and sizes[-1] == 512 and 256 in sizes
    assert default_batch_sizes(100)[-1] == 100 and all(s <= 100 for s in default_batch_sizes(100))
