"""GraphEmitter: a thin, typed layer over ``onnx.helper`` that names every node by scope.

Contract:
- Node names follow ``/model/layers.{i}/attn/qkv/MatMul`` (scope + local name + op type);
  output values are ``<node name>/output_<k>`` unless a caller names them (graph outputs).
- Small constants are stored inline (deduplicated); weights go through a :class:`WeightSink`
  (external data in a file beside the graph, or kept in memory for a parser to load).
- :meth:`shared` memoizes per-graph preparations (masks, rotary tables) so every layer reuses
  one subgraph.
- :meth:`model` returns an ``ai.onnx`` opset-24, IR-10 model; :func:`save` writes and checks it
  (the checker needs the external-data file beside the graph).

Non-goals: graph rewriting, shape inference (ONNX Runtime and TensorRT infer shapes).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 24
IR_VERSION = 10

ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
               "bfloat16": TensorProto.BFLOAT16}
_TORCH_TO_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                  torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64,
                  torch.int32: TensorProto.INT32, torch.int8: TensorProto.INT8,
                  torch.uint8: TensorProto.UINT8, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
                  torch.bool: TensorProto.BOOL}
Dim = int | str


class WeightSink(Protocol):
    """Where weight bytes go. ``add`` returns the initializer proto (data external)."""

    def add(self, name: str, tensor: torch.Tensor, data_type: int | None = None,
            dims: Sequence[int] | None = None) -> TensorProto: ...


class Projection(Protocol):
    """A linear layer whose weight side is already emitted: ``proj(x)`` emits ``x @ W`` (its
    node named ``name``, default the projection's). ``weight`` is the plain [in, out] MatMul
    operand of a float projection, or None for a quantized one (whose form is not a MatMul of
    one weight: fused plugin forms that take weights cannot use it)."""

    weight: str | None

    def __call__(self, x: str, name: str | None = None) -> str: ...


def external_tensor(name: str, tensor: torch.Tensor, location: str, offset: int,
                    data_type: int | None = None, dims: Sequence[int] | None = None) -> TensorProto:
    """An initializer whose data lies at ``offset`` in the file ``location``.

    ``data_type`` and ``dims`` describe the bytes of ``tensor`` when they are not its own
    dtype and shape (INT4: two values per byte, ``tensor`` the packed uint8 bytes).
    """
    proto = TensorProto(name=name,
                        data_type=_TORCH_TO_ONNX[tensor.dtype] if data_type is None else data_type,
                        dims=list(tensor.shape if dims is None else dims),
                        data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(tensor.numel() * tensor.element_size()))):
        proto.external_data.add(key=key, value=value)
    return proto


class FileSink:
    """Appends weights to one external-data file, each at a 4 KiB-aligned offset (mmap-able)."""

    ALIGN = 4096

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._offset = 0
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor, data_type: int | None = None,
            dims: Sequence[int] | None = None) -> TensorProto:
        offset = -(-self._offset // self.ALIGN) * self.ALIGN
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        pos = offset
        while data.nbytes:
            done = os.pwrite(self._fd, data, pos)
            data, pos = data[done:], pos + done
        self._offset = pos
        self.nbytes += pos - offset
        return external_tensor(name, tensor, self.path.name, offset, data_type, dims)

    def close(self) -> None:
        os.close(self._fd)


class MemorySink:
    """Keeps weights in memory (for a parser that loads initializers by name)."""

    def __init__(self, location: str = "weights.data"):
        self.location = location
        self.tensors: dict[str, torch.Tensor] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor, data_type: int | None = None,
            dims: Sequence[int] | None = None) -> TensorProto:
        tensor = tensor.contiguous()
        self.tensors[name] = tensor
        self.nbytes += tensor.numel() * tensor.element_size()
        return external_tensor(name, tensor, self.location, 0, data_type, dims)

    def close(self) -> None:
        pass


class GraphEmitter:
    """Accumulates one ONNX graph (see the module docstring)."""

    def __init__(self, name: str, sink: WeightSink | None = None):
        self.name = name
        self.sink = sink
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.domains: dict[str, int] = {"": OPSET}
        self._scope: list[str] = ["", "model"]
        self._node_names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._shared: dict[Any, Any] = {}

    # Naming -------------------------------------------------------------------------------
    @contextmanager
    def scope(self, *parts: str) -> Iterator[None]:
        """Nest node names: ``with g.scope("layers.3", "attn"):`` -> ``/model/layers.3/attn``."""
        self._scope.extend(parts)
        try:
            yield
        finally:
            del self._scope[-len(parts):]

    @property
    def prefix(self) -> str:
        return "/".join(self._scope)

    def _unique(self, name: str) -> str:
        out, k = name, 0
        while out in self._node_names:
            k += 1
            out = f"{name}_{k}"
        self._node_names.add(out)
        return out

    # Nodes --------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, name: str | None = None,
           outputs: int | Sequence[str | None] = 1, domain: str = "", **attrs: Any) -> Any:
        """Add one node; returns its output name (or a list when it has several).

        ``outputs``: a count (all named after the node), or names, where None names an output
        after the node and "" leaves an optional output out. A ``domain`` other than ONNX's
        is imported at version 1 (ONNX Runtime's ``com.microsoft`` contrib ops).
        """
        node_name = self._unique(f"{self.prefix}/{name}/{op_type}" if name
                                 else f"{self.prefix}/{op_type}")
        names = [None] * outputs if isinstance(outputs, int) else list(outputs)
        names = [f"{node_name}/output_{k}" if n is None else n for k, n in enumerate(names)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        if domain:
            self.domains.setdefault(domain, 1)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name,
                                           domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value: np.ndarray | Sequence, dtype: Any = None, name: str = "const") -> str:
        """An inline constant initializer (identical constants are stored once)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, hashlib.sha1(array.tobytes()).hexdigest())
        if key not in self._consts:
            unique = self._unique(f"{self.prefix}/{name}")
            self.initializers.append(numpy_helper.from_array(array, unique))
            self._consts[key] = unique
        return self._consts[key]

    def int64s(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64), name="ints")

    def scalar(self, value: float, onnx_dtype: int) -> str:
        np_dtype = helper.tensor_dtype_to_np_dtype(onnx_dtype)
        return self.const(np.array(value, dtype=np_dtype), name="scalar")

    def zero_point(self, onnx_dtype: int) -> str:
        """A scalar zero of ``onnx_dtype`` (a symmetric Q/DQ zero point: int8, float8e4m3fn)."""
        key = ("zero_point", onnx_dtype)
        if key not in self._consts:
            unique = self._unique(f"{self.prefix}/zero_point")
            self.initializers.append(helper.make_tensor(unique, onnx_dtype, [], [0]))
            self._consts[key] = unique
        return self._consts[key]

    def weight(self, name: str, tensor: torch.Tensor, data_type: int | None = None,
               dims: Sequence[int] | None = None) -> str:
        """A weight initializer named ``name`` (a canonical tensor name), data via the sink;
        ``data_type``/``dims`` as :func:`external_tensor` (packed INT4)."""
        if self.sink is None:
            raise RuntimeError("this emitter has no weight sink")
        self.initializers.append(self.sink.add(name, tensor, data_type, dims))
        return name

    def shared(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per graph; later calls with ``key`` return the same values."""
        if key not in self._shared:
            saved, self._scope = self._scope, ["", "model", "shared"]
            try:
                self._shared[key] = build()
            finally:
                self._scope = saved
        return self._shared[key]

    def add_function(self, function: onnx.FunctionProto) -> None:
        self.functions[(function.domain, function.name)] = function
        self.domains.setdefault(function.domain, 1)

    # Graph I/O ----------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        """Declare ``value`` a graph output called ``name`` (it must already be named so)."""
        if value != name:
            raise ValueError(f"graph output {name!r} must be produced under its own name, "
                             f"got {value!r}")
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def model(self, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers, doc_string=doc)
        model = helper.make_model(
            graph, ir_version=IR_VERSION, producer_name="kiln",
            opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(self.domains.items())],
            functions=list(self.functions.values()))
        return model


class WeightProjection:
    """A float :class:`Projection`: ``MatMul(x, weight)`` with an [in, out] operand."""

    def __init__(self, g: GraphEmitter, weight: str, name: str):
        self.g, self.weight, self.name = g, weight, name

    def __call__(self, x: str, name: str | None = None) -> str:
        return self.g.op("MatMul", x, self.weight, name=name or self.name)


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` (weights already in their external file beside it) and check it."""
    path = Path(path)
    onnx.save_model(model, path)
    onnx.checker.check_model(str(path))
    return path
