"""Time every quantized-projection kernel path against bf16 F.linear on Llama-3.1-8B shapes.

    PYTHONPATH=. python3 benchmarks/quant_kernels.py --out DIR  (a CUDA GPU; writes
    DIR/quant_kernels_results.json)

Each case is a CUDA graph of calls cycling over enough weight copies (>= 3x the L2) that every
call streams its weight from HBM, as decode steps do; the time per call is the median over
graph replays. Effective TB/s = (weight + scale bytes) / time; TFLOP/s = 2 M N K / time. The
"sweep" entries time GEMV and GEMM block configurations (what the config tables in
kiln/plugins/quant_linear/triton_kernels.py were picked from).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
MS = (1, 4, 16, 64, 256, 2048)
GROUPS = (128, 64)
GEMV_SWEEP = [(4, 1024, 4, 3), (8, 1024, 4, 3), (8, 512, 4, 4), (16, 512, 4, 3),
              (16, 1024, 8, 3), (4, 2048, 4, 3), (32, 256, 4, 4), (2, 2048, 4, 3),
              (8, 2048, 8, 3)]
BF16_GEMV_SWEEP = [(2, 1024, 4, 3), (4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 3),
                   (16, 256, 4, 4), (16, 512, 4, 3), (4, 2048, 8, 3)]
INT4_GEMV_SWEEP = [(4, 512, 4, 3), (8, 512, 4, 3), (8, 256, 4, 4), (16, 256, 4, 3),
                   (16, 512, 8, 3), (32, 128, 4, 4), (4, 1024, 4, 3), (8, 1024, 8, 3)]
# (BLOCK_N, BLOCK_M, groups per iteration, num_warps, num_stages, splits); M = BLOCK_M
INT4_MMA_SWEEP = [(16, 8, 1, 1, 8, 1), (16, 8, 2, 1, 4, 1), (32, 8, 1, 2, 8, 1),
                  (32, 8, 2, 2, 4, 1), (64, 8, 2, 4, 4, 1), (16, 16, 2, 1, 4, 1),
                  (32, 16, 2, 2, 4, 1), (64, 16, 2, 4, 4, 1),
                  (32, 8, 2, 2, 4, 2), (32, 8, 2, 2, 4, 4), (32, 8, 2, 2, 4, 8),
                  (16, 8, 2, 1, 4, 4), (16, 8, 2, 1, 4, 8), (64, 8, 2, 4, 4, 4),
                  (64, 8, 2, 4, 4, 8), (32, 8, 1, 2, 8, 4), (128, 8, 2, 8, 3, 8),
                  (32, 16, 2, 2, 4, 2), (32, 16, 2, 2, 4, 4), (64, 16, 2, 4, 4, 4)]
GEMM_SWEEP = {16: [(64, 16, 128, 4, 4), (64, 16, 256, 4, 4), (32, 16, 256, 4, 4),
                   (128, 16, 128, 4, 3)],
              2048: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
                     (256, 128, 64, 8, 3)]}


def time_calls(fns: list, replays: int = 7) -> float:
    """Median seconds per call of a CUDA graph running each fn of ``fns`` once (after warm-up)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(fns))
    del graph
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, math.ceil(3 * l2 / nbytes))


