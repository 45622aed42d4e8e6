"""The one-token FP8 GEMV against float32 and float64 references over seeds (Llama-8B shapes):
why ``test_llama_8b_shapes[fp8-(4096, 14336)-1]`` failed once.

    PYTHONPATH=. OUT=DIR python3 benchmarks/issue12_ninth_pass/fp8_gemv_probe.py  (a CUDA GPU)

Per call: the kernel's largest distance from the float32 reference (``k_vs_32``), from the
float64 product of the reference's quantized x (``k_vs_64``) and from the float64 product of x
quantized by the GEMV's rule, ``x * (1 / s)`` (``k_vs_64k``); ``q_diff``: activations the two
rules round differently. Writes DIR/fp8_gemv_probe.json.
"""

import json
import os

import torch

from kiln.plugins.quant_linear import triton_kernels as kernels
from kiln.plugins.quant_linear import triton_reference as ref
from tests.gpu.support import TOLERANCE
from tests.plugins.test_quant_linear_triton import _case


def probe(seed: int, shape: tuple[int, int]) -> dict:
    torch.manual_seed(seed)
    _, args = _case("fp8", *shape, 1, torch.bfloat16, torch.device("cuda"))
    x, q, ws, s, _ = args
    got, again = kernels.fp8_linear(*args), kernels.fp8_linear(*args)
    want = ref.fp8_linear(*args)
    q_ref, _ = ref.quantize_fp8_input(x, s)
    q_gemv = (x.float() * (1.0 / s.float())).clamp(-448, 448).to(torch.float8_e4m3fn)
    w64 = q.double() * ws.double().reshape(-1, 1)
    y64 = (q_ref.double() * s.double()) @ w64.T
    y64_gemv = (q_gemv.double() * s.double()) @ w64.T
    atol, rtol = TOLERANCE[torch.bfloat16]
    bad = (got.float() - want.float()).abs() > atol + rtol * want.float().abs()
    return dict(seed=seed, shape=shape, deterministic=bool(torch.equal(got, again)),
                bad=int(bad.sum()), k_vs_32=(got.float() - want.float()).abs().max().item(),
                r32_vs_64=(want.double() - y64).abs().max().item(),
                k_vs_64=(got.double() - y64).abs().max().item(),
                k_vs_64k=(got.double() - y64_gemv).abs().max().item(),
                q_diff=int((q_ref.float() != q_gemv.float()).sum()),
                nonfinite=int((~torch.isfinite(got)).sum()))


def main() -> None:
    rows = [probe(seed, shape) for seed in range(60) for shape in [(4096, 14336), (28672, 4096)]]
    print(f"calls past the test's tolerance: {sum(r['bad'] > 0 for r in rows)} of {len(rows)}")
    for key in ("k_vs_64", "r32_vs_64", "k_vs_64k"):
        print(f"max {key}: {max(r[key] for r in rows):.4f}")
    print(f"activations rounded apart: {sum(r['q_diff'] for r in rows)}")
    with open(os.path.join(os.environ.get("OUT", "."), "fp8_gemv_probe.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
