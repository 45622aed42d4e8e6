"""Test helper: run one plugin's ONNX form on its own with ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from onnx import helper

from kiln.graph.emitter import GraphEmitter, MemorySink

ELEM = {torch.float32: 1, torch.float16: 10, torch.int64: 7, torch.bool: 9}


def run_form(emit: Callable[..., str | list[str]], inputs: dict[str, torch.Tensor],
             output_names: list[str] | None = None) -> list[torch.Tensor]:
    """Build a graph whose inputs are ``inputs`` and whose outputs are what ``emit(g, *names)``
    returns (value names, of the first input's dtype), run it and return them as tensors."""
    g = GraphEmitter("plugin", MemorySink())
    names = [g.input(name, ELEM[t.dtype], list(t.shape)) for name, t in inputs.items()]
    out = emit(g, *names)
    outs = [out] if isinstance(out, str) else list(out)
    for value in outs:
        elem = ELEM[next(iter(inputs.values())).dtype]
        g.outputs.append(helper.make_tensor_value_info(value, elem, None))
    model = g.model()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in inputs.items()}
    return [torch.from_numpy(np.asarray(r)) for r in session.run(output_names or outs, feeds)]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    return bool(torch.allclose(got.float(), want.float(), atol=tol, rtol=tol))
