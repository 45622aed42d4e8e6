"""Engine sizes and build times per qformat: SmolLM2-135M-Instruct, onnx and tensorrt, float16.

The checkpoints come from benchmarks/quantize_peer.py's work dir (float32 source; int4_awq and
int4_wo at group 64) plus int8_wo, int8_sq and fp8 quantized here (8 calibration samples of
128 tokens, gate off: only sizes are measured). TensorRT-RTX builds ahead of time for sm86
(fp8: sm89). Sizes are the rank files' bytes (graphs and external weights, or engines).

Usage: ``python benchmarks/quantized_engine_sizes.py [--json_output F]`` (after
benchmarks/quantize_peer.py has made its checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    import kiln
    from kiln.builder import build
    from kiln.testing.english import english_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")
                        + "/bench-quantize-peer")
    parser.add_argument("--json_output", type=Path)
    args = parser.parse_args()
    work = Path(args.work_dir).expanduser()
    out = Path(tempfile.mkdtemp(prefix="kiln-sizes-"))
    source = work / "ckpt-float32"
    checkpoints = {"float16": source, "int4_awq": work / "ckpt-int4_awq-g64",
                   "int4_wo": work / "ckpt-int4_wo-g64"}
    for qformat in ("int8_wo", "int8_sq", "fp8"):
        checkpoints[qformat] = kiln.quantize(
            source, out / f"ckpt-{qformat}", qformat=qformat, progress=False,
            calib_dataset=str(english_file("calibration")), calib_size=8,
            calib_max_seq_length=128, no_accuracy_gate=True)
    sizes: dict[str, dict] = {}
    for name, ckpt in checkpoints.items():
        for backend in ("onnx", "tensorrt"):
            engine = out / f"engine-{backend}-{name}"
            targets = {"targets": ("sm89",) if name == "fp8" else ("sm86",)} \
                if backend == "tensorrt" else {}
            started = time.perf_counter()
            build(ckpt, engine, backend=backend, dtype="float16", max_batch_size=8,
                  max_input_len=512, max_seq_len=1024, progress=False, **targets)
            size = sum(f.stat().st_size for f in engine.iterdir() if f.name.startswith("rank"))
            sizes.setdefault(name, {})[backend] = {
                "megabytes": round(size / 1e6, 1),
                "build_seconds": round(time.perf_counter() - started, 1)}
            print(f"{name:9s} {backend:9s} {size / 1e6:8.1f} MB "
                  f"{sizes[name][backend]['build_seconds']:7.1f} s", flush=True)
    if args.json_output:
        args.json_output.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "dtype":
                                                "float16", "engines": sizes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
