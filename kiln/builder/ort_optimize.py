"""ONNX Runtime's offline graph optimization, run as a child process by the onnx backend.

Why a process: ``onnxruntime.InferenceSession`` optimizes and saves a graph in native code that
never returns to Python until it is done (seconds for SmolLM2, minutes for 8B models), so a
Ctrl-C in the builder would wait for it. A child is stopped at once, and its memory is returned
when it ends. Run as a script (``python ort_optimize.py RAW OUT LEVEL``): it imports only
onnxruntime, not kiln, so it starts in a fraction of a second.
"""

from __future__ import annotations

import signal
import sys

# ONNX Runtime's transformers the build leaves to the session that runs the engine (below)
UNFUSED = ["QDQSelectorActionTransformer", "QDQS8ToU8Transformer"]


def optimize(raw: str, out: str, level: str) -> None:
    """Optimize ``raw`` at ``level`` (an ``onnxruntime.GraphOptimizationLevel`` name) and save it
    to ``out``, its weights in ``<out>.data``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = out
    name = out.rsplit("/", 1)[-1]
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", name + ".data")
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # An int8_sq projection's Q/DQ nodes stay in the engine, unfused: which integer kernel is
    # exact depends on the CPU that runs it (kiln.runtime.onnx_executor.session_options), and
    # ONNX Runtime's default here would save its x86 rewrite to uint8 activations, whose
    # kernels saturate on CPUs without VNNI, into the engine.
    ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=UNFUSED)


if __name__ == "__main__":
    # The parent reports interrupts; a Ctrl-C reaching this process group just ends it quietly.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    optimize(*sys.argv[1:4])
