"""One graph step of kiln's onnx engine vs onnxruntime-genai's model, interleaved, on the CPU.

Where benchmarks/cpu_runtime.py times whole generations, this times the ONNX Runtime call
alone: both graphs (built by cpu_runtime.py's ``build_engines`` into the same work dir) run in
one process with the same session options, caches bound in place as both runtimes bind them,
alternating in rounds so that load from other processes hits both alike. Steps: a batch-1
decode and a batch-16 decode at ``past`` cached tokens, and a 16 x 128 prefill.

Usage: ``python benchmarks/cpu_graph_step.py [--rounds 10] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cpu_runtime import build_engines  # noqa: E402

KV_HEADS, HEAD_DIM = 3, 64  # SmolLM2-135M


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bind_caches(sess, binding, batch: int, smax: int, present: dict[str, str]):
    """Each cache input (a key of ``present``'s prefixes) bound as its own output too."""
    import onnxruntime as ort

    for value in sess.get_inputs():
        for past_prefix, present_prefix in present.items():
            if value.name.startswith(past_prefix):
                cache = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((batch, KV_HEADS, smax, HEAD_DIM), np.float32))
                binding.bind_ortvalue_input(value.name, cache)
                binding.bind_ortvalue_output(value.name.replace(past_prefix, present_prefix, 1),
                                             cache)


def kiln_step(sess, batch: int, seq: int, past: int, smax: int):
    binding = sess.io_binding()
    binding.bind_cpu_input("input_ids", np.full((batch, seq), 100, np.int64))
    binding.bind_cpu_input("position_ids", np.tile(np.arange(past, past + seq), (batch, 1)))
    binding.bind_cpu_input("past_len", np.full(batch, past, np.int64))
    binding.bind_cpu_input("last_index", np.full(batch, seq - 1, np.int64))
    binding.bind_output("logits")
    bind_caches(sess, binding, batch, smax,
                {"past_key_": "present_key_", "past_value_": "present_value_"})
    return binding


def genai_step(sess, batch: int, seq: int, past: int, smax: int):
    binding = sess.io_binding()
    binding.bind_cpu_input("input_ids", np.full((batch, seq), 100, np.int64))
    binding.bind_cpu_input("attention_mask", np.ones((batch, past + seq), np.int64))
    binding.bind_output("logits")
    bind_caches(sess, binding, batch, smax, {"past_key_values": "present"})
    return binding


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default=os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")
                        + "/bench-cpu-runtime")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--past", type=int, default=128)
    args = parser.parse_args()
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    kiln_dir, genai_dir = build_engines(work, 128, 128, 16)
    smax = 256
    graphs = {"kiln": (session(kiln_dir / "rank0.onnx", args.threads), kiln_step),
              "onnxruntime-genai": (session(genai_dir / "model.onnx", args.threads), genai_step)}
    steps = {"decode b1": (1, 1, args.past, 10), "decode b16": (16, 1, args.past, 5),
             "prefill 16 x 128": (16, 128, 0, 1)}
    print(f"{'ms per step, median of ' + str(args.rounds):<28}" +
          "".join(f"{n:>20}" for n in graphs) + f"{'ratio':>10}")
    for label, (batch, seq, past, repeat) in steps.items():
        runs = {}
        for name, (sess, make) in graphs.items():
            binding = make(sess, batch, seq, past, smax)
            sess.run_with_iobinding(binding)  # warm-up: prepacking, allocations
            runs[name] = (sess, binding)
        times = {name: [] for name in graphs}
        for _ in range(args.rounds):
            for name, (sess, binding) in runs.items():
                start = time.perf_counter()
                for _ in range(repeat):
                    sess.run_with_iobinding(binding)
                times[name].append((time.perf_counter() - start) / repeat * 1e3)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"{label:<28}" + "".join(f"{med[n]:>20.2f}" for n in graphs) +
              f"{med['onnxruntime-genai'] / med['kiln']:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
