"""Time the paged decode-attention kernel over bf16, float8 and int8 KV caches (Llama-3.1-8B heads).

    PYTHONPATH=. python3 benchmarks/decode_attention.py --out DIR  (a CUDA GPU; writes
    DIR/decode_attention_results.json)

One layer's decode step: ``--seqs`` sequences of ``--ctx`` cached tokens each, 32 query and 8
key heads of 128, pages of 64 in a shuffled block table, as the engine's long-context decode
runs it. Time per call is the median over CUDA-graph replays (quant_kernels.time_calls), the
cache of each call a different copy so that every call streams its keys and values from HBM.
Effective TB/s = cache bytes read (keys + values) / time, printed beside the copy rate
measured in the same run (bytes read + written) and the bf16 cache's time as the baseline.
``--configs`` sweeps the kernel's (num_warps, num_stages[, keys per tile[, registers per thread
at most]]) over the quantized caches, ``--bf16_configs`` over the bf16 cache (default: its
default config; the first bf16 row is the baseline). ``--before FILE`` (an earlier version of
kiln/plugins/attention/triton_kernels.py, e.g. ``git show REV:kiln/plugins/attention/triton_kernels.py``)
times that kernel too, on the same caches in the same run, each row beside it (``vs_before``).
``--graph_max_ctx N``: the grid of a decode CUDA graph captured for N keys (the split count of
``max_ctx_len=N``, the engine's default configs) over the ``--ctx`` keys each sequence holds,
as batch-1 decode runs it (e.g. ``--seqs 1 --ctx 256,1024 --graph_max_ctx 8192``).
"""

from __future__ import annotations

import argparse
import importlib.util
from functools import partial
from pathlib import Path

import torch

from benchmarks.quant_kernels import copy_bandwidth, time_calls, write_results

HQ, HKV, D, PAGE = 32, 8, 128, 64


def make_case(seqs: int, ctx: int, dtype: torch.dtype, copies: int) -> list[tuple]:
    pages = -(-ctx // PAGE)
    blocks = seqs * pages
    out = []
    for _ in range(copies):
        k = torch.randn(blocks, HKV, PAGE, D, device="cuda").to(dtype)
        v = torch.randn(blocks, HKV, PAGE, D, device="cuda").to(dtype)
        table = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(seqs, pages)
        out.append((k, v, table))
    return out


def load_kernels(path: Path):
    """The attention kernel module in ``path`` (an earlier version of kiln's), imported under
    a name of its own."""
    spec = importlib.util.spec_from_file_location("attention_kernels_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--seqs", type=int, default=512)
    parser.add_argument("--ctx", default="1040,2000", help="context lengths (comma-separated)")
    parser.add_argument("--configs", default="1x3x32,1x4x32,2x3,2x3x32,4x2,4x3",
                        help="the quantized caches' sweep: "
                             "WARPSxSTAGES[xKEYS per tile[xMAX REGISTERS]]")
    parser.add_argument("--bf16_configs", default="",
                        help="the bf16 cache's sweep, the same form (default: its default config)")
    parser.add_argument("--graph_max_ctx", type=int, default=None,
                        help="size the grid for this many keys, as a CUDA graph does")
    parser.add_argument("--before", type=Path, default=None,
                        help="an earlier triton_kernels.py of kiln's attention, timed beside it")
    args = parser.parse_args()
    if args.before is not None and not args.before.is_file():
        parser.error(f"--before {args.before}: no such file")
    try:
        configs = [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
        bf16_configs = [tuple(map(int, c.split("x"))) for c in args.bf16_configs.split(",") if c]
        contexts = [int(c) for c in args.ctx.split(",")]
    except ValueError:
        parser.error(f"--configs takes WARPSxSTAGES[xKEYS] items and --ctx integers, "
                     f"comma-separated; found {args.configs!r} and {args.ctx!r}")
    if any(len(c) not in (2, 3, 4) for c in configs + bf16_configs) or min(contexts) < 1 \
            or args.seqs < 1 or (args.graph_max_ctx or max(contexts)) < max(contexts):
        parser.error("--configs items are WARPSxSTAGES[xKEYS[xMAXREGISTERS]]; --ctx and --seqs "
                     "positive; --graph_max_ctx at least the longest --ctx")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: torch sees none (torch.cuda.is_available() is False)")
    from kiln.plugins.attention.triton_kernels import decode_config, paged_decode_attention
    before = load_kernels(args.before).paged_decode_attention if args.before else None
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy:.2f} TB/s (read + write)")
    results = []
    q = torch.randn(args.seqs, HQ, D, device="cuda", dtype=torch.bfloat16)
    rows = torch.arange(args.seqs, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    scales = dict(k_scale=torch.tensor(0.02, device="cuda"),
                  v_scale=torch.tensor(0.01, device="cuda"))
    for ctx in contexts:
        lens = torch.full((args.seqs,), ctx, device="cuda", dtype=torch.int32)
        base = None
        for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.int8):
            quant = scales if dtype != torch.bfloat16 else {}
            read = 2 * args.seqs * ctx * HKV * D * dtype.itemsize
            cases = make_case(args.seqs, ctx, dtype, copies=2 if read > 2e9 else 3)
            default = decode_config(2, 16, D, 1)  # the bf16 cache's, unsplit (512 sequences)
            sweep = configs if quant else bf16_configs or [default]
            for config in [None] if args.graph_max_ctx else sweep:
                sec, sec_before = (
                    time_calls([partial(kernel, q, c[0], c[1], c[2], lens, rows, out,
                                        scale=D ** -0.5, max_ctx_len=args.graph_max_ctx or ctx,
                                        config=config, **quant)
                                for c in cases]) if kernel else None
                    for kernel in (paged_decode_attention, before))
                base = base or sec
                row = dict(cache=str(dtype).removeprefix("torch."), seqs=args.seqs, ctx=ctx,
                           config=list(config) if config else "default",
                           grid_ctx=args.graph_max_ctx or ctx, us=sec * 1e6, tbps=read / sec / 1e12,
                           of_copy=read / sec / 1e12 / copy, vs_bf16=base / sec)
                if sec_before is not None:
                    row["before_us"], row["vs_before"] = sec_before * 1e6, sec_before / sec
                results.append(row)
                print(f"{row['cache']:14} ctx {ctx:5} {config}: {row['us']:8.1f} us "
                      f"{row['tbps']:5.2f} TB/s ({row['of_copy']:.0%} of copy), "
                      f"{row['vs_bf16']:.2f}x the bf16 cache" + (
                          f", {row['before_us']:.1f} us before ({row['vs_before']:.2f}x)"
                          if before is not None else ""), flush=True)
            del cases
            torch.cuda.empty_cache()
    write_results(args.out / "decode_attention_results.json", results, copy)


if __name__ == "__main__":
    main()
