"""Opening an engine dir: manifest, machine check, file check, then the backend's executor.

Backends are a registry of module paths, imported only when an engine of that backend is
opened (so a CPU machine never imports TensorRT). A backend module defines

    check_machine(manifest: EngineManifest, machine: MachineInfo) -> None   # raise EngineError
    load_executor(engine_dir: Path, manifest: EngineManifest, options: ExecutorOptions) -> Executor

and may define ``check_options(manifest, machine, options) -> None`` to refuse options this
machine cannot honour (the torch backend: ``device auto`` without a GPU),
``loaded_ranks(manifest, rank) -> tuple[int, ...]`` when the files it opens are not the
default :func:`loaded_ranks` (the torch and tensorrt backends start every rank of an engine
themselves from the driver, rank 0: ``options.rank`` must be 0 for them, :func:`check_rank`), and
``run_device(manifest, machine, options) -> str`` (``"cuda"`` or ``"cpu"``: where the
executor will run; default ``"cpu"``), which data-parallel replicas need to know before
starting one process per GPU.

Under torchrun (``WORLD_SIZE`` > 1: :mod:`kiln.runtime.launch`), every rank checks
that the engine runs in that many processes (its ranks, for a backend that defines
``loaded_ranks``; else one), and ``dp`` is 1, before anything else of the options.

Order (nothing heavy happens before the checks pass): read and validate ``config.json``, check
it against this machine and the options, check the presence and sizes of the files of the ranks
this process opens (no data read; sha256 checksums too with ``verify_checksums``), then load.
:func:`check_engine` is every step but the load; with ``options.dp`` > 1 (or
``engine_process``) it also checks that the engine and machine can hold that many replicas
(:func:`check_replicas`), which :class:`~kiln.runtime.distributed.replicas.ReplicaCore` (``LLM``
with ``dp`` or ``engine_process``) starts; :func:`open_engine` opens one executor in this
process, so it refuses both.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

from kiln.engine import (
    EngineError,
    EngineManifest,
    check_files,
    manifest_edit,
    read_manifest_data,
    verify_checksums,
)
from kiln.errors import a_or_an, build_smaller, option, wording
from kiln.runtime.compat import MachineInfo, describe_machine
from kiln.runtime.executor import Executor
from kiln.runtime.host_memory import available_memory
from kiln.runtime.launch import check_launch
from kiln.runtime.options import ExecutorOptions
from kiln.sizes import need_and_available, size_text

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


def check_rank(manifest: EngineManifest, module: ModuleType, options: ExecutorOptions) -> None:
    """``options.rank`` is a rank of the engine's world; 0 where the backend starts every rank
    itself (it defines ``loaded_ranks``): the process that opens the engine is the driver."""
    rank, world = options.rank, manifest.mapping.world_size
    if not 0 <= rank < world:
        raise EngineError(f"rank {rank} is not a rank of this engine, which has {world} "
                          f"(0 to {world - 1}); leave rank out (0)")
    if rank != 0 and hasattr(module, "loaded_ranks"):
        raise EngineError(f"rank must be 0 for {a_or_an(manifest.backend)} engine, found {rank}: "
                          f"the process that opens it is the driver (rank 0) and starts the "
                          f"engine's other ranks itself; leave rank out")


def run_device(module: ModuleType, manifest: EngineManifest, machine: MachineInfo,
               options: ExecutorOptions) -> str:
    """Where the backend's executor runs with these options: ``"cuda"`` or ``"cpu"``."""
    device_of = getattr(module, "run_device", None)
    return "cpu" if device_of is None else device_of(manifest, machine, options)


def check_replicas(manifest: EngineManifest, device: str, machine: MachineInfo,
                   options: ExecutorOptions) -> None:
    """``options.dp`` replicas of this engine (or the one process of ``engine_process``): each
    is one process of a tp 1 x pp 1 engine, and on CUDA each has a GPU of its own."""
    dp, mapping = options.dp, manifest.mapping
    if dp == 1 and mapping.world_size > 1:  # engine_process
        raise EngineError(f"{option('engine_process')} runs a single-rank engine in a process "
                          f"of its own, and this engine has {mapping.world_size} ranks (tp "
                          f"{mapping.tp_size} x pp {mapping.pp_size}), whose model steps "
                          f"already run in rank processes; leave {option('engine_process')} "
                          f"out")
    if mapping.world_size > 1:
        # beside --model_dir the engine is built from the command's options (retest 44c had
        # been sent to kiln convert_checkpoint)
        single = f"pass {option('tp_size', 1)} and {option('pp_size', 1)}" \
            if wording().limits_as_options else \
            "build a tp 1 x pp 1 engine (kiln convert_checkpoint --tp_size 1 --pp_size 1)"
        raise EngineError(f"{option('dp', dp)} runs copies of a single-rank engine, and this "
                          f"engine has {mapping.world_size} ranks (tp {mapping.tp_size} x pp "
                          f"{mapping.pp_size}); run it with {option('dp', 1)}, or {single} for "
                          f"data parallelism")
    gpus = len(machine.gpus)
    if device == "cuda" and dp > gpus:
        raise EngineError(f"{option('dp', dp)} needs {dp} GPUs (one replica per GPU), and this "
                          f"machine has {gpus} visible; run with {option('dp', max(1, gpus))}, "
                          f"or where {dp} GPUs are visible")
    if device != "cuda" and dp > 1:
        check_replica_memory(manifest, dp)


