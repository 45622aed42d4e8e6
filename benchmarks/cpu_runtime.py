"""CPU runtime benchmark: kiln's onnx backend vs onnxruntime-genai, SmolLM2-135M-Instruct, float32.

Both run the same HF checkpoint (``kiln.testing.smollm2``) at the same precision on the same
cores. Every measurement runs in a fresh process (no thread pool of one runtime lingers beside
the other), and rounds interleave the runners so that load from other processes hits all of
them; kiln runs with its defaults (worker threads spin-wait, ONNX Runtime's default) and with
``--no_cpu_spin_wait``; onnxruntime-genai with its defaults and the same thread count:

- batch-1 decode tokens/s: one request, ``input_len`` prompt tokens, ``output_len`` new tokens
  (EOS ignored); tokens/s = (n - 1) / (time of last token - time of first token).
- throughput: ``concurrency`` requests of the same shape all queued at once; output tokens/s =
  all new tokens / (last token - start). kiln runs them through its in-flight batching
  scheduler (kiln.runtime.bench); onnxruntime-genai as one batch of the same size.

Prompts are the same random token ids for both. Engines are built once into ``--work_dir``:
kiln with ``kiln build --backend onnx`` (max_batch_size = concurrency, max_seq_len =
input_len + output_len), onnxruntime-genai with its model builder
(``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``). Needs ``pip install
onnxruntime-genai onnx_ir`` (the benchmark only; kiln does not depend on them).

Usage: ``python benchmarks/cpu_runtime.py [--rounds 3] [--json_output F]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("cpu_runtime")


def build_engines(work: Path, input_len: int, output_len: int, batch: int) -> tuple[Path, Path]:
    import kiln
    from kiln.builder import build
    from kiln.testing.smollm2 import smollm2_hf_dir

    hf = smollm2_hf_dir()
    kiln_engine = work / f"kiln-onnx-b{batch}-s{input_len + output_len}"
    if not (kiln_engine / "config.json").is_file():
        checkpoint = work / "kiln-checkpoint"
        if not (checkpoint / "config.json").is_file():
            kiln.convert_checkpoint(hf, checkpoint, dtype="float32", overwrite=True,
                                    progress=False)
        build(checkpoint, kiln_engine, backend="onnx", max_batch_size=batch,
              max_input_len=input_len, max_seq_len=input_len + output_len,
              max_num_tokens=batch * input_len, overwrite=True)
    genai = work / "genai-fp32-cpu"
    if not (genai / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                        "-o", str(genai), "-p", "fp32", "-e", "cpu", "-c",
                        str(work / "genai-cache")], check=True, stdout=subprocess.DEVNULL)
    return kiln_engine, genai


def set_genai_threads(genai: Path, threads: int) -> None:
    """Give onnxruntime-genai the same intra-op thread count as kiln."""
    path = genai / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=4))


class Kiln:
    def __init__(self, engine: Path, threads: int, spin: bool):
        from kiln.runtime import LLM, ExecutorOptions

        self.llm = LLM(engine, ExecutorOptions(device="cpu", num_threads=threads,
                                               cpu_spin_wait=spin))

    def decode_b1(self, prompt: list[int], output_len: int) -> float:
        from kiln.runtime import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        (result,) = self.llm.generate([prompt], params)
        return 1.0 / result.timings.tpot_s

    def throughput(self, prompts: list[list[int]], output_len: int) -> float:
        from kiln.runtime import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        start = time.perf_counter()
        results = self.llm.generate(prompts, params)
        end = max(r.timings.token_times[-1] for r in results)
        return sum(len(r.token_ids) for r in results) / (end - start)


class Genai:
    def __init__(self, model_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))

    def _run(self, prompts: list[list[int]], output_len: int) -> tuple[float, list[float]]:
        og = self.og
        total = len(prompts[0]) + output_len
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, batch_size=len(prompts),
                                  do_sample=False)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array(prompts, dtype=np.int32))
        times = []
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter())
        return start, times

    def decode_b1(self, prompt: list[int], output_len: int) -> float:
        _, times = self._run([prompt], output_len)
        return (len(times) - 1) / (times[-1] - times[0])

    def throughput(self, prompts: list[list[int]], output_len: int) -> float:
        start, times = self._run(prompts, output_len)
        return len(prompts) * len(times) / (times[-1] - start)


RUNNERS = ("kiln", "kiln --no_cpu_spin_wait", "onnxruntime-genai")


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints its figure as JSON."""
    work = Path(args.work_dir).expanduser()
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, 49000, size=(args.concurrency, args.input_len)).tolist()
    kiln_engine, genai_dir = build_engines(work, args.input_len, args.output_len,
                                           args.concurrency)
    if args.worker == "onnxruntime-genai":
        runner = Genai(genai_dir)
    else:
        runner = Kiln(kiln_engine, args.threads, spin="no_cpu_spin_wait" not in args.worker)
    runner.decode_b1(prompts[0], 8)  # warm-up: allocation and page-in
    if args.mode == "decode_b1_tokens_per_s":
        value = runner.decode_b1(prompts[args.round % len(prompts)], args.output_len)
    else:
        value = runner.throughput(prompts, args.output_len)
    print(json.dumps({"value": value}))


