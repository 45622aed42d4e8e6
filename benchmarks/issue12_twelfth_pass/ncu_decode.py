"""Run paged decode attention a few times on one cache dtype, for Nsight Compute to profile.

    ncu --clock-control none --kernel-name regex:_decode_kernel --launch-skip 3 --launch-count 1 \
        --section WarpStateStats --section SourceCounters ... \
        python3 benchmarks/issue12_twelfth_pass/ncu_decode.py --cache float8_e4m3fn

The engine's long-context decode step of one layer (benchmarks/decode_attention.py's case):
``--seqs`` sequences of ``--ctx`` keys, 32 query / 8 key heads of 128, pages of 64, the
kernel's default config for the cache (``--config WARPSxSTAGES[xKEYS]`` to pick another).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.decode_attention import HKV, HQ, D, make_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="float8_e4m3fn",
                        choices=["bfloat16", "float8_e4m3fn", "int8"])
    parser.add_argument("--seqs", type=int, default=512)
    parser.add_argument("--ctx", type=int, default=1040)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    from kiln.plugins.attention.triton_kernels import paged_decode_attention
    dtype = getattr(torch, args.cache)
    config = tuple(map(int, args.config.split("x"))) if args.config else None
    torch.manual_seed(0)
    q = torch.randn(args.seqs, HQ, D, device="cuda", dtype=torch.bfloat16)
    rows = torch.arange(args.seqs, device="cuda", dtype=torch.int32)
    lens = torch.full((args.seqs,), args.ctx, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    quant = {} if dtype == torch.bfloat16 else dict(k_scale=torch.tensor(0.02, device="cuda"),
                                                    v_scale=torch.tensor(0.01, device="cuda"))
    cases = make_case(args.seqs, args.ctx, dtype, copies=2)
    for i in range(args.calls):
        k, v, table = cases[i % 2]
        paged_decode_attention(q, k, v, table, lens, rows, out, scale=D ** -0.5,
                               max_ctx_len=args.ctx, config=config, **quant)
    torch.cuda.synchronize()
    print(f"{args.cache}: {args.calls} calls, {args.seqs} x {args.ctx} keys, "
          f"{HKV} key heads x {D}")


if __name__ == "__main__":
    main()
