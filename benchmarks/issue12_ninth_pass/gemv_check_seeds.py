"""The W8A8 GEMV tests' own check (``_check``: the kernel against the reference on the GEMV's
quantization rule) over 40 seeds of each Llama-8B shape, FP8 and INT8 SmoothQuant.

    PYTHONPATH=. python3 benchmarks/issue12_ninth_pass/gemv_check_seeds.py  (a CUDA GPU)
"""

import torch

from tests.plugins.test_quant_linear_triton import LLAMA_8B, _case, _check


def main() -> None:
    fails = runs = 0
    for seed in range(40):
        for fmt in ("fp8", "int8_sq"):
            for shape in LLAMA_8B:
                torch.manual_seed(seed)
                name, args = _case(fmt, *shape, 1, torch.bfloat16, torch.device("cuda"),
                                   static=fmt != "int8_sq" or seed % 2 == 0)
                runs += 1
                try:
                    _check(name, args, torch.bfloat16)
                except AssertionError as e:
                    fails += 1
                    print(fmt, shape, seed, str(e).splitlines()[:4])
    print(f"gemv seeds: {fails} failed of {runs}")


if __name__ == "__main__":
    main()
