"""Opening an engine dir: manifest, machine check, file check, then the backend's executor.

Backends are a registry of module paths, imported only when an engine of that backend is
opened (so a CPU machine never imports TensorRT). A backend module defines

    check_machine(manifest: EngineManifest, machine: MachineInfo) -> None   # raise EngineError
    load_executor(engine_dir: Path, manifest: EngineManifest, options: ExecutorOptions) -> Executor

and may define ``check_options(manifest, machine, options) -> None`` to refuse options this
machine cannot honour (the torch backend: ``device auto`` without a GPU), and
``loaded_ranks(manifest, rank) -> tuple[int, ...]`` when the files it opens are not the
default :func:`loaded_ranks` (the torch backend starts every rank of an engine itself).

Order (nothing heavy happens before the checks pass): read and validate ``config.json``, check
it against this machine and the options, check the presence and sizes of the files of the ranks
this process opens (no data read; sha256 checksums too with ``verify_checksums``), then load.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

from kiln.engine import EngineError, EngineManifest, check_files, read_manifest, verify_checksums
from kiln.runtime.compat import MachineInfo, describe_machine
from kiln.runtime.executor import Executor
from kiln.runtime.options import ExecutorOptions

logger = logging.getLogger(__name__)

BACKEND_MODULES: dict[str, str] = {
    "onnx": "kiln.runtime.onnx_executor",
    "tensorrt": "kiln.runtime.tensorrt_executor",
    "torch": "kiln.runtime.torch_executor",
}


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
    pipeline stage (the onnx runtime chains the stages in one process; tensorrt engines have
    one stage, so this is ``rank`` alone). A backend module may define its own."""
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
    machine = machine if machine is not None else describe_machine(manifest.backend)
    module.check_machine(manifest, machine)
    check_options = getattr(module, "check_options", None)
    if check_options is not None:
        check_options(manifest, machine, options)
    ranks = getattr(module, "loaded_ranks", loaded_ranks)(manifest, options.rank)
    check_files(engine_dir, manifest, ranks)
    if options.verify_checksums:
        verify_checksums(engine_dir, manifest, ranks)
    logger.info("loading %s engine from %s", manifest.backend, engine_dir)
    return manifest, module.load_executor(engine_dir, manifest, options)
