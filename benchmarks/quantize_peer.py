"""INT4 on CPU, side by side: kiln's int4_awq / int4_wo onnx engines vs ONNX Runtime's own INT4.

The peer is onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder -p
int4 -e cpu``), which quantizes with ONNX Runtime's ``MatMulNBitsQuantizer`` (round to nearest,
symmetric) into ``MatMulNBits`` nodes: what an ONNX Runtime user gets for INT4 on a CPU. Two
peer configurations:

kiln runs three ways: int4_awq and int4_wo as the checkpoint defines them (lm_head float32,
MatMulNBits computing in float32), and int4_awq on the peer defaults' footing
(``kiln quantize --quantize_lm_head``, ``kiln build --weight_only_int8_compute``).

- ``peer int4 (defaults)``: the builder's defaults: groups of 32, ``accuracy_level=4`` (the
  activations of each MatMulNBits are quantized to int8 for the kernel), and the tied
  embedding / lm_head quantized to int4 too.
- ``peer int4 (g64, fp lm_head)``: kiln's layout: groups of 64 (SmolLM2's hidden size 576 is
  not a multiple of 128, which kiln's format requires of a group) and the lm_head left in
  float32 (``block_size=64 nodes_to_exclude=/lm_head/MatMul``).

Same model (SmolLM2-135M-Instruct float32, kiln.testing.smollm2), same text, same run:

- perplexity on the ``evaluation`` set of kiln.testing.english (CPython docstrings that kiln's
  calibration set never contains), HF's sliding windows (kiln.evaluation: ``--max_length``,
  ``--stride``), each runtime's float32 logits; kiln through ``kiln eval``'s API on engines built
  with ``--gather_context_logits``, the peer through an ONNX Runtime session on its model.onnx
  (empty past, every position's logits), both scored by ``kiln.evaluation.window_nll``.
- batch-1 decode tokens/s: ``--input_len`` prompt tokens, ``--output_len`` new tokens, EOS
  ignored, each measurement in a fresh process (benchmarks/cpu_runtime.py's runners), rounds
  interleaved; kiln engines built without ``--gather_context_logits``.

kiln's int4 checkpoints are quantized by ``kiln quantize`` (calibrated on the ``calibration``
set, ``--calib_size`` samples of 512 tokens; its own accuracy gate off, since this script
reports accuracy itself). Goals (issue 11): kiln int4_awq perplexity <= the peer's; kiln int4
decode >= 2x kiln float32 and >= the peer's.

Usage: ``python benchmarks/quantize_peer.py [--rounds 3] [--json_output F]``; needs the bench
extra (``pip install -e '.[bench]'``: onnxruntime-genai, onnx_ir).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.cpu_runtime import Genai, Kiln, set_genai_threads  # noqa: E402

log = logging.getLogger("quantize_peer")
# runner -> (qformat, quantize_lm_head, weight_only_int8_compute); the last one is the peer
# defaults' footing: the lm_head in int4 too, int8 activation blocks in MatMulNBits
KILN = {"kiln int4_awq": ("int4_awq", False, False), "kiln int4_wo": ("int4_wo", False, False),
        "kiln int4_awq + int4 lm_head + int8 compute": ("int4_awq", True, True)}
PEERS = {"peer int4 (defaults)": [],
         "peer int4 (g64, fp lm_head)": ["block_size=64", "nodes_to_exclude=/lm_head/MatMul"]}
GROUP_SIZE = 64
RUNNERS = ("kiln float32", *KILN, *PEERS)


def kiln_engines(work: Path, args: argparse.Namespace) -> dict[str, dict[str, Path]]:
    """{runner: {"eval": engine with context logits, "decode": engine without}}."""
    import kiln
    from kiln.builder import build
    from kiln.testing.english import english_file
    from kiln.testing.smollm2 import smollm2_hf_dir

    source = work / "ckpt-float32"
    if not (source / "config.json").is_file():
        kiln.convert_checkpoint(smollm2_hf_dir(), source, dtype="float32", overwrite=True,
                                progress=False)
    variants = {"kiln float32": ("float32", source, False)}
    for name, (qformat, lm_head, int8_compute) in KILN.items():
        stem = f"{qformat}-g{GROUP_SIZE}" + ("-lmhead" if lm_head else "")
        ckpt = work / f"ckpt-{stem}"
        if not (ckpt / "config.json").is_file():
            kiln.quantize(source, ckpt, qformat=qformat, group_size=GROUP_SIZE, progress=False,
                          calib_dataset=str(english_file("calibration")),
                          calib_size=args.calib_size, quantize_lm_head=lm_head,
                          no_accuracy_gate=True, overwrite=True)
        variants[name] = (stem + ("-int8compute" if int8_compute else ""), ckpt, int8_compute)
    engines = {}
    for name, (stem, ckpt, int8_compute) in variants.items():
        engines[name] = {}
        for kind, gather in (("eval", True), ("decode", False)):
            engine = work / f"engine-{stem}-{kind}"
            if not (engine / "config.json").is_file():
                build(ckpt, engine, backend="onnx", max_batch_size=4,
                      max_input_len=args.max_length, max_seq_len=args.max_length,
                      gather_context_logits=gather, weight_only_int8_compute=int8_compute,
                      overwrite=True)
            engines[name][kind] = engine
    return engines


def peer_models(work: Path, threads: int) -> dict[str, Path]:
    from kiln.testing.smollm2 import smollm2_hf_dir

    out = {}
    for name, options in PEERS.items():
        model = work / ("genai-int4-" + ("defaults" if not options else "g64-fplmhead"))
        if not (model / "genai_config.json").is_file():
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                   str(smollm2_hf_dir()), "-o", str(model), "-p", "int4", "-e", "cpu", "-c",
                   str(work / "genai-cache")]
            if options:
                cmd += ["--extra_options", *options]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        set_genai_threads(model, threads)
        out[name] = model
    return out


def peer_perplexity(model: Path, token_ids: list[int], max_length: int, stride: int,
                    threads: int) -> dict:
    """Sliding-window perplexity of an onnxruntime-genai model (float32 logits of every
    position from a session with an empty past), scored exactly as ``kiln eval`` scores."""
    import onnxruntime as ort

    from kiln.evaluation import sliding_windows, window_nll

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    pasts = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past_")}
    head_dim = json.loads((model / "genai_config.json").read_text())["model"]["decoder"][
        "head_size"]
    nll_sum, scored = 0.0, 0
    started = time.perf_counter()
    windows = sliding_windows(len(token_ids), max_length, stride)
    for index, window in enumerate(windows):
        ids = np.array([token_ids[window.begin:window.end]], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feed.update({n: np.zeros((1, shape[1], 0, head_dim), np.float32)
                     for n, shape in pasts.items()})
        logits = session.run(["logits"], feed)[0][0].astype(np.float64)  # [S, V]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = logits[np.arange(len(ids[0]) - 1), ids[0, 1:]] - logz[:-1]
        nll, count = window_nll(picked.tolist(), window, index)
        nll_sum += nll * count
        scored += count
    return {"perplexity": float(np.exp(nll_sum / scored)), "windows": len(windows),
            "seconds": time.perf_counter() - started}


def accuracy(work: Path, args: argparse.Namespace) -> dict[str, dict]:
    from kiln.datasets import load_texts
    from kiln.evaluation import evaluate
    from kiln.runtime import ExecutorOptions
    from kiln.runtime.tokenizer import load_tokenizer
    from kiln.testing.english import english_file

    text = english_file("evaluation")
    engines = kiln_engines(work, args)
    options = ExecutorOptions(device="cpu", num_threads=args.threads)
    out = {}
    for name in ("kiln float32", *KILN):
        result = evaluate(engines[name]["eval"], text, args.max_length, args.stride, options)
        out[name] = {"perplexity": result.perplexity, "windows": result.windows,
                     "seconds": result.seconds}
        log.info("%s: perplexity %.4f", name, result.perplexity)
    # the peer reads the same token ids (kiln eval's tokenization of the same text)
    token_ids = load_tokenizer(engines["kiln float32"]["eval"]).encode(load_texts(text).joined())
    for name, model in peer_models(work, args.threads).items():
        out[name] = peer_perplexity(model, token_ids, args.max_length, args.stride,
                                    args.threads)
        log.info("%s: perplexity %.4f", name, out[name]["perplexity"])
    return out


def worker(args: argparse.Namespace) -> None:
    """One batch-1 decode measurement in this (fresh) process; prints tokens/s as JSON."""
    work = Path(args.work_dir).expanduser()
    prompt = np.random.default_rng(args.round).integers(100, 49000, args.input_len).tolist()
    if args.worker in PEERS:
        runner = Genai(peer_models(work, args.threads)[args.worker])
    else:
        runner = Kiln(kiln_engines(work, args)[args.worker]["decode"], args.threads, spin=True)
    runner.decode_b1(prompt, 8)  # warm-up: allocation and page-in
    print(json.dumps({"value": runner.decode_b1(prompt, args.output_len)}))


def decode(work: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {name: [] for name in RUNNERS}
    for round_ in range(args.rounds):
        for name in RUNNERS:
            cmd = [sys.executable, __file__, "--worker", name, "--round", str(round_),
                   *_shared_flags(args)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            figures[name].append(json.loads(out.strip().splitlines()[-1])["value"])
        log.info("round %d: %s", round_, {n: round(v[-1], 2) for n, v in figures.items()})
    return figures


def report(result: dict) -> str:
    ppl, tps = result["perplexity"], result["decode_b1_tokens_per_s_median"]
    base_ppl, base_tps = ppl["kiln float32"]["perplexity"], tps["kiln float32"]
    lines = ["| runtime | perplexity | vs float32 | batch-1 decode tok/s | vs kiln float32 |",
             "|---|---|---|---|---|"]
    for name in RUNNERS:
        lines.append(f"| {name} | {ppl[name]['perplexity']:.4f} | "
                     f"{ppl[name]['perplexity'] / base_ppl:.4f} | {tps[name]:.2f} | "
                     f"{tps[name] / base_tps:.2f}x |")
    awq, peers = ppl["kiln int4_awq"]["perplexity"], [ppl[p]["perplexity"] for p in PEERS]
    best_peer_tps = max(tps[p] for p in PEERS)
    best = max(tps[n] for n in KILN)
    lines += ["", f"goal: kiln int4_awq perplexity {awq:.4f} <= the peer's "
                  f"({', '.join(f'{p:.4f}' for p in peers)}): "
                  f"{'met' if awq <= min(peers) else 'NOT met'}",
              f"goal: kiln int4 decode, best variant {best:.2f} tok/s >= 2x kiln float32 "
              f"({2 * base_tps:.2f}) and >= the peer's best ({best_peer_tps:.2f}): "
              f"{'met' if best >= max(2 * base_tps, best_peer_tps) else 'NOT met'}"]
    return "\n".join(lines)


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--work_dir", str(args.work_dir), "--input_len", str(args.input_len),
            "--output_len", str(args.output_len), "--threads", str(args.threads),
            "--max_length", str(args.max_length), "--stride", str(args.stride),
            "--calib_size", str(args.calib_size)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default=os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")
                        + "/bench-quantize-peer")
    parser.add_argument("--input_len", type=int, default=128)
    parser.add_argument("--output_len", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--calib_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json_output", type=Path)
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kiln").setLevel(logging.WARNING)
    if args.worker:
        worker(args)
        return 0
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    perplexities = accuracy(work, args)
    figures = decode(work, args)
    result = {"model": "SmolLM2-135M-Instruct", "text": "kiln.testing.english evaluation set",
              "python": sys.version.split()[0], "threads": args.threads,
              "max_length": args.max_length, "stride": args.stride,
              "input_len": args.input_len, "output_len": args.output_len,
              "rounds": args.rounds, "calib_size": args.calib_size,
              "load_average_1m": os.getloadavg()[0], "perplexity": perplexities,
              "decode_b1_tokens_per_s": figures,
              "decode_b1_tokens_per_s_median": {n: statistics.median(v)
                                                for n, v in figures.items()}}
    print(report(result))
    if args.json_output:
        args.json_output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
