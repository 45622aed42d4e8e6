"""INT4 weight-only projections, the engine's two layouts through ``int4_weight_only_linear``
(each picking its own path by M), Llama-3.1-8B shapes, group 128, bf16 activations:

    PYTHONPATH=. python3 benchmarks/issue12_twenty_seventh_session/int4_layouts.py --out DIR

- ``split``: the split-group layout (what 16-bit engines stored before the twenty-seventh
  session): GEMV / Triton tensor-core kernel / tiled GEMM / dequantize + cuBLAS;
- ``fragments``: the MMA fragment layout (its path choice), and each of its paths forced
  (``fragments_gluon`` up to 512 tokens, ``fragments_dequant``). run1 timed the Gluon kernel
  only to 64 tokens and an earlier dequantization (one word gathered per output); run2 a
  Triton GEMM on the words since removed (``fragments_gemm``: slower than run1's Gluon kernel
  at every shape and M up to 64 but gate_up at 64, 112 us against 126; 5.7x at one token)
  and a Gluon kernel whose scale pointer was recomputed each iteration (``o`` and ``down``
  50% slower at one token; not kept).

Each call is timed in a CUDA graph over enough weight copies to miss L2 (quant_kernels.py's
method); the largest difference of each from a float32 reference is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_kernels import copies_for, time_calls  # noqa: E402

from kiln.plugins.quant_linear.layout import pack_fragments, repack_int4  # noqa: E402
from kiln.plugins.quant_linear.triton_kernels import (  # noqa: E402
    PATHS,
    fragments_path,
    int4_path,
    int4_weight_only_linear,
)
from kiln.quantization.formats import pack_int4  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ms", default="1,4,8,16,32,64,128,512,2048")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    group = 128
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies, deq = [], None
        for _ in range(copies_for(n * k // 2)):
            q = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
            s = torch.rand(n, k // group, device="cuda") / 100 + 1e-3
            copies.append((s, repack_int4(pack_int4(q), group), pack_fragments(q)))
            if deq is None:  # the first copy's weight, for the reference
                deq = (q.float().view(n, k // group, group) * s[:, :, None]).view(n, k)
        s = copies[0][0]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ deq.T
            scale = want.abs().max().item()
            row = dict(shape=name, m=m)
            forced = [("gluon", "fragments", 512),
                      ("dequant", "fragments_dequant", m)]  # (label, path, up to M)
            for label, at, path in [("split", 1, None), ("fragments", 2, None)] + [
                    (f"fragments_{lbl}", 2, path) for lbl, path, most in forced if m <= most]:
                fn = (int4_weight_only_linear if path is None else
                      lambda x, w, s_, g, p=path: PATHS["int4_weight_only_linear"][p](
                          x, w, s_, g, None))
                y = fn(x, copies[0][at], s, group)
                sec = time_calls([lambda c=c, at=at, x=x, fn=fn: fn(x, c[at], c[0], group)
                                  for c in copies])
                row[f"{label}_us"] = sec * 1e6
                row[f"{label}_err_rel"] = (y.float() - want).abs().max().item() / scale
                row[f"{label}_finite"] = bool(torch.isfinite(y).all())
            row["split_path"] = int4_path(m, x.dtype, group, n, k)
            row["fragments_path"] = fragments_path(x)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del copies
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "int4_layouts.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), results=rows), indent=1))


if __name__ == "__main__":
    main()
