"""The test's own check (_check: kernel vs the GEMV-rule reference) over many seeds, for the
one-token W8A8 GEMVs on Llama-8B shapes."""
import torch
from tests.plugins.test_quant_linear_triton import _case, _check, LLAMA_8B
fails = 0
runs = 0
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
