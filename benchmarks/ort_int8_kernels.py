"""ONNX Runtime's int8 x int8 kernels against its uint8 x int8 ones on this CPU: exactness and time.

    PYTHONPATH=. python3 benchmarks/ort_int8_kernels.py [--out results.json]

An int8_sq engine's projections are x -> QuantizeLinear/DequantizeLinear (int8) -> MatMul <-
DequantizeLinear(W int8), which ONNX Runtime fuses into MatMulIntegerToFloat. By default it
rewrites the int8 activations to uint8 on x86 (session.qdqisint8allowed off); its u8 x s8
kernels sum pairs of products in 16 bits, which saturate on CPUs without VNNI. kiln's sessions
keep int8 where the CPU has no VNNI (onnx_executor.session_options). This prints, per CPU, both forms' largest error
against the exact product and their time per call (M = 1 and 16 rows of a 4096 x 4096
projection), so the cost of exactness is a measured figure on each kind of machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def model(k: int, n: int, w: np.ndarray, w_scale: np.ndarray, x_scale: np.ndarray) -> bytes:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        initializer=[numpy_helper.from_array(a, name) for a, name in (
            (w, "w"), (w_scale, "ws"), (x_scale, "s"), (np.array(0, np.int8), "z"),
            (np.zeros(n, np.int8), "wz"))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10  # what older ONNX Runtime builds read too
    return proto.SerializeToString()


def cpu_flags() -> list[str]:
    """The flags that decide ONNX Runtime's int8 kernels (VNNI, AVX-512, AVX2, AMX)."""
    from kiln.runtime.onnx_executor import cpu_flags as all_flags

    return sorted(f for f in all_flags() if "vnni" in f or f.startswith(("avx512f", "avx2", "amx")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args()
    k = n = 4096
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    w_scale, x_scale = np.full(n, 0.01, np.float32), np.array(0.02, np.float32)
    blob = model(k, n, w, w_scale, x_scale)
    results = {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(),
               "onnxruntime": ort.__version__, "threads": args.threads, "rows": {}}
    for m in (1, 16):
        x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
        q = np.clip(np.round(x / x_scale), -128, 127)
        exact = (q * x_scale) @ (w.astype(np.float64) * w_scale)
        for label, allow in (("uint8 (ORT default on x86)", None),
                             ("int8 (kiln, without VNNI)", "1")):
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            if allow is not None:
                so.add_session_config_entry("session.qdqisint8allowed", allow)
            sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
            y = sess.run(None, {"x": x})[0]
            for _ in range(5):
                sess.run(None, {"x": x})
            runs, started = 50, time.perf_counter()
            for _ in range(runs):
                sess.run(None, {"x": x})
            us = (time.perf_counter() - started) / runs * 1e6
            err = float(np.abs(y - exact).max())
            results["rows"][f"m{m} {label}"] = {"us_per_call": round(us, 1), "max_abs_error": err,
                                                "max_abs_value": float(np.abs(exact).max())}
            print(f"M={m:>2} {label:<27} {us:9.1f} us/call  max error {err:.3g} "
                  f"(values up to {np.abs(exact).max():.3g})")
    print("cpu flags:", " ".join(results["flags"]) or "unknown")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
