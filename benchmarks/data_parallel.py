"""Issue 15, step 3: ``--dp N`` of a Llama-3.1-8B-shaped tp-1 torch engine against one replica.

    PYTHONPATH=. python3 benchmarks/data_parallel.py --out DIR [--dp 2] [--workdir /tmp/kiln-dp]
        [--requests 1024] [--input_len 128] [--output_len 128] [--device cuda|cpu]
        [--layers 32] [--vocab_size 128256]      (writes DIR/data_parallel_results.json)

A kiln checkpoint of the 8B shape with random weights (benchmarks/build_8b.py's, ~16 GB,
written once under ``--workdir``), built once as a bf16 torch engine (``kiln build``), then
benchmarked by ``kiln bench`` twice on the same workload, all requests queued at once: one
replica, then ``--dp`` replicas (one process and one GPU each). Prints output tokens/s of both,
their ratio, and the goal (issue 15: at least 1.9x for 2 replicas, i.e. 95% of linear).
Everything goes through the CLI a user runs, in child processes, so each run's replicas start
fresh. ``--device cpu --layers 2 --vocab_size 1000 --requests 8 --input_len 16 --output_len 8``
checks the script on a machine without GPUs (the torch engine's reference kernels; no speed-up expected
on shared cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.build_8b import LLAMA_8B, make_checkpoint
from kiln.engine.manifest import MANIFEST_NAME

GOAL_PER_REPLICA = 0.95  # 1.9x at 2 replicas


def add_tokenizer(ckpt: Path, vocab_size: int) -> None:
    """A word-level tokenizer of ``vocab_size`` tokens (``kiln bench`` opens the engine's
    tokenizer; its prompts are random token ids)."""
    if (ckpt / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()  # joins tokens with spaces
    tokenizer.save(str(ckpt / "tokenizer.json"))


def kiln(*args: str) -> None:
    command = [sys.executable, "-m", "kiln.cli.main", *args]
    print("$ kiln", " ".join(args), flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.exit(f"kiln {args[0]} failed ({done.returncode}):\n{done.stdout[-4000:]}")


def bench(engine: Path, dp: int, args: argparse.Namespace, out: Path) -> dict:
    report = out / f"bench_dp{dp}.json"
    started = time.perf_counter()
    kiln("bench", "--engine_dir", str(engine), "--device", args.device, "--dp", str(dp),
         "--input_len", str(args.input_len), "--output_len", str(args.output_len),
         "--num_requests", str(args.requests), "--warmup", "1",
         "--kv_cache_free_gpu_memory_fraction", "0.9", "--json_output", str(report))
    data = json.loads(report.read_text())
    data["wall_s"] = time.perf_counter() - started
    print(f"dp {dp}: {data['output_tokens_per_s']:.0f} output tok/s", flush=True)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-dp"))
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--input_len", type=int, default=128)
    parser.add_argument("--output_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab_size", type=int, default=LLAMA_8B["vocab_size"])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.dp < 2:
        parser.error(f"--dp is {args.dp}; it must be at least 2 (one replica is the baseline)")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"llama8b-{args.layers}l-v{args.vocab_size}"
    ckpt = make_checkpoint(args.workdir / f"{name}-ckpt", args.layers, args.vocab_size)
    add_tokenizer(ckpt, args.vocab_size)
    engine = args.workdir / (f"{name}-torch-bf16-b{args.requests}-i{args.input_len}"
                             f"-o{args.output_len}")
    if not (engine / MANIFEST_NAME).is_file():  # built once per shape and limits
        kiln("build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), "--backend",
             "torch", "--dtype", "bfloat16", "--max_batch_size", str(args.requests),
             "--max_input_len", str(args.input_len),
             "--max_seq_len", str(args.input_len + args.output_len),
             "--max_num_tokens", str(max(8192, args.input_len)), "--overwrite")
    one = bench(engine, 1, args, args.out)
    many = bench(engine, args.dp, args, args.out)
    ratio = many["output_tokens_per_s"] / one["output_tokens_per_s"]
    goal = GOAL_PER_REPLICA * args.dp
    print(f"--dp {args.dp} / --dp 1: {ratio:.2f}x (goal >= {goal:.2f}x): "
          f"{'MET' if ratio >= goal else 'MISSED'}", flush=True)
    results = dict(command=" ".join(sys.argv), dp=args.dp, requests=args.requests,
                   input_len=args.input_len, output_len=args.output_len, layers=args.layers,
                   device=args.device, dp1=one, dpN=many, ratio=ratio, goal=goal)
    (args.out / "data_parallel_results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
