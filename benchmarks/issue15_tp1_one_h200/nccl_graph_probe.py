"""Probe (issue 15, multi-rank CUDA graphs): do torch.distributed NCCL collectives, called as
kiln's DistCollectives calls them (``group.allreduce([x])`` / ``group.allgather([parts], [x])``
then ``work.wait()``), capture into a CUDA graph (``thread_local`` mode, as DecodeGraphs
captures a tensor-parallel rank's) and replay on this machine's torch/NCCL? A world of one rank,
one GPU: the capture mechanics only, not a second rank's traffic.

    PYTHONPATH=. python3 benchmarks/issue15_tp1_one_h200/nccl_graph_probe.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    group = dist.new_group([0], backend="nccl")
    x = torch.arange(8, device=device, dtype=torch.float32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: the communicator is made outside the capture
        group.allreduce([x]).wait()
        group.allgather([[torch.empty_like(x)]], [x]).wait()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    gathered = torch.zeros(8, device=device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        group.allreduce([x]).wait()
        x.mul_(2)
        parts = [torch.empty_like(x)]  # as gather_vocab: a list of outputs, then a cat
        group.allgather([parts], [x]).wait()
        gathered.copy_(torch.cat(parts))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    want = torch.arange(8, dtype=torch.float32) * 8  # three replays of x 2 (one rank: sum = x)
    ok = torch.equal(x.cpu(), want) and torch.equal(gathered.cpu(), want)
    print("captured NCCL all-reduce and all-gather replayed:", x.cpu().tolist(),
          gathered.cpu().tolist(), "OK" if ok else f"WRONG (want {want.tolist()} twice)",
          "| torch", torch.__version__, "| NCCL", ".".join(map(str, torch.cuda.nccl.version())))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
