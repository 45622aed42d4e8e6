"""The backend registry and the interface every engine backend implements.

A backend turns planned parts of a kiln checkpoint into engine files. Register one with::

    @register_backend("torch")
    class TorchBackend(Backend):
        memory_factor = 1.0        # peak host RAM ~ factor x the weight bytes of one part
        base_memory = 1 << 30      # + this much (libraries, buffers)

        def versions(self) -> dict[str, str]: ...            # {"torch": "2.13.0"} -> manifest
        def default_targets(self, dtype) -> tuple[str, ...]: ...
        def check(self, plan: BuildPlan) -> None: ...        # refuse what it cannot build (EngineError / ConfigError)
        def build_part(self, job: PartJob) -> PartResult: ...

Contract:
- The constructor raises :class:`~kiln.engine.EngineError` (one line: what is missing, the
  pip requirement that provides it) when the backend's library cannot be used here.
- ``check`` runs once, before anything is written; it validates targets, dtype, mapping and
  quantization against what the backend can build, and raises with the reason.
- ``build_part`` writes the part's files into ``job.out_dir`` (named from ``job.part.stem``),
  may use ``job.work_dir`` for scratch, returns their names in load order and its timings. It
  may run in a worker process (``--workers``): jobs and results are picklable, and a backend
  instance is created in each worker.
- Planning splits a rank into parts of consecutive layers so that
  ``memory_factor * part_weight_bytes + base_memory`` stays under the per-worker budget (a
  backend that streams tensors one at a time sets ``tensor_copies``: the part's largest tensor
  as read plus that many copies at the build's size are added); the runtime chains a rank's
  parts (``hidden_out`` -> ``hidden_in``).

Backends live in ``kiln/builder/<name>_backend.py`` and are imported on first use.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.checkpoint import CheckpointConfig
from kiln.engine import BuildLimits
from kiln.errors import EngineError, option

if TYPE_CHECKING:  # the graph context imports onnx (~0.6 s): not for a backend's versions
    from kiln.builder.graph.context import GraphSpec, PartSpec

_MODULES = ("kiln.builder.onnx_backend", "kiln.builder.tensorrt_backend",
            "kiln.builder.torch_backend")
_REGISTRY: dict[str, type[Backend]] = {}


@dataclass(frozen=True)
class BuildPlan:
    """A build, resolved: the checkpoint, the graph settings, limits and targets."""

    checkpoint_dir: Path
    checkpoint: CheckpointConfig
    graph: GraphSpec
    limits: BuildLimits
    targets: tuple[str, ...]

    @property
    def dtype(self) -> str:
        return self.graph.dtype


@dataclass(frozen=True)
class PartJob:
    plan: BuildPlan
    part: PartSpec
    out_dir: Path  # the engine dir being written (a temporary dir renamed at the end)
    work_dir: Path  # scratch space on the same filesystem, removed at the end
    progress: bool = False  # draw a live progress line on stderr (in-process builds only)


def part_label(plan: BuildPlan, part: PartSpec) -> str:
    mapping = plan.checkpoint.mapping
    tp_rank, pp_rank = mapping.coords(part.rank)
    where = f"rank {part.rank}"
    if mapping.world_size > 1:
        where += f" (tp {tp_rank}, stage {pp_rank})"
    if part.count > 1:
        where += f" part {part.index + 1}/{part.count}"
    return f"{where} layers {part.layers.start}-{part.layers.stop - 1}"


@dataclass
class PartResult:
    part: PartSpec
    files: tuple[str, ...]  # in load order, relative to the engine dir
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    peak_rss: int = 0  # bytes, of the process that built the part
    info: dict[str, Any] = field(default_factory=dict)  # backend details (e.g. layer counts)
    checksums: dict[str, str] = field(default_factory=dict)  # file -> sha256 (set by the runner)
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes (set by the runner)


class Backend(ABC):
    """One engine backend (see the module docstring for the contract)."""

    name: ClassVar[str]
    memory_factor: ClassVar[float] = 1.0
    base_memory: ClassVar[int] = 0
    tensor_copies: ClassVar[int] = 0
    # Build parts in a worker process even with one worker: the library's native build runs
    # for long stretches without returning to Python, and only a process stops at once.
    isolated: ClassVar[bool] = False

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Library name -> version, recorded in the manifest."""

    @abstractmethod
    def default_targets(self, dtype: str) -> tuple[str, ...]:
        """Targets used when the user names none."""

    @abstractmethod
    def check(self, plan: BuildPlan) -> None:
        """Raise (EngineError / ConfigError) if this backend cannot build ``plan`` here."""

    @abstractmethod
    def build_part(self, job: PartJob) -> PartResult:
        """Write one part's files into ``job.out_dir``."""


def check_kv_cache(plan: BuildPlan, backend: str) -> None:
    """Refuse a quantized KV cache: the per-rank graph (onnx and tensorrt) keeps its cache in
    the model dtype, because TensorRT's KV-cache update layer rejects FP8 and INT8 caches."""
    quant = plan.checkpoint.quantization
    if quant is not None and quant.kv_cache_dtype is not None:
        raise EngineError(f"the {backend} backend cannot build the checkpoint's "
                          f"{quant.kv_cache_dtype} KV cache: its graph keeps the cache in the "
                          f"model dtype (TensorRT's KV-cache update layer rejects FP8/INT8 "
                          f"caches); build it with {option('backend', 'torch')} (which runs it "
                          f"on a GPU), or quantize the checkpoint without a KV-cache dtype")


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    def register(cls: type[Backend]) -> type[Backend]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"backend {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return register


def _load_modules() -> None:
    for module in _MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def backend_names() -> list[str]:
    _load_modules()
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    """An instance of the named backend (EngineError if unknown or unusable here). Imports
    that backend's module only, when it follows the naming rule (module docstring)."""
    module = f"kiln.builder.{name}_backend"
    if name not in _REGISTRY and module in _MODULES and importlib.util.find_spec(module):
        importlib.import_module(module)
    if name not in _REGISTRY:
        _load_modules()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        guess = f" (did you mean {close[0]}?)" if close else ""
        raise EngineError(f"unknown backend {name!r}{guess}; this kiln has "
                          f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()
