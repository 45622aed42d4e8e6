"""Can this engine run on this machine? Checked from the manifest before any engine file loads.

Contract: :func:`describe_machine` gathers what matters (kiln version, installed backend
libraries, CUDA GPUs and their compute capabilities); the ``check_*`` functions compare a
manifest with it and raise :class:`~kiln.engine.EngineError` whose one-line message says what
does not match, why it matters and what to rebuild or install. Checks are pure functions of
(manifest, machine), so tests pass a hand-made :class:`MachineInfo`.

Non-goals: checking free memory (the backend reports that when it allocates).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
from dataclasses import dataclass, field

import kiln
from kiln.engine import EngineError, EngineManifest
from kiln.interrupts import interrupt_in

logger = logging.getLogger(__name__)

# Compute capabilities TensorRT-RTX refuses at run time (data-centre Hopper and Blackwell).
RTX_UNSUPPORTED = {(9, 0): "Hopper", (10, 0): "Blackwell (data centre)",
                   (10, 3): "Blackwell (data centre)"}
BACKEND_LIBRARIES = ("onnxruntime", "tensorrt", "tensorrt_rtx")
# What each backend's runtime imports (describe_machine probes only these: importing a library
# the engine never uses costs seconds, and tensorrt_rtx's import swallows a Ctrl-C).
LIBRARIES_OF = {"onnx": ("onnxruntime",), "tensorrt": ("tensorrt", "tensorrt_rtx"), "torch": ()}


@dataclass(frozen=True)
class MachineInfo:
    kiln_version: str
    libraries: dict[str, str] = field(default_factory=dict)  # import name -> version
    gpus: tuple[tuple[int, int], ...] = ()  # compute capability of each visible CUDA GPU
    onnxruntime_providers: tuple[str, ...] = ()


def sm(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


def library_version(module: str) -> str | None:
    """The installed version of an importable module, or None when it is not installed."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except Exception as e:  # a broken install (missing shared library) counts as absent
        if interrupt_in(e) is not None:  # a Ctrl-C the import turned into its own error
            raise KeyboardInterrupt from e
        logger.warning("%s is installed but fails to import: %s", module, e)
        return None


def cuda_capabilities() -> tuple[tuple[int, int], ...]:
    """Compute capabilities of the visible CUDA GPUs, via torch or the driver API."""
    import torch

    if torch.cuda.is_available():
        return tuple(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ()
    count, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return ()
    caps = []
    for i in range(count.value):  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR = 75/76
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, i)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, i)
        caps.append((major.value, minor.value))
    return tuple(caps)


def describe_machine(backend: str | None = None) -> MachineInfo:
    """This machine, with the libraries of ``backend`` (None: of every backend)."""
    modules = BACKEND_LIBRARIES if backend is None else LIBRARIES_OF.get(backend, BACKEND_LIBRARIES)
    libraries = {m: v for m in modules if (v := library_version(m)) is not None}
    providers: tuple[str, ...] = ()
    if "onnxruntime" in libraries:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    return MachineInfo(kiln.__version__, libraries, cuda_capabilities(), providers)


def _major_minor(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def kiln_version_problem(built: str, running: str) -> str | None:
    """Why kiln ``running`` cannot run an engine built by kiln ``built`` (another major or
    minor version; unrecorded: no problem), or None."""
    if built and _major_minor(built) != _major_minor(running):
        return (f"engine built by kiln {built}, this is kiln {running}: rebuild the engine with "
                f"this kiln (kiln build)")
    return None


def check_kiln_version(manifest: EngineManifest, machine: MachineInfo) -> None:
    problem = kiln_version_problem(manifest.kiln_version, machine.kiln_version)
    if problem is not None:
        raise EngineError(problem)


def check_onnx(manifest: EngineManifest, machine: MachineInfo) -> None:
    """ONNX Runtime present (and not older than the build's), tp_size 1, CUDA if targeted."""
    check_kiln_version(manifest, machine)
    if manifest.mapping.tp_size != 1:
        raise EngineError(f"onnx engine has tp_size {manifest.mapping.tp_size}; ONNX Runtime has "
                          f"no all-reduce, so it runs tp_size 1 only (pipeline stages chain in "
                          f"one process): build the checkpoint with --backend torch, which runs "
                          f"one process per rank, or --backend tensorrt (NVIDIA GPUs), or "
                          f"convert it with --tp_size 1")
    have = machine.libraries.get("onnxruntime")
    if have is None:
        raise EngineError("onnx engine needs ONNX Runtime, which is not installed: "
                          "pip install onnxruntime (or onnxruntime-gpu)")
    built = manifest.backend_version.get("onnxruntime")
    if built and _major_minor(have) < _major_minor(built):
        raise EngineError(f"onnx engine was built and checked with onnxruntime {built}; this "
                          f"machine has {have}, which may lack its operators: upgrade "
                          f"onnxruntime to >= {built}")
    if "cuda" in manifest.targets and "cpu" not in manifest.targets and \
            "CUDAExecutionProvider" not in machine.onnxruntime_providers:
        raise EngineError("onnx engine targets CUDA but ONNX Runtime has no "
                          "CUDAExecutionProvider here: install onnxruntime-gpu, or rebuild for cpu")


def check_tensorrt(manifest: EngineManifest, machine: MachineInfo) -> None:
    """A CUDA GPU the engine targets, enough GPUs for its ranks, and its exact TensorRT."""
    check_kiln_version(manifest, machine)
    library = "tensorrt_rtx" if "tensorrt_rtx" in manifest.backend_version else "tensorrt"
    built = manifest.backend_version.get(library, "unknown")
    if not machine.gpus:
        raise EngineError("tensorrt engine needs an NVIDIA GPU, and this machine has no CUDA "
                          "GPU (or driver): run it on a GPU machine, or build an onnx engine "
                          "for the CPU (--backend onnx)")
    gpu = machine.gpus[0]
    if library == "tensorrt_rtx" and gpu in RTX_UNSUPPORTED:
        raise EngineError(f"this is a TensorRT-RTX engine and this GPU is {sm(gpu)} "
                          f"({RTX_UNSUPPORTED[gpu]}); TensorRT-RTX does not support "
                          f"{RTX_UNSUPPORTED[gpu]}: full TensorRT is needed (rebuild with kiln "
                          f"build --backend tensorrt on a machine with the tensorrt package), "
                          f"or build the torch backend")
    targets = tuple(t for t in manifest.targets if t.startswith("sm"))
    if targets and sm(gpu) not in targets:
        raise EngineError(f"engine targets {', '.join(targets)} but this GPU is {sm(gpu)}: "
                          f"rebuild with --target {sm(gpu)}")
    if manifest.mapping.world_size > len(machine.gpus):
        raise EngineError(f"engine has {manifest.mapping.world_size} ranks but this machine has "
                          f"{len(machine.gpus)} GPU(s): run it where there is one GPU per rank, "
                          f"or rebuild with fewer ranks (--tp_size/--pp_size)")
    have = machine.libraries.get(library)
    if have is None:
        raise EngineError(f"engine was built with {library} {built}, which is not installed "
                          f"here: install {library} {built}")
    if have != built:
        raise EngineError(f"engine was built with {library} {built} but this machine has {have}; "
                          f"TensorRT engines only load in the version that built them: install "
                          f"{library} {built} or rebuild the engine here")
