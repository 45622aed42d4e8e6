"""Probe (issue 15, multi-rank CUDA graphs): does a torch.distributed NCCL all-reduce, called
as kiln's DistCollectives calls it (``group.allreduce([x])`` then ``work.wait()``), capture into
a CUDA graph and replay on this machine's torch/NCCL? A world of one rank, one GPU: the capture
mechanics only, not a second rank's traffic.

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
    with torch.cuda.stream(stream):
        group.allreduce([x]).wait()  # warm-up: the communicator is made outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        group.allreduce([x]).wait()
        x.mul_(2)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    want = torch.arange(8, dtype=torch.float32) * 8  # three replays of x 2 (one rank: sum = x)
    print("captured NCCL all-reduce replayed:", x.cpu().tolist(),
          "OK" if torch.equal(x.cpu(), want) else f"WRONG (want {want.tolist()})",
          "| torch", torch.__version__, "| NCCL", ".".join(map(str, torch.cuda.nccl.version())))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