def measure(args: argparse.Namespace) -> dict:
    """Rounds of (every runner x both measurements), each in a fresh process, interleaved."""
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    _, genai_dir = build_engines(work, args.input_len, args.output_len, args.concurrency)
    set_genai_threads(genai_dir, args.threads)
    modes = ("decode_b1_tokens_per_s", "throughput_tokens_per_s")
    figures = {name: {mode: [] for mode in modes} for name in RUNNERS}
    load = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        for mode in modes:
            for name in RUNNERS:
                cmd = [sys.executable, __file__, "--worker", name, "--mode", mode,
                       "--round", str(round_), *_shared_flags(args)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                figures[name][mode].append(json.loads(out.strip().splitlines()[-1])["value"])
        load.append(os.getloadavg()[0])
        log.info("round %d: %s (load %.1f)", round_, {n: {k: round(v[-1], 2)
                                                       for k, v in f.items()}
                                                   for n, f in figures.items()}, load[-1])
    return {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "threads": args.threads,
            "input_len": args.input_len, "output_len": args.output_len,
            "concurrency": args.concurrency, "rounds": args.rounds, "load_average_1m": load,
            "runs": figures,
            "median": {n: {k: statistics.median(v) for k, v in f.items()}
                       for n, f in figures.items()},
            "median_ratio_to_genai": {
                n: {k: statistics.median(a / b for a, b in
                                         zip(v, figures["onnxruntime-genai"][k], strict=True))
                    for k, v in f.items()}
                for n, f in figures.items() if n != "onnxruntime-genai"}}


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--work_dir", str(args.work_dir), "--input_len", str(args.input_len),
            "--output_len", str(args.output_len), "--concurrency", str(args.concurrency),
            "--threads", str(args.threads)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default=os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")
                        + "/bench-cpu-runtime")
    parser.add_argument("--input_len", type=int, default=128)
    parser.add_argument("--output_len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json_output", type=Path)
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.worker else logging.INFO,
                        format="%(message)s")
    if args.worker:
        worker(args)
        return 0
    report = measure(args)
    med = report["median"]
    genai = "onnxruntime-genai"
    width = max(len(n) for n in RUNNERS) + 4
    print(f"{'median of ' + str(args.rounds) + ' rounds':<30}" + "".join(
        f"{name:>{width}}" for name in RUNNERS))
    for key, label in (("decode_b1_tokens_per_s", "batch-1 decode tokens/s"),
                       ("throughput_tokens_per_s",
                        f"{args.concurrency} x {args.input_len}/{args.output_len} tokens/s")):
        cells = [f"{med[n][key]:.2f}" + ("" if n == genai else
                                          f" ({med[n][key] / med[genai][key]:.2f}x)")
                 for n in RUNNERS]
        print(f"{label:<30}" + "".join(f"{c:>{width}}" for c in cells))
        # Each round runs the three back to back: the ratio within a round cancels the load
        # other processes put on the machine, which drifts between rounds.
        paired = [f"{report['median_ratio_to_genai'][n][key]:.2f}x" for n in RUNNERS
                  if n != genai]
        print(f"{'  median of per-round ratios':<30}" + "".join(f"{c:>{width}}" for c in paired))
    if args.json_output:
        args.json_output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
