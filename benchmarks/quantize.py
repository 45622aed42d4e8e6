"""Benchmark ``kiln quantize``: accuracy per qformat on SmolLM2, memory on an 8B shape.

    python benchmarks/quantize.py [--workdir /tmp/kiln-bench] [--json_output F]
    python benchmarks/quantize.py --synthetic_8b [--layers 4] [--json_output F]

SmolLM2 mode: SmolLM2-135M-Instruct (kiln.testing.smollm2, converted to a float32 kiln
checkpoint) quantized with every qformat, calibrated on the ``calibration`` English set of
kiln.testing.english (--calib_size samples of --seq_length tokens), gated on the first
--eval_tokens tokens of the ``evaluation`` set (Python standard-library docstrings that
calibration never saw; written as a .txt of whole paragraphs). One table row per qformat:
perplexity of source and quantized, their ratio against the goal, top-1 agreement, KL, seconds.
Goals: int8_wo <= 1.01, fp8 <= 1.03, int8_sq <= 1.08, int4_awq's perplexity increase at least
30% smaller than int4_wo's at the same group size.

--synthetic_8b: a Llama-3.1-8B-shaped checkpoint (random float16 weights, written layer by layer
by benchmarks/build_8b.py, --layers of the 32: the peak does not depend on the count)
quantized with int8_wo, int4_wo and fp8 on 2 calibration samples (a child ``kiln quantize``
process each): peak RSS of the child (psutil samples and getrusage), seconds per layer.
Goal: peak RSS <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {"int8_wo": 1.01, "fp8": 1.03, "int8_sq": 1.08}
# qformat[:fp8 weight scales]
FORMATS = ("int8_wo", "fp8", "fp8:per_channel", "int8_sq", "int4_wo", "int4_awq")


def smollm2_checkpoint(workdir: Path) -> Path:
    import kiln
    from kiln.testing.smollm2 import smollm2_hf_dir

    ckpt = workdir / "smollm2-f32"
    if not (ckpt / "config.json").is_file():
        kiln.convert_checkpoint(smollm2_hf_dir(), ckpt, dtype="float32", progress=False,
                                overwrite=True)
    return ckpt


def eval_subset(workdir: Path, ckpt: Path, tokens: int) -> tuple[Path, int]:
    """The first whole paragraphs of the evaluation set holding about ``tokens`` tokens."""
    from kiln.datasets import load_texts
    from kiln.quantization.data import load_tokenizer_of
    from kiln.testing.english import english_file

    texts, count = [], 0
    tokenizer = load_tokenizer_of(ckpt)
    for text in load_texts(english_file("evaluation")).texts:
        if count >= tokens:
            break
        texts.append(text)
        count += len(tokenizer.encode(text, add_special_tokens=False))
    path = workdir / f"evaluation-{tokens}.txt"
    path.write_text("\n\n".join(texts) + "\n")
    return path, count


def run_smollm2(args: argparse.Namespace) -> dict:
    import kiln
    from kiln.testing.english import english_file

    ckpt = smollm2_checkpoint(args.workdir)
    evaluation, eval_tokens = eval_subset(args.workdir, ckpt, args.eval_tokens)
    rows = {}
    for name in args.formats:
        qformat, _, scales = name.partition(":")
        out = args.workdir / f"smollm2-{qformat}"
        started = time.perf_counter()
        kiln.quantize(ckpt, out, qformat=qformat, calib_dataset=str(english_file("calibration")),
                      weight_scales=scales or None,
                      calib_size=args.calib_size, calib_max_seq_length=args.seq_length,
                      eval_dataset=str(evaluation), no_accuracy_gate=True, overwrite=True,
                      group_size=args.group_size if qformat.startswith("int4") else None,
                      progress=False)
        accuracy = json.loads((out / "accuracy.json").read_text())
        rows[name] = {**{k: accuracy[k] for k in ("perplexity_source", "perplexity_quantized",
                                                      "ppl_ratio", "top1_agreement",
                                                      "kl_divergence", "tokens")},
                         "seconds": round(time.perf_counter() - started, 1)}
        print(_row(name, rows[name], rows), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        _save(args, _smollm2_result(args, eval_tokens, rows))
    return _smollm2_result(args, eval_tokens, rows)


def _smollm2_result(args: argparse.Namespace, eval_tokens: int, rows: dict) -> dict:
    return {"model": "SmolLM2-135M-Instruct float32", "calibration": "english calibration set",
            "calib_size": args.calib_size, "seq_length": args.seq_length,
            "evaluation": f"english evaluation set, first {eval_tokens} tokens (whole paragraphs)",
            "group_size": args.group_size, "formats": rows}


def _row(qformat: str, row: dict, rows: dict) -> str:
    base = qformat.partition(":")[0]
    goal = f"<= {GOALS[base]}" if base in GOALS else ""
    ok = row["ppl_ratio"] <= GOALS[base] if base in GOALS else None
    if qformat == "int4_awq" and "int4_wo" in rows:
        wo = rows["int4_wo"]["perplexity_quantized"] - rows["int4_wo"]["perplexity_source"]
        awq = row["perplexity_quantized"] - row["perplexity_source"]
        row["increase_vs_int4_wo"] = awq / wo if wo > 0 else float("nan")
        goal = f"increase {100 * (1 - row['increase_vs_int4_wo']):.0f}% smaller than int4_wo's " \
               f"(goal >= 30%)"
        ok = row["increase_vs_int4_wo"] <= 0.7
    status = "" if ok is None else (" ok" if ok else " MISSED")
    return (f"{qformat:15s} ppl {row['perplexity_source']:8.4f} -> {row['perplexity_quantized']:8.4f}"
            f"  ratio {row['ppl_ratio']:.4f} {goal}{status}  top-1 "
            f"{100 * row['top1_agreement']:.2f}%  KL {row['kl_divergence']:.5f}  "
            f"{row['seconds']:.1f} s")


def sample_peak(pid: int, stop: threading.Event, peak: list[int]) -> None:
    import psutil

    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], process.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.05)


def run_synthetic(args: argparse.Namespace) -> dict:
    from benchmarks.build_8b import make_checkpoint
    from kiln.testing.english import english_file
    from kiln.testing.smollm2 import smollm2_hf_dir

    ckpt = make_checkpoint(args.workdir / f"llama8b-{args.layers}l-ckpt", args.layers)
    shutil.copy(smollm2_hf_dir() / "tokenizer.json", ckpt / "tokenizer.json")  # ids < 49152
    rows = {}
    for qformat in ("int8_wo", "int4_wo", "fp8"):
        out = args.workdir / f"llama8b-{args.layers}l-{qformat}"
        command = [sys.executable, "-m", "kiln.cli.main", "-v", "quantize", "--checkpoint_dir",
                   str(ckpt), "--output_dir", str(out), "--qformat", qformat, "--calib_dataset",
                   str(english_file("calibration")), "--calib_size", "2",
                   "--calib_max_seq_length", "128", "--no_accuracy_gate", "--overwrite",
                   "--device", "cpu"]
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=ROOT)
        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(target=sample_peak, args=(child.pid, stop, peak), daemon=True)
        sampler.start()
        _, err = child.communicate()
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        if child.returncode != 0:
            sys.exit(f"{qformat} failed ({child.returncode}):\n{err[-4000:]}")
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # max so far
        per_layer = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in err.splitlines()
                     if "quantized in" in line]
        size = sum(p.stat().st_size for p in out.glob("rank*.safetensors"))
        rows[qformat] = {"peak_rss_gb": round(peak[0] / 1e9, 3),
                         "children_maxrss_gb_so_far": round(maxrss / 1e9, 3),
                         "seconds": round(wall, 1),
                         "seconds_per_layer": round(sum(per_layer) / max(len(per_layer), 1), 2),
                         "output_gb": round(size / 1e9, 3)}
        print(f"{qformat:8s} peak RSS {rows[qformat]['peak_rss_gb']:.2f} GB (goal <= 4) "
              f"{rows[qformat]['seconds_per_layer']:.2f} s/layer, {wall:.1f} s total, output "
              f"{size / 1e9:.2f} GB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"model": f"Llama-3.1-8B shape, {args.layers} layers, random float16",
            "calibration": "2 samples x 128 tokens (+1 held out)", "formats": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-bench"))
    parser.add_argument("--synthetic_8b", action="store_true")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--calib_size", type=int, default=32)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--eval_tokens", type=int, default=8192)
    parser.add_argument("--group_size", type=int, default=64)  # 128 does not divide 576
    parser.add_argument("--json_output", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    _save(args, run_synthetic(args) if args.synthetic_8b else run_smollm2(args))


def _save(args: argparse.Namespace, result: dict) -> None:
    """Write the results so far (each row as it is measured)."""
    if args.json_output:
        args.json_output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
