"""What the graph passes share: the part being emitted, its sizes, and its weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from onnx import TensorProto

from kiln.checkpoint import REWRITE, cast_checked, read_checked
from kiln.config import DecoderConfig, Mapping
from kiln.graph.emitter import ONNX_DTYPES, GraphEmitter, Projection
from kiln.quantization.config import QuantConfig
from kiln.roles import Role
from kiln.tensorio import TensorInfo, read_header

BATCH, SEQ = "batch", "seq"  # symbolic dims of the graph inputs


@dataclass(frozen=True)
class GraphSpec:
    """Build-wide settings every part's graph follows."""

    decoder: DecoderConfig
    mapping: Mapping
    dtype: str  # weights and activations ("float32" | "float16" | "bfloat16")
    max_seq_len: int  # Smax: the static KV-cache length
    plugins: dict[str, bool]  # plugin name -> fused form used
    gather_context_logits: bool = False  # the head also returns context_logits [B, S, V]
    quantization: QuantConfig | None = None  # the checkpoint's (None: float weights)
    backend: str = "onnx"  # the quantized projections' forms depend on it (linear.py)
    weight_only_int8_compute: bool = False  # MatMulNBits accuracy_level 4 (onnx, weight-only)


@dataclass(frozen=True)
class PartSpec:
    """One graph: consecutive layers of one rank (a pipeline stage or a piece of one)."""

    rank: int
    layers: range  # global layer indices
    first: bool  # holds the embedding: takes input_ids (else hidden_in)
    last: bool  # holds the final norm and lm_head: returns logits (else hidden_out)
    index: int = 0  # position of this part in the rank's chain
    count: int = 1  # parts in the rank's chain

    @property
    def stem(self) -> str:
        return f"rank{self.rank}" if self.count == 1 else f"rank{self.rank}.part{self.index}"


class RankWeights:
    """Reads one rank's tensors from its kiln checkpoint file, one at a time: float tensors
    cast to the build dtype (:meth:`get`), a quantized checkpoint's int8 / packed int4 / fp8
    weights as stored (:meth:`raw`)."""

    def __init__(self, path: Path, dtype: str):
        self.path = Path(path)
        self.dtype = getattr(torch, dtype)
        self.infos: dict[str, TensorInfo] = read_header(self.path, REWRITE)[0]

    def get(self, role: Role, layer: int | None = None) -> torch.Tensor | None:
        info = self.infos.get(role.name(layer))
        if info is None:
            return None
        return cast_checked(role.name(layer), info, read_checked(role.name(layer), info),
                            self.dtype)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (quantized values keep their dtype)."""
        return read_checked(name, self.infos[name])

    def nbytes(self, names: list[str]) -> int:
        """Bytes of the named tensors as the build holds them: float tensors (weights, scales)
        at the build dtype, quantized ones (int8, packed int4, fp8) as stored."""
        return sum(self.sizes(n)[1] for n in names if n in self.infos)

    def sizes(self, name: str) -> tuple[int, int]:
        """(bytes of tensor ``name`` as stored, as the build holds it: see :meth:`nbytes`)."""
        info = self.infos[name]
        cast = info.dtype.is_floating_point and info.dtype.itemsize > 1
        built = info.nbytes // info.dtype.itemsize * self.dtype.itemsize if cast else info.nbytes
        return info.nbytes, built


@dataclass
class EmitContext:
    """One part's emission state: emitter, specs, weights and derived local sizes."""

    g: GraphEmitter
    spec: GraphSpec
    part: PartSpec
    weights: RankWeights
    shared: dict[str, str] = field(default_factory=dict)  # graph inputs and per-graph values

    @property
    def decoder(self) -> DecoderConfig:
        return self.spec.decoder

    @property
    def tp(self) -> int:
        return self.spec.mapping.tp_size

    @property
    def tp_rank(self) -> int:
        return self.spec.mapping.coords(self.part.rank)[0]

    @property
    def elem(self) -> int:
        return ONNX_DTYPES[self.spec.dtype]

    @property
    def heads(self) -> int:
        return self.spec.mapping.local_heads(self.decoder)

    @property
    def kv_heads(self) -> int:
        return self.spec.mapping.local_kv_heads(self.decoder)

    @property
    def intermediate(self) -> int:
        return self.spec.mapping.local_intermediate(self.decoder)

    def weight(self, role: Role, layer: int | None = None, *, linear: bool = False) -> str | None:
        """The initializer for a role (None if the model has none).

        ``linear``: a MatMul operand [in, out], as ``Transpose`` of the stored nn.Linear
        [out, in] initializer. Both runtimes fold it (TensorRT keeps the [out, in] layout its
        GEMMs prefer; ONNX Runtime transposes once when it optimizes), and the build never
        copies the weight to transpose it.
        """
        tensor = self.weights.get(role, layer)
        if tensor is None:
            return None
        name = self.g.weight(role.name(layer), tensor)
        if not linear:
            return name
        return self.g.op("Transpose", name, name=role.name(layer).rsplit(".", 1)[0].split(".")[-1]
                         + "_weight", perm=[1, 0])

    def linear(self, role: Role, layer: int | None) -> Projection:
        """A layer's projection in the checkpoint's format and the backend's form: its weight
        side is emitted now, the product when the returned Projection is called on an
        activation (see kiln/builder/graph/linear.py)."""
        from kiln.builder.graph.linear import projection

        return projection(self, role, layer)

    def cache_shape(self) -> list:
        return [BATCH, self.kv_heads, self.spec.max_seq_len, self.decoder.head_dim]


FLOAT32 = TensorProto.FLOAT
INT32 = TensorProto.INT32
INT64 = TensorProto.INT64
