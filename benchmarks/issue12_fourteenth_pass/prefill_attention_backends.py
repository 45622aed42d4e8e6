"""Prefill attention of one fresh prompt (32 query / 8 key heads of 128, bf16, causal): kiln's
paged Triton kernel beside torch's SDPA backends on the same values.

    PYTHONPATH=. python3 benchmarks/issue12_fourteenth_pass/prefill_attention_backends.py \
        --out DIR [--ns 256,512,1024,2048,4096,8192] [--backends]

A fresh prompt attends only to its own keys, so a backend that reads contiguous keys and values
can serve it. For each length: kiln's kernel (default tiles) and
``kiln.plugins.attention.cudnn.fresh_prefill_attention`` (the keys and values gathered from
the paged cache, the length padded, then cuDNN), each as median us (triton.testing.do_bench), TFLOP/s and the
largest difference from a float32 reference. ``--backends`` adds, at 2,048 tokens, every SDPA
backend on contiguous tensors (with and without ``enable_gqa``) and other kiln tiles. Then what
a length cuDNN has not seen costs (it builds a plan per shape): the warm-up of every padded
length, and first and second calls at new lengths (:func:`first_calls`). Writes
DIR/prefill_attention_backends.json.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.gpu import bench_ms
from kiln.plugins.attention import cudnn
from kiln.plugins.attention import triton_kernels as attn

HQ, HKV, D, PAGE = 32, 8, 128, 64


def one_length(n: int, backends: bool, rows: list[dict]) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(n)
    q = torch.randn(n, HQ, D, device=dev, dtype=dt, generator=gen)
    k = torch.randn(n, HKV, D, device=dev, dtype=dt, generator=gen)
    v = torch.randn(n, HKV, D, device=dev, dtype=dt, generator=gen)
    blocks = -(-n // PAGE)
    # the paged cache: block 0 is the scratch block; the prompt's blocks in reversed order
    kc = torch.zeros(blocks + 1, HKV, PAGE, D, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    table = torch.arange(blocks, 0, -1, device=dev, dtype=torch.int32)
    pad = blocks * PAGE - n
    for cache, x in ((kc, k), (vc, v)):
        cache[table.long()] = F.pad(x, (0, 0, 0, 0, 0, pad)).view(blocks, PAGE, HKV, D) \
            .transpose(1, 2)
    one = torch.tensor([n], device=dev, dtype=torch.int32)
    zero = torch.zeros(1, device=dev, dtype=torch.int32)
    out = torch.empty_like(q)
    scale = D ** -0.5
    flops = 4 * n * (n + 1) / 2 * D * HQ
    qs, ks, vs = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=True,
                                              enable_gqa=True)[0].transpose(0, 1)

    def record(name, fn, result=None):
        try:
            ms = bench_ms(fn)
            got = None if result is None else result()
        except Exception as e:  # noqa: BLE001 - a backend may refuse the shape; say which
            rows.append({"n": n, "backend": name, "error": str(e).splitlines()[0][:200]})
            print(f"n={n:5} {name:44} failed: {rows[-1]['error']}", flush=True)
            return
        err = None if got is None else (got.float() - want).abs().max().item()
        rows.append({"n": n, "backend": name, "us": ms * 1e3, "tflops": flops / ms / 1e9,
                     "max_abs_err": err})
        print(f"n={n:5} {name:44} {ms * 1e3:8.1f} us {flops / ms / 1e9:6.1f} TFLOP/s  err {err}",
              flush=True)

    def kiln(config=None):
        return attn.paged_prefill_attention(q, kc, vc, table[None], one, zero, one, out,
                                            scale=scale, max_q_len=n, config=config)

    fresh = partial(cudnn.fresh_prefill_attention, q, kc, vc, table, scale=scale)
    record("kiln paged (default)", kiln, kiln)
    record("cudnn fresh prefill (gather + SDPA)", fresh, fresh)
    if not backends:
        return
    record("kiln paged (128, 64, 8, 3, True)", partial(kiln, (128, 64, 8, 3, True)),
           partial(kiln, (128, 64, 8, 3, True)))

    def sdpa(backend, gqa):
        kk, vv = (ks, vs) if gqa else (ks.repeat_interleave(4, 1), vs.repeat_interleave(4, 1))
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, enable_gqa=gqa)
        return o[0].transpose(0, 1)

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):
        for gqa in (True, False):
            fn = partial(sdpa, backend, gqa)
            record(f"sdpa {backend.name} gqa={gqa}", fn, fn)
    record("repeat_interleave k and v (gqa=False's cost)",
           lambda: (ks.repeat_interleave(4, 1), vs.repeat_interleave(4, 1)))


def first_calls(ns: list[int]) -> dict:
    """cuDNN builds a plan per shape: the time of :func:`cudnn.warm_up` (every padded length
    up to 8,192 tokens, as an engine's load runs it), then the wall ms of the first and second
    fresh-prefill call at lengths not seen before (their padded lengths were warmed), and of a
    first call at a padded length not warmed."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.cuda.synchronize()
    start = time.perf_counter()
    lengths = cudnn.warm_up(dev, HQ, HKV, D, dt, PAGE, D ** -0.5, 8192)
    torch.cuda.synchronize()
    result = {"warm_up_s": time.perf_counter() - start, "warmed_lengths": lengths, "calls": []}
    print(f"warm-up: {len(lengths)} padded lengths in {result['warm_up_s']:.2f} s", flush=True)
    for n in ns:
        blocks = -(-n // PAGE)
        kc = torch.randn(blocks + 1, HKV, PAGE, D, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        table = torch.arange(1, blocks + 1, device=dev, dtype=torch.int32)
        q = torch.randn(n, HQ, D, device=dev, dtype=dt)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            cudnn.fresh_prefill_attention(q, kc, vc, table, scale=D ** -0.5)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        result["calls"].append({"n": n, "padded": cudnn.bucket(n, PAGE), "first_ms": times[0],
                                "second_ms": times[1]})
        print(f"new length {n} (padded {cudnn.bucket(n, PAGE)}): first call {times[0]:.1f} ms, "
              f"second {times[1]:.2f} ms", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--ns", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--backends", action="store_true")
    args = parser.parse_args()
    rows: list[dict] = []
    for n in map(int, args.ns.split(",")):
        one_length(n, args.backends and n == 2048, rows)
    firsts = first_calls([1600, 1601, 1777, 3001, 5000, 9000])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "prefill_attention_backends.json"
    path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                    rows=rows, first_calls=firsts), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
