"""Opening an engine dir: manifest, machine check, file check, then the backend's executor.

Backends are a registry of module paths, imported only when an engine of that backend is
opened (so a CPU machine never imports TensorRT). A backend module defines

    check_machine(manifest: EngineManifest, machine: MachineInfo) -> None   # raise EngineError
    load_executor(engine_dir: Path, manifest: EngineManifest, options: ExecutorOptions) -> Executor

and may define ``check_options(manifest, machine, options) -> None`` to refuse options this
machine cannot honour (the torch backend: ``device auto`` without a GPU).

Order (nothing heavy happens before the checks pass): read and validate ``config.json``, check
it against this machine and the options, check the presence and sizes of the files of the ranks
this process opens (no data read; sha256 checksums too with ``verify_checksums``), then load.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from kiln.engine import EngineError, EngineManifest, check_files, read_manifest, verify_checksums
from kiln.runtime.compat import MachineInfo, describe_machine
from kiln.runtime.executor import Executor

logger = logging.getLogger(__name__)

BACKEND_MODULES: dict[str, str] = {
    "onnx": "kiln.runtime.onnx_executor",
    "tensorrt": "kiln.runtime.tensorrt_executor",
    "torch": "kiln.runtime.torch_executor",
}


@dataclass(frozen=True)
class ExecutorOptions:
    """Run-time choices that do not change the engine."""

    # onnx: "cpu", "cuda" or "auto" (CUDA when onnxruntime-gpu has it); torch: "auto" needs a
    # CUDA GPU, "cpu" runs the slow PyTorch reference kernels (asked explicitly only)
    device: str = "auto"
    num_threads: int | None = None  # CPU threads (None: all cores of this process)
    # Let idle CPU worker threads busy-wait for the next operator: ONNX Runtime's own default
    # (and onnxruntime-genai's). On the 2-core dev box (benchmarks/cpu_runtime_results.json,
    # SmolLM2) it gained in one run (16 x 128/128: 157 vs 147 tokens/s, batch-1 decode 32.1 vs
    # 30.3) and was even in another (168 vs 174, 34.5 vs 34.6). Turn it off on a machine shared
    # with other busy processes: there a spinning thread starves them and itself (measured
    # under heavy load: batch-1 decode 106 ms/token spinning vs 59 ms not).
    cpu_spin_wait: bool = True
    rank: int = 0  # this process's rank (tensor/pipeline parallel engines)
    verify_checksums: bool = False  # sha256 the files at load (else presence and sizes only)
    kv_cache_free_gpu_memory_fraction: float | None = None  # paged caches (torch backend)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise EngineError(f"device must be auto, cpu or cuda, found {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise EngineError(f"num_threads must be >= 1, found {self.num_threads}")
        fraction = self.kv_cache_free_gpu_memory_fraction
        if fraction is not None and not 0 < fraction <= 1:
            raise EngineError(f"kv_cache_free_gpu_memory_fraction must be in (0, 1], found "
                              f"{fraction}")


def backend_module(backend: str) -> ModuleType:
    name = BACKEND_MODULES.get(backend)
    if name is None:
        raise EngineError(f"backend {backend!r} has no runtime in this kiln (known: "
                          f"{', '.join(sorted(BACKEND_MODULES))}); rebuild with one of those")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise EngineError(f"the {backend} backend's runtime ({name}) is not part of this "
                              f"kiln install; rebuild the engine with another backend") from None
        raise


def loaded_ranks(manifest: EngineManifest, rank: int) -> tuple[int, ...]:
    """The ranks whose files a process of rank ``rank`` opens: its tensor-parallel rank in every
    pipeline stage (the onnx runtime chains the stages in one process; tensorrt and torch
    engines have one stage, so this is ``rank`` alone)."""
    mapping = manifest.mapping
    tp_rank, _ = mapping.coords(rank)
    return tuple(mapping.rank(tp_rank, stage) for stage in range(mapping.pp_size))


def open_engine(engine_dir: str | Path, options: ExecutorOptions | None = None,
                machine: MachineInfo | None = None) -> tuple[EngineManifest, Executor]:
    """Check and load an engine dir (see the module docstring)."""
    engine_dir = Path(engine_dir)
    options = options or ExecutorOptions()
    manifest = read_manifest(engine_dir)
    module = backend_module(manifest.backend)
    machine = machine if machine is not None else describe_machine()
    module.check_machine(manifest, machine)
    check_options = getattr(module, "check_options", None)
    if check_options is not None:
        check_options(manifest, machine, options)
    ranks = loaded_ranks(manifest, options.rank)
    check_files(engine_dir, manifest, ranks)
    if options.verify_checksums:
        verify_checksums(engine_dir, manifest, ranks)
    logger.info("loading %s engine from %s", manifest.backend, engine_dir)
    return manifest, module.load_executor(engine_dir, manifest, options)
