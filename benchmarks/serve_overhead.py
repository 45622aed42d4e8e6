"""The overhead of ``kiln serve``: the same workload through the HTTP server (``kiln
bench_serve``, streamed completions) and in-process (``kiln bench``), same engine, same run.

Default shape (issue 13's CPU goal): SmolLM2-135M-Instruct float32 onnx engine, 32 requests of
64 random prompt tokens / 64 output tokens (ignore_eos), all sent at once, 16 in flight at most.
Rounds alternate: in-process ``kiln bench`` (no server running), then ``kiln serve`` started,
``kiln bench_serve`` against it, the server stopped; the client runs in its own process on the
same machine. Prints the medians of the rounds beside the goal (server output tokens/s >= 95%
of in-process) and writes benchmarks/serve_overhead_results.json.

    python benchmarks/serve_overhead.py [--rounds 3] [--work_dir ~/.cache/kiln]

On a GPU machine (issue 13's GPU goal, same >= 95%): ``--gpu_8b`` makes a Llama-3.1-8B-shaped
bfloat16 torch engine with random weights in ``--work_dir`` and measures that instead. Its
vocabulary is SmolLM2's (49,152 tokens, ``--tokenizer_dir``, default the SmolLM2 fixture) so
that the server has a real tokenizer to detokenize with; the 8B model's other shapes are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

GOAL = 0.95
HERE = Path(__file__).resolve().parent


def build_engine(work: Path, input_len: int, output_len: int, batch: int) -> Path:
    import kiln
    from kiln.builder import build
    from kiln.testing.smollm2 import smollm2_hf_dir

    engine = work / f"kiln-onnx-b{batch}-s{input_len + output_len}"  # as cpu_runtime.py's
    if not (engine / "config.json").is_file():
        checkpoint = work / "kiln-checkpoint"
        if not (checkpoint / "config.json").is_file():
            kiln.convert_checkpoint(smollm2_hf_dir(), checkpoint, dtype="float32",
                                    overwrite=True, progress=False)
        build(checkpoint, engine, backend="onnx", max_batch_size=batch,
              max_input_len=input_len, max_seq_len=input_len + output_len,
              max_num_tokens=batch * input_len, overwrite=True)
    return engine


def build_gpu_8b(work: Path, tokenizer_dir: Path | None) -> Path:
    """The 8B-shaped bfloat16 torch engine of ``--gpu_8b`` (module docstring), built once."""
    import shutil

    from benchmarks.build_8b import make_checkpoint
    from kiln.builder import build
    from kiln.checkpoint import TOKENIZER_FILES

    engine = work / "kiln-torch-8b-shape-smollm2-vocab"
    if (engine / "config.json").is_file():
        return engine
    if tokenizer_dir is None:
        from kiln.testing.smollm2 import smollm2_hf_dir
        tokenizer_dir = smollm2_hf_dir()
    checkpoint = make_checkpoint(work / "kiln-checkpoint-8b-shape-smollm2-vocab", 32,
                                 vocab_size=49152)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, checkpoint / name)
    build(checkpoint, engine, backend="torch", dtype="bfloat16", max_batch_size=64,
          max_input_len=2048, max_seq_len=4096, max_num_tokens=8192, overwrite=True)
    return engine


def kiln(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln.cli.main", *args]


def shape(args: argparse.Namespace) -> list[str]:
    return ["--num_requests", str(args.num_requests), "--input_len", str(args.input_len),
            "--output_len", str(args.output_len), "--seed", str(args.seed)]


def in_process(engine: Path, args: argparse.Namespace, out: Path) -> dict:
    subprocess.run(kiln("bench", "--engine_dir", str(engine), *shape(args), "--concurrency",
                        str(args.concurrency), "--json_output", str(out)),
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def through_server(engine: Path, args: argparse.Namespace, serve_args: str, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(kiln("serve", "--engine_dir", str(engine), "--port", str(port),
                                   *serve_args.split()),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("kiln serve did not start")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        subprocess.run(kiln("bench_serve", "--serve", url, *shape(args), "--request_rates",
                            "inf", "--max_concurrency", str(args.concurrency),
                            "--json_output", str(out)), check=True, stdout=subprocess.DEVNULL)
    finally:
        server.terminate()
        server.wait(60)
    return json.loads(out.read_text())["rates"][0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num_requests", type=int, default=32)
    parser.add_argument("--input_len", type=int, default=64)
    parser.add_argument("--output_len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve_args", default="",
                        help="Extra kiln serve flags, e.g. '--no_cpu_spin_wait'.")
    parser.add_argument("--compare_serve_args", default=None,
                        help="A second server in each round, with these flags instead (e.g. "
                             "'--serve_args=--no_engine_process --compare_serve_args="
                             "--engine_process'): its figures are under 'compared'.")
    parser.add_argument("--output", default=str(HERE / "serve_overhead_results.json"))
    parser.add_argument("--gpu_8b", action="store_true",
                        help="the 8B-shaped torch engine on a GPU (module docstring)")
    parser.add_argument("--tokenizer_dir", type=Path, default=None,
                        help="tokenizer files of --gpu_8b's engine (default: SmolLM2's)")
    args = parser.parse_args()
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    if args.gpu_8b:
        engine = build_gpu_8b(work, args.tokenizer_dir)
    else:
        engine = build_engine(work, args.input_len, args.output_len, args.concurrency)
    variants = [args.serve_args] + ([args.compare_serve_args]
                                    if args.compare_serve_args is not None else [])
    rounds: list[dict] = []
    compared: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            load_before = os.getloadavg()[0]  # other processes on the machine skew figures
            local = in_process(engine, args, Path(tmp) / "bench.json")
            for serve_args, rows in zip(variants, (rounds, compared)[:len(variants)], strict=True):
                served = through_server(engine, args, serve_args, Path(tmp) / "serve.json")
                row = _row(local, served, load_before)
                rows.append(row)
                print(f"round {i + 1} [{serve_args or 'kiln serve'}]: in-process "
                      f"{row['in_process_tokens_per_s']:.1f} tok/s, server "
                      f"{row['server_tokens_per_s']:.1f} tok/s ({row['ratio']:.3f}); "
                      f"TTFT p50 {local['ttft_ms']['p50']:.0f} vs "
                      f"{served['ttft_ms']['p50']:.0f} ms; load average "
                      f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus",
                      flush=True)

    summary = _summary(rounds, args.serve_args)
    more = {}
    if compared:
        more["compared"] = {"serve_args": args.compare_serve_args,
                            "summary": _summary(compared, args.compare_serve_args),
                            "rounds": compared}
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) or "serve_overhead.py",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "engine": str(engine),
        **({"backend": "torch", "dtype": "bfloat16", "model": "Llama-3.1-8B shape, random "
            "weights, SmolLM2 vocabulary (49,152)", "gpu": _gpu_name()} if args.gpu_8b
           else {"backend": "onnx", "dtype": "float32"}),
        "workload": {"num_requests": args.num_requests, "input_len": args.input_len,
                     "output_len": args.output_len, "concurrency": args.concurrency,
                     "request_rate": "inf", "seed": args.seed},
        "serve_args": args.serve_args,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                 cwd=HERE).stdout.strip(),
        "summary": summary, "rounds": rounds, **more}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


def _row(local: dict, served: dict, load_before: float) -> dict:
    row = {"in_process_tokens_per_s": local["output_tokens_per_s"],
           "server_tokens_per_s": served["output_tokens_per_s"],
           "in_process_ttft_ms": local["ttft_ms"],
           "server_ttft_ms": served["ttft_ms"],
           "in_process_itl_ms": local["itl_ms"], "server_itl_ms": served["itl_ms"],
           "server_failed": served["failed"],
           "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]}
    row["ratio"] = row["server_tokens_per_s"] / row["in_process_tokens_per_s"]
    return row


def _summary(rounds: list[dict], serve_args: str) -> dict:
    """Medians over the rounds of one server variant, printed beside the goal."""

    def med(key: str, sub: str | None = None) -> float:
        return statistics.median(r[key][sub] if sub else r[key] for r in rounds)

    summary = {
        "in_process_tokens_per_s": med("in_process_tokens_per_s"),
        "server_tokens_per_s": med("server_tokens_per_s"),
        "ratio": med("ratio"),
        "goal_ratio": GOAL,
        "in_process_ttft_p50_ms": med("in_process_ttft_ms", "p50"),
        "server_ttft_p50_ms": med("server_ttft_ms", "p50"),
        "in_process_ttft_p99_ms": med("in_process_ttft_ms", "p99"),
        "server_ttft_p99_ms": med("server_ttft_ms", "p99"),
        "in_process_itl_p50_ms": med("in_process_itl_ms", "p50"),
        "server_itl_p50_ms": med("server_itl_ms", "p50"),
    }
    summary["meets_goal"] = summary["ratio"] >= GOAL
    print(f"\n[{serve_args or 'kiln serve'}]\n{'':<28}{'in-process':>12}{'server':>12}")
    for name, a, b in (("output tokens/s", "in_process_tokens_per_s", "server_tokens_per_s"),
                       ("TTFT p50 (ms)", "in_process_ttft_p50_ms", "server_ttft_p50_ms"),
                       ("TTFT p99 (ms)", "in_process_ttft_p99_ms", "server_ttft_p99_ms"),
                       ("inter-token p50 (ms)", "in_process_itl_p50_ms", "server_itl_p50_ms")):
        print(f"{name:<28}{summary[a]:>12.1f}{summary[b]:>12.1f}")
    print(f"server / in-process throughput (median of per-round ratios): {summary['ratio']:.3f} "
          f"(goal >= {GOAL}: {'met' if summary['meets_goal'] else 'NOT met'})")
    return summary


def _gpu_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


if __name__ == "__main__":
    sys.exit(main())
