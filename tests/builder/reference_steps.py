"""Test helper: the oracle's logits for the same steps of chunks, one KV cache per slot."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kiln.reference import KVCache, ReferenceDecoder


class ReferenceSteps:
    def __init__(self, ref: ReferenceDecoder):
        self.ref = ref
        self.caches: dict[int, KVCache] = {}

    def step(self, chunks: Sequence[tuple[int, Sequence[int], int]]) -> np.ndarray:
        out = []
        for slot, tokens, start in chunks:
            cache = self.caches.setdefault(slot, KVCache())
            assert cache.length == start, f"slot {slot}: cache has {cache.length}, chunk starts {start}"
            out.append(self.ref.forward(torch.tensor([list(tokens)]), cache)[0, -1].numpy())
        return np.stack(out)


# Steps mixing everything the graph must serve: a padded two-row prefill, decodes, a step
# mixing a decode, a chunked-prefill continuation and a new prompt, rows in any slot order,
# and a row whose past length differs from every other row's; last, one row alone (batch-1
# decode: the one-token kernels, the GEMVs).
SCHEDULE: list[list[tuple[int, list[int], int]]] = [
    [(0, [3, 17, 5, 99, 42, 8, 64], 0), (1, [7, 9, 11], 0)],
    [(1, [20], 3), (0, [21], 7)],
    [(0, [22], 8), (2, [1, 127, 33, 12, 4, 5], 0), (1, [30, 31, 32, 33, 34], 4)],
    [(2, [40], 6), (1, [41], 9), (0, [42], 9)],
    [(1, [50, 51], 10), (3, [60], 0), (0, [52], 10)],
    [(2, [43], 7)],
]
