"""Conversion benchmark: a synthetic Llama checkpoint of >= 4 GB, converted in a child process.

Prints wall time, throughput (source MB / s) and the child's peak RSS for each split asked
for. The goals (on a 2-core, 24 GB machine): peak RSS under 1.5 GB, at least 300 MB/s.

    python benchmarks/convert.py                      # 9 layers of Llama-3-8B width, bf16 (~4.5 GB)
    python benchmarks/convert.py --layers 4 --tp 1 2  # quicker

The synthetic model is written tensor by tensor (never whole in memory) as two safetensors
shards, like a hub checkpoint. Whether the OS page cache still holds the source when the
conversion reads it is reported: the script tries to drop it first (needs root).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kiln.tensorio import StreamingWriter

HIDDEN, HEADS, KV_HEADS, MLP, VOCAB = 4096, 32, 8, 14336, 32000


def synthetic_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    d = HIDDEN // HEADS
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.input_layernorm.weight", (HIDDEN,)),
                   (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
                   (f"{p}.self_attn.k_proj.weight", (KV_HEADS * d, HIDDEN)),
                   (f"{p}.self_attn.v_proj.weight", (KV_HEADS * d, HIDDEN)),
                   (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                   (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
                   (f"{p}.mlp.gate_proj.weight", (MLP, HIDDEN)),
                   (f"{p}.mlp.up_proj.weight", (MLP, HIDDEN)),
                   (f"{p}.mlp.down_proj.weight", (HIDDEN, MLP))]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_synthetic(path: Path, layers: int) -> int:
    """Write the HF checkpoint (two shards, bf16); returns its weight bytes."""
    path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
              "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": layers,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(config))
    tensors = synthetic_tensors(layers)
    half = len(tensors) // 2
    total = 0
    for k, part in enumerate((tensors[:half], tensors[half:])):
        writer = StreamingWriter(path / f"model-{k + 1:05d}-of-00002.safetensors",
                                 [(n, torch.bfloat16, s) for n, s in part])
        for name, shape in part:
            t = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02)
            writer.write(name, t)
            total += t.numel() * 2
        writer.close()
    return total


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


_CHILD = """
import resource, sys, time
from kiln.cli.main import main
started = time.perf_counter()
try:
    main(sys.argv[1:], prog_name="kiln", standalone_mode=False)
finally:
    print("convert_s", time.perf_counter() - started)
    print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def convert_once(src: Path, out: Path, tp: int, dtype: str) -> tuple[float, float, float]:
    """Run the CLI in a child process: (process wall s, conversion s after imports, peak RSS MB).

    The two times differ by interpreter start-up and imports (torch), which are slow after
    the page cache was dropped.
    """
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, "-q", "convert_checkpoint",
                           "--model_dir", str(src), "--output_dir", str(out),
                           "--tp_size", str(tp), "--dtype", dtype],
                          check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    convert_s = float(proc.stdout.split("convert_s")[-1].split()[0])
    peak_kb = int(proc.stdout.split("peak_rss_kb")[-1])
    return wall, convert_s, peak_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "hf"
        started = time.perf_counter()
        size = write_synthetic(src, args.layers)
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s")
        rows = []
        for tp in args.tp:
            cold = drop_page_cache()
            wall, conv, peak = convert_once(src, Path(tmp) / f"out-tp{tp}", tp, args.dtype)
            rows.append((tp, wall, conv, size / 1e6 / conv, peak, "cold" if cold else "warm"))
            subprocess.run(["rm", "-rf", str(Path(tmp) / f"out-tp{tp}")], check=True)
    print(f"\n{'tp':>3} {'process s':>10} {'convert s':>10} {'MB/s':>7} {'peak RSS MB':>12} "
          f"{'source cache':>13}")
    for tp, wall, conv, rate, peak, cache in rows:
        print(f"{tp:>3} {wall:>10.1f} {conv:>10.1f} {rate:>7.0f} {peak:>12.0f} {cache:>13}")
    print("MB/s = source bytes / convert s (after imports); goals: peak RSS < 1500 MB, >= 300 MB/s")


if __name__ == "__main__":
    main()