def replica_host_bytes(manifest: EngineManifest) -> int:
    """A CPU replica's host memory at full load: its engine files (read into memory) and a KV
    cache for the engine's limits (every row at max_seq_len; its pages are touched as it
    fills)."""
    return sum((manifest.sizes or {}).values()) + manifest.full_kv_cache_bytes()


def check_replica_memory(manifest: EngineManifest, dp: int) -> None:
    """Refuse ``dp`` CPU replicas whose host memory exceeds what is available, before any
    starts: they start one after another, and past the memory the kernel's OOM killer ends
    them while the rest still load (a new user's ``--dp 100`` on a 23 GB machine)."""
    each, available = replica_host_bytes(manifest), available_memory()
    if available is None or dp * each <= available:
        return
    fit = available // each
    fix = f"run with {option('dp', fit)} or fewer" if fit > 1 else \
        f"run without {option('dp')}, or {build_smaller('max_batch_size', 'max_seq_len')}"
    need, have = need_and_available(dp * each, available)
    raise EngineError(f"{option('dp', dp)}: {dp} CPU replicas of this engine need up to "
                      f"{need} of host memory ({size_text(each)} each, its "
                      f"files and a full KV cache), and {have} is available; "
                      f"{fix}")


def check_runnable(manifest: EngineManifest, options: ExecutorOptions | None = None,
                   machine: MachineInfo | None = None) -> tuple[ModuleType, MachineInfo]:
    """The checks of :func:`check_engine` that read the manifest alone (no engine file): can
    this machine run it with these options. Also run on a planned manifest before a build that
    a command then runs (``kiln run --model_dir``): (backend module, machine)."""
    options = options or ExecutorOptions()
    module = backend_module(manifest.backend)
    machine = machine if machine is not None else describe_machine(manifest.backend)
    module.check_machine(manifest, machine)
    check_launch(manifest.mapping, manifest.backend, hasattr(module, "loaded_ranks"), options.dp)
    check_rank(manifest, module, options)
    if options.dp > 1 or options.engine_process:  # before the backend's warnings (slow path)
        check_replicas(manifest, run_device(module, manifest, machine, options), machine,
                       options)
    check_options = getattr(module, "check_options", None)
    if check_options is not None:
        check_options(manifest, machine, options)
    gpu_only = {  # the torch backend's options for a GPU: said to do nothing elsewhere
        "kv_cache_free_gpu_memory_fraction": (options.kv_cache_free_gpu_memory_fraction
                                              is not None, "sizes the torch backend's KV cache"),
        "prefill_attention": (options.prefill_attention not in (None, "auto"),
                              "chooses the torch backend's attention kernel")}
    given = [(name, what) for name, (set_, what) in gpu_only.items() if set_]
    if given and (manifest.backend != "torch"
                  or run_device(module, manifest, machine, options) != "cuda"):
        where = f"{a_or_an(manifest.backend)} engine" if manifest.backend != "torch" \
            else "the CPU"
        for name, what in given:
            warn_once(f"{name} has no effect on {where}: it {what} on a GPU")
    return module, machine


_WARNED: set[str] = set()  # what this process has said once (checks run before and at a load)


def warn_once(message: str, log: logging.Logger = logger) -> None:
    """Say ``message`` at WARNING once a process (a --dp replica: once for all, by the front):
    for what the checks find, which run before a load and again at it."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def warned() -> frozenset[str]:
    """The warnings of the checks that this process has said (each once)."""
    return frozenset(_WARNED)


def mark_warned(messages: frozenset[str]) -> None:
    """Take ``messages`` as said already: an engine process started by one that said them
    (a ``--dp`` replica) does not say them again."""
    _WARNED.update(messages)


def check_engine(engine_dir: str | Path, options: ExecutorOptions | None = None,
                 machine: MachineInfo | None = None,
                 ) -> tuple[EngineManifest, ModuleType, MachineInfo]:
    """Every check of :func:`open_engine`, nothing loaded: (manifest, backend module, machine)."""
    engine_dir = Path(engine_dir)
    options = options or ExecutorOptions()
    manifest, data = read_manifest_data(engine_dir)
    if (edit := manifest_edit(data)):
        warn_once(f"{engine_dir}/{edit}; it runs as it reads now")
    module, machine = check_runnable(manifest, options, machine)
    ranks = getattr(module, "loaded_ranks", loaded_ranks)(manifest, options.rank)
    check_files(engine_dir, manifest, ranks)
    if options.verify_checksums:
        verify_checksums(engine_dir, manifest, ranks)
    return manifest, module, machine


def open_engine(engine_dir: str | Path, options: ExecutorOptions | None = None,
                machine: MachineInfo | None = None) -> tuple[EngineManifest, Executor]:
    """Check and load an engine dir (see the module docstring)."""
    options = options or ExecutorOptions()
    if options.dp > 1 or options.engine_process:
        asked = f"dp is {options.dp}" if options.dp > 1 else "engine_process is set"
        raise EngineError(f"open_engine opens one executor in this process, and {asked}: engine "
                          f"processes are started by LLM(engine_dir, ExecutorOptions(...))")
    manifest, module, _ = check_engine(engine_dir, options, machine)
    logger.info("loading %s engine from %s", manifest.backend, engine_dir)
    return manifest, module.load_executor(Path(engine_dir), manifest, options)
