"""Benchmark: build a Llama-3.1-8B-shaped checkpoint (random float16 weights) with the
tensorrt backend for one target, and report wall time and peak RSS.

    python benchmarks/build_8b.py [--layers 32] [--target sm86] [--max_build_memory 18GB]

The kiln checkpoint (about 16 GB) is written once to ``--workdir`` and reused. The build runs
in a child process (``kiln build``) so its peak RSS is the build's own; the peak is sampled
over the child's process tree (workers included) and cross-checked with getrusage.
Goals (24 GB machine): peak RSS <= 20 GB, wall time < 3 minutes.

Measured on the 2-core / 24 GB development machine (TensorRT-RTX 1.7.1.116, target sm86, other
engineers' jobs running): 3 parts (layers 0-9, 10-21, 22-31), wall time 89.7 s, peak RSS
16.85 GB, engines 16.09 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from kiln.checkpoint import CONFIG_NAME, CheckpointConfig, rank_file
from kiln.config import DecoderConfig, Mapping, RopeScaling
from kiln.roles import expected_shape, parse_name, tensor_names
from kiln.tensorio import StreamingWriter

LLAMA_8B = dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                intermediate_size=14336, max_position_embeddings=131072, norm_eps=1e-5,
                rope_theta=500000.0,
                rope_scaling=RopeScaling(type="llama3", factor=8.0,
                                         original_max_position_embeddings=8192,
                                         low_freq_factor=1.0, high_freq_factor=4.0))


def make_checkpoint(out: Path, layers: int, vocab_size: int = LLAMA_8B["vocab_size"]) -> Path:
    """A kiln checkpoint of the 8B shape with ``layers`` layers, random float16 weights."""
    shape = {**LLAMA_8B, "num_layers": layers, "vocab_size": vocab_size}
    config = CheckpointConfig(decoder=DecoderConfig(**shape),
                              mapping=Mapping(), dtype="float16",
                              source={"benchmark": "random weights, Llama-3.1-8B shape"})
    if (out / CONFIG_NAME).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    names = tensor_names(config.decoder)
    shapes = {n: expected_shape(parse_name(n)[0], config.decoder) for n in names}
    writer = StreamingWriter(out / rank_file(0), [(n, torch.float16, shapes[n]) for n in names])
    generator = torch.Generator().manual_seed(0)
    for name in names:
        shape = shapes[name]
        for start in range(0, shape[0], 4096):  # row blocks: bounded memory
            rows = (min(shape[0], start + 4096) - start, *shape[1:])
            block = torch.randn(rows, generator=generator, dtype=torch.float32) * 0.02
            writer.write_rows(name, block.to(torch.float16), start)
    writer.close()
    (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out


def sample_peak(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Largest summed RSS of the process tree rooted at ``pid``."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs))
        except psutil.Error:  # a child that ended between the listing and the read
            pass
        time.sleep(0.1)


def run_build(ckpt: Path, engine: Path, args: argparse.Namespace) -> tuple[float, int, str]:
    command = [sys.executable, "-m", "kiln.cli.main", "-v", "build", "--checkpoint_dir",
               str(ckpt), "--output_dir", str(engine), "--backend", "tensorrt", "--target",
               args.target, "--max_build_memory", args.max_build_memory, "--workers",
               str(args.workers), "--max_batch_size", "8", "--max_input_len", "2048",
               "--max_seq_len", "4096", "--overwrite"]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=sample_peak, args=(child.pid, stop, peak), daemon=True)
    sampler.start()
    out, err = child.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    if child.returncode != 0:
        sys.exit(f"build failed ({child.returncode}):\n{err[-4000:]}")
    rusage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return wall, max(peak[0], rusage), err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--target", default="sm86")
    parser.add_argument("--max_build_memory", default="18GB")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-bench"))
    args = parser.parse_args()
    made = time.perf_counter()
    ckpt = make_checkpoint(args.workdir / f"llama8b-{args.layers}l-ckpt", args.layers)
    print(f"checkpoint {ckpt} ready in {time.perf_counter() - made:.1f} s", flush=True)
    wall, peak, log = run_build(ckpt, args.workdir / f"llama8b-{args.layers}l-engine", args)
    for line in log.splitlines():
        if "] rank" in line or line.startswith("built") or "parts of layers" in line:
            print(line)
    size = sum(p.stat().st_size for p in (args.workdir / f"llama8b-{args.layers}l-engine")
               .glob("*.engine"))
    print(f"build wall time {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB, engines "
          f"{size / 1e9:.2f} GB ({args.layers} layers, target {args.target}, "
          f"--max_build_memory {args.max_build_memory}, --workers {args.workers})")


if __name__ == "__main__":
    main()
