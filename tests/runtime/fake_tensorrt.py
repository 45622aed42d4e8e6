"""A fake ``tensorrt`` module for CPU tests of kiln's TensorRT executor.

It implements the part of the TensorRT 10 Python API the executor calls, records every call
of every execution context, and answers as TensorRT does: ``set_optimization_profile_async``,
``set_input_shape``, ``set_tensor_address`` and ``set_communicator`` return False for what
TensorRT would refuse (a profile the engine lacks, a shape outside the active profile's
range, a name the engine does not have), or for what a test asks it to refuse
(:attr:`FakeEngine.refuse`). Engine files are JSON (:func:`engine_file`). ``execute_async_v3``
runs a toy model on host buffers (the executor's ``device="cpu"`` test seam): the next token
after each row's last token is ``(token + 1) % vocab``, so greedy decoding counts up; a part
that is not the last passes ``hidden_out[b, s, :] = input_ids[b, s]`` to the next.
"""

from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path
from typing import Any

import numpy as np

INPUT, OUTPUT = "INPUT", "OUTPUT"
_NP = {"float32": (np.float32, ctypes.c_float), "int64": (np.int64, ctypes.c_int64)}


def engine_file(path: Path, *, layers: list[int], first: bool, last: bool, vocab: int,
                hidden: int, kv_heads: int, head_dim: int, max_seq_len: int, max_batch: int,
                max_seq: int, profiles: int = 2) -> Path:
    """Write a fake engine of one part: its tensors as the kiln graph declares them
    (docs/engine.md) and its profiles' ranges (kiln/builder/tensorrt_backend.py)."""
    tensors: dict[str, tuple[str, str, list[int]]] = {}
    if first:
        tensors["input_ids"] = (INPUT, "int64", [-1, -1])
    else:
        tensors["hidden_in"] = (INPUT, "float32", [-1, -1, hidden])
    tensors["position_ids"] = (INPUT, "int64", [-1, -1])
    tensors["past_len"] = (INPUT, "int64", [-1])
    if last:
        tensors["last_index"] = (INPUT, "int64", [-1])
    for i in layers:
        for kind in ("key", "value"):
            tensors[f"past_{kind}_{i}"] = (INPUT, "float32", [-1, kv_heads, max_seq_len,
                                                              head_dim])
            tensors[f"present_{kind}_{i}"] = (OUTPUT, "float32", [-1, kv_heads, max_seq_len,
                                                                  head_dim])
    if last:
        tensors["logits"] = (OUTPUT, "float32", [-1, vocab])
    else:
        tensors["hidden_out"] = (OUTPUT, "float32", [-1, -1, hidden])
    ranges = [{"B": [1, max_batch], "S": [1, max_seq]}, {"B": [1, max_batch], "S": [1, 1]}]
    path.write_text(json.dumps({"tensors": tensors, "profiles": ranges[:profiles],
                                "vocab": vocab, "hidden": hidden}))
    return path


class FakeEngine:
    def __init__(self, spec: dict):
        self.tensors = {name: tuple(v) for name, v in spec["tensors"].items()}
        self.ranges = spec["profiles"]
        self.vocab, self.hidden = spec["vocab"], spec["hidden"]
        self.contexts: list[FakeContext] = []
        self.refuse: set[tuple[str, str]] = set()  # (call, tensor name or "") to answer False

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.ranges)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> str:
        return self.tensors[name][1]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name][2])

    def get_tensor_profile_shape(self, name: str, profile: int):
        """(min, opt, max) of an input under ``profile`` (opt = max here)."""
        dims = self.tensors[name][2]
        r = self.ranges[profile]
        low = [r["B"][0] if i == 0 else r["S"][0] if d == -1 else d for i, d in enumerate(dims)]
        high = [r["B"][1] if i == 0 else r["S"][1] if d == -1 else d for i, d in enumerate(dims)]
        return low, high, high

    def create_execution_context(self) -> FakeContext:
        context = FakeContext(self)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.calls: list[tuple] = []
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def _refused(self, call: str, name: str = "") -> bool:
        return (call, name) in self.engine.refuse

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.calls.append(("profile", profile))
        if self._refused("profile") or not 0 <= profile < len(self.engine.ranges):
            return False
        self.profile = profile
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.calls.append(("shape", name, tuple(shape)))
        low, high, _ = self.engine.get_tensor_profile_shape(name, self.profile)
        inside = len(shape) == len(low) and all(
            a <= s <= b for a, s, b in zip(low, shape, high, strict=True))
        if self._refused("shape", name) or not inside:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.calls.append(("address", name))
        if self._refused("address", name) or name not in self.engine.tensors:
            return False
        self.addresses[name] = address
        return True

    def set_communicator(self, communicator: Any) -> bool:
        self.calls.append(("communicator", communicator))
        return not self._refused("communicator")

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        rows = self.shapes["past_len"][0]
        seq = self.shapes["position_ids"][1]
        if name == "logits":
            return (rows, self.engine.vocab)
        if name == "hidden_out":
            return (rows, seq, self.engine.hidden)
        return self.shapes["past_" + name[len("present_"):]]

    def execute_async_v3(self, stream: int) -> bool:
        self.calls.append(("execute",))
        if self._refused("execute"):
            return False
        rows, seq = self.shapes["position_ids"]
        if "input_ids" in self.engine.tensors:
            tokens = self._array("input_ids", (rows, seq), "int64").astype(np.float32)
        else:
            tokens = self._array("hidden_in", (rows, seq, self.engine.hidden), "float32")[..., 0]
        if "hidden_out" in self.engine.tensors:
            out = self._array("hidden_out", (rows, seq, self.engine.hidden), "float32")
            out[...] = tokens[..., None]
            return True
        last = self._array("last_index", (rows,), "int64")
        logits = self._array("logits", (rows, self.engine.vocab), "float32")
        logits[...] = 0
        for b in range(rows):
            logits[b, (int(tokens[b, last[b]]) + 1) % self.engine.vocab] = 1
        return True

    def _array(self, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """The host buffer bound to ``name`` (the executor's device="cpu" seam)."""
        np_type, c_type = _NP[dtype]
        count = int(np.prod(shape))
        buffer = (c_type * count).from_address(self.addresses[name])
        return np.ctypeslib.as_array(buffer).view(np_type).reshape(shape)


class FakeRuntime:
    def __init__(self, logger: Any):
        self.engines: list[FakeEngine] = []

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        engine = FakeEngine(json.loads(data))
        FAKE.engines.append(engine)
        return engine


class _Logger:
    WARNING = 2

    def __init__(self, level: int):
        self.level = level


FAKE = types.ModuleType("tensorrt")
FAKE.__version__ = "10.99.0-fake"
FAKE.float32, FAKE.float16, FAKE.bfloat16 = "float32", "float16", "bfloat16"
FAKE.int64, FAKE.int32, FAKE.bool = "int64", "int32", "bool"
FAKE.TensorIOMode = types.SimpleNamespace(INPUT=INPUT, OUTPUT=OUTPUT)
FAKE.Logger = _Logger
FAKE.Runtime = FakeRuntime
FAKE.engines = []  # every engine deserialized, in order (tests reset it)
