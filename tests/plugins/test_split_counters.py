"""Split counters: one zeroed buffer per kernel family and device, refused inside a capture."""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.split_counters import CAPACITY, split_counters


def test_one_zeroed_buffer_per_family_and_device():
    cpu = torch.device("cpu")
    a = split_counters(cpu, "test family a")
    assert a.shape == (CAPACITY,) and a.dtype == torch.int32 and not a.any()
    assert split_counters(cpu, "test family a") is a
    assert split_counters(cpu, "test family b") is not a


@pytest.mark.gpu
def test_first_call_inside_a_graph_capture_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capturing a CUDA graph"):
        with torch.cuda.graph(graph):
            split_counters(torch.device("cuda"), "test family captured")
    counters = split_counters(torch.device("cuda"), "test family captured")  # outside: made
    assert counters.device.type == "cuda" and not counters.any()