def fragment_copies(n: int, k: int, group: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(INT4 words in the MMA fragment layout, float32 group scales) of random ``[n, k]``
    weights, enough copies to miss L2 (:func:`copies_for`), seeded."""
    from kiln.plugins.quant_linear.layout import pack_fragments
    torch.manual_seed(0)
    copies = []
    for _ in range(copies_for(n * k // 2)):
        q = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
        copies.append((pack_fragments(q), torch.rand(n, k // group, device="cuda") / 100 + 1e-3))
        del q
    return copies


def make_weights(fmt: str, n: int, k: int, group: int, copies: int) -> list[tuple]:
    """(weight, scale) copies in the engine layouts; random bytes (values don't change speed)."""
    out = []
    for _ in range(copies):
        if fmt == "bf16":
            out.append((torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5,))
        elif fmt == "fp8":
            w = (torch.randn(n, k, device="cuda") * 100).to(torch.float8_e4m3fn)
            out.append((w, torch.rand(n, device="cuda") / 1000))
        elif fmt == "int4":
            w = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
            out.append((w, torch.rand(n, k // group, device="cuda") / 100))
        else:
            w = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
            out.append((w, torch.rand(n, device="cuda") / 1000))
    return out


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def calls(fmt: str, path: str, x: torch.Tensor, weights, group: int, config=None,
          dynamic: bool = False) -> list:
    from kiln.plugins.quant_linear.triton_kernels import PATHS
    s = None if dynamic else torch.tensor([0.01], device="cuda")
    if fmt == "bf16" and path == "gemv":  # kiln's bf16 batch-1 path (kiln.plugins.gemv)
        from kiln.plugins.gemv.triton_kernels import gemv
        return [lambda w=w: gemv(x, w[0], config=config) for w in weights]
    if fmt == "bf16":
        return [lambda w=w: F.linear(x, w[0]) for w in weights]
    if fmt == "int4":
        fn = PATHS["int4_weight_only_linear"][path]
        return [lambda w=w: fn(x, w[0], w[1], group, None, config) for w in weights]
    if fmt == "int8_wo":
        fn = PATHS["int8_weight_only_linear"][path]
        return [lambda w=w: fn(x, w[0], w[1], None, config) for w in weights]
    fn = PATHS["fp8_linear" if fmt == "fp8" else "int8_w8a8_linear"][path]
    return [lambda w=w: fn(x, w[0], w[1], s, None, config) for w in weights]


def paths_at(fmt: str, m: int) -> list[str]:
    if fmt == "bf16":
        return ["cublas", "gemv"] if m == 1 else ["cublas"]
    first = ["gemv"] if m == 1 else []
    if fmt == "fp8":
        return first + ["triton", "scaled_mm"] if m > 1 else first
    if fmt == "int8_sq":
        return first + (["triton"] if m > 1 else []) + (["int_mm"] if m > 16 else [])
    if fmt == "int4" and m <= 16:
        return first + ["mma"] + (["triton"] if m > 1 else [])
    return first if m == 1 else ["triton", "dequant"]


def record(results, fmt, path, name, n, k, m, group, weights, sec, **extra):
    wbytes = nbytes(weights[0])
    row = dict(format=fmt, path=path, shape=name, n=n, k=k, m=m, group=group, us=sec * 1e6,
               tbps=wbytes / sec / 1e12, tflops=2 * m * n * k / sec / 1e12, **extra)
    results.append(row)
    print(f"{fmt:8} {path:12} {name:8} M={m:<5} g={group or '-':<4} {row['us']:9.1f} us "
          f"{row['tbps']:6.2f} TB/s {row['tflops']:7.1f} TFLOP/s {extra or ''}", flush=True)


FORMATS = ("bf16", "fp8", "int8_sq", "int8_wo", "int4")


def main_cases(results, ms=MS, formats=FORMATS):
    for name, (n, k) in SHAPES.items():
        for fmt, group in [("bf16", 0), ("fp8", 0), ("int8_sq", 0), ("int8_wo", 0),
                           ("int4", 128), ("int4", 64)]:
            if fmt not in formats:
                continue
            probe = make_weights(fmt, n, k, group or 128, 1)
            weights = probe + make_weights(fmt, n, k, group or 128,
                                           copies_for(nbytes(probe[0])) - 1)
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for path in paths_at(fmt, m):
                    sec = time_calls(calls(fmt, path, x, weights, group))
                    record(results, fmt, path, name, n, k, m, group, weights, sec)
                if fmt == "fp8" and m == 1:
                    sec = time_calls(calls(fmt, "gemv", x, weights, group, dynamic=True))
                    record(results, fmt, "gemv_dynamic", name, n, k, m, group, weights, sec)
            del weights, probe
            torch.cuda.empty_cache()


def sweeps(results, formats=FORMATS):
    for name, (n, k) in SHAPES.items():
        for fmt, sweep in [("bf16", BF16_GEMV_SWEEP), ("fp8", GEMV_SWEEP), ("int8_wo", GEMV_SWEEP),
                           ("int4", INT4_GEMV_SWEEP)]:
            if fmt not in formats:
                continue
            weights = make_weights(fmt, n, k, 128, 1)
            weights += make_weights(fmt, n, k, 128, copies_for(nbytes(weights[0])) - 1)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            for config in sweep:
                sec = time_calls(calls(fmt, "gemv", x, weights, 128, config))
                record(results, fmt, "sweep_gemv", name, n, k, 1, 128, weights, sec,
                       config=list(config))
            if fmt == "int4":
                for config in INT4_MMA_SWEEP:
                    m = 1 if config[1] == 8 else 16
                    if config[1] == 8 and config[5] == 1 and config != (32, 8, 2, 2, 4, 1):
                        continue  # unsplit M = 1 tiles: swept before (the default kept)
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    sec = time_calls(calls(fmt, "mma", x, weights, 128, config))
                    record(results, fmt, "sweep_mma", name, n, k, m, 128, weights, sec,
                           config=list(config))
            if name == "gate_up" and fmt != "bf16":
                for m, configs in GEMM_SWEEP.items():
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    for config in configs:
                        sec = time_calls(calls(fmt, "triton", x, weights, 128, config))
                        record(results, fmt, "sweep_gemm", name, n, k, m, 128, weights, sec,
                               config=list(config))
            del weights
            torch.cuda.empty_cache()


def copy_bandwidth() -> float:
    a = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    sec = time_calls([lambda: b.copy_(a)] * 10)
    return 2 * a.numel() / sec / 1e12


def write_results(path: Path, results: list[dict], copy_tbps: float) -> None:
    """The results JSON: the rows beside the device, versions and copy rate they came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, copy_tbps=copy_tbps)
    path.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--ms", default=",".join(map(str, MS)),
                        help="token counts of the main cases (comma-separated)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"formats to time (comma-separated, from {FORMATS})")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: torch sees none (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    results: list[dict] = []
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy:.2f} TB/s (read + write)")
    formats = tuple(args.formats.split(","))
    main_cases(results, [int(m) for m in args.ms.split(",")], formats)
    if not args.no_sweep:
        sweeps(results, formats)
    write_results(args.out / "quant_kernels_results.json", results, copy)


if __name__ == "__main__":
    main()
