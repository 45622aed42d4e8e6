"""The sampler's greedy pass (finite flags + argmax of every row): torch ops vs the Triton kernels.

    PYTHONPATH=. python3 benchmarks/issue12_tenth_pass/greedy_pass.py --out DIR
        (a CUDA GPU; writes DIR/greedy_pass.json)

float32 logits [B, 128256] (Llama 3's vocabulary), B in 1, 8, 64, 512, 1024: the reference's
torch ops (kiln.plugins.greedy.triton_reference, what the sampler ran before) and the kernels
at their default slice count (1: the whole-row kernel) and a few others (2, 4, 8, half and
twice the default). Each is queued 200 times behind a ~20 ms sleep
kernel, so the GPU runs the calls back to back with the host ahead of it (GPU time, launch gaps
on the GPU's queue included, not the host's launch cost). Every variant must give the same
flags and indices as torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

from kiln.plugins.greedy import triton_kernels, triton_reference

VOCAB = 128256


def time_us(fn, reps: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(40_000_000)  # ~20 ms at 1.98 GHz: the host queues the calls meanwhile
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return 1e3 * a.elapsed_time(b) / reps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: torch sees none", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = {}
    for batch in (1, 8, 64, 512, 1024):
        logits = torch.randn(batch, VOCAB, device="cuda") * 3
        want = triton_reference.finite_argmax(logits)
        default = triton_kernels.default_slices(batch, VOCAB, sms)
        row = {"default_slices": default,
               "torch_ops_us": time_us(partial(triton_reference.finite_argmax, logits))}
        for slices in sorted({default, 1, 2, 4, 8, max(1, default // 2), min(256, 2 * default)}):
            got = triton_kernels.finite_argmax(logits, slices=slices)
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                raise SystemExit(f"{slices} slices differ from torch at batch {batch}")
            row[f"kernels_{slices}_slices_us"] = time_us(
                partial(triton_kernels.finite_argmax, logits, slices=slices))
        results[batch] = row
        print(batch, json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "greedy_pass.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
