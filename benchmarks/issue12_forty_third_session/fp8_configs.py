"""The FP8 GEMV's configs inside the decode graph, with the weight rows first out of the caches.

    PYTHONPATH=. python3 benchmarks/issue12_forty_third_session/fp8_configs.py --out DIR
        [--sets "gate_up=16,512,4,4,0;qkv=...|..."]   (a CUDA GPU; writes DIR/fp8_configs.json)

Batch-1 FP8 through EngineCore (``batch1_timeline.engine_batch1``), the random 8B weights
quantized once; each set of configs (``|``-separated; ``shape=BLOCK_N,BLOCK_K,warps,stages,
early`` with ``;`` between shapes, the others at ``w8_gemv_config``'s) gets a fresh executor,
whose decode graphs are captured with it. The committed configs run first and last, so that a
drift of the machine shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from benchmarks import gpu
from benchmarks.issue12_tenth_pass import batch1_timeline as bt
from kiln.engine import BuildLimits
from kiln.plugins.quant_linear import triton_kernels as tk
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096),
          "o": (4096, 4096)}
SETS = ("|gate_up=16,512,4,4,0|gate_up=32,512,4,3,0|gate_up=64,256,8,4,0|gate_up=16,256,4,4,0"
        "|gate_up=32,256,4,3,0|gate_up=32,256,8,4,0|gate_up=64,128,4,4,0"
        "|qkv=16,512,4,3,0|qkv=8,1024,4,4,0|qkv=4,2048,4,3,0|qkv=8,2048,8,3,0"
        "|down=8,1024,4,3,1|down=16,1024,8,3,1|down=4,2048,4,3,1|down=8,2048,8,4,1"
        "|o=8,1024,4,3,1|o=4,1024,4,3,1|o=2,2048,4,3,1|")


def parse(text: str) -> dict[tuple[int, int], tuple[int, ...]]:
    configs = {}
    for item in filter(None, text.split(";")):
        name, values = item.split("=")
        configs[SHAPES[name]] = tuple(int(v) for v in values.split(","))
    return configs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sets", default=SETS)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--limit_s", type=float, default=240.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    committed = tk.w8_gemv_config
    bt._trace = lambda ex, prompt: None  # no profiler here
    config = gpu.llama31_8b()
    tensors = gpu.random_weights(config, torch.device("cuda"), torch.bfloat16)
    limits = BuildLimits(max_batch_size=8, max_input_len=2048, max_seq_len=4096,
                         max_num_tokens=8192)
    options = TorchExecutorOptions(kv_cache_free_gpu_memory_fraction=0.5)
    packed, transposed, quant = bt.format_weights("fp8", config, tensors, limits, options, {})
    del tensors
    started = time.perf_counter()
    runs = []
    for text in args.sets.split("|"):
        if time.perf_counter() - started > args.limit_s:
            print(f"stopped before {text!r}: past {args.limit_s} s", flush=True)
            break
        override = parse(text)
        tk.w8_gemv_config = lambda n, k, o=override: o.get((n, k)) or committed(n, k)
        try:
            ex = TorchExecutor(config, packed, limits, transposed=transposed, device="cuda",
                               options=options, quant=quant)
            r, _ = bt.engine_batch1(ex, args.tokens)
            r["replay_us"] = bt.replay_us(ex)
        except Exception as e:  # a config the epilogue cannot take: say so, go on
            print(f"{text!r} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        r["set"] = text or "committed"
        runs.append(r)
        print(f"{r['set']:24s} {r['tok_s']:.2f} tok/s, step {r['step_us_median']:.1f} us, "
              f"replay {r['replay_us']:.1f} us", flush=True)
        ex.close()
        del ex
        torch.cuda.empty_cache()
    (args.out / "fp8_configs.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
