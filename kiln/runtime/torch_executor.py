"""Runtime entry of the ``torch`` backend for :mod:`kiln.runtime.loader`.

``check_machine`` refuses, from the manifest alone, what cannot run here (no CUDA GPU for a
cuda-only engine, tensor/pipeline-parallel engines); ``load_executor`` reads the packed
weights of rank 0 and returns a :class:`~kiln.runtime.torch_backend.executor.TorchExecutor`
on CUDA when a GPU is visible (Triton kernels, CUDA graphs), else on the CPU (PyTorch reference
kernels). The executor itself lives in :mod:`kiln.runtime.torch_backend`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kiln.builder.torch_backend import check_packed, read_packed
from kiln.engine import EngineError, EngineManifest
from kiln.runtime.compat import MachineInfo
from kiln.runtime.loader import ExecutorOptions
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions

logger = logging.getLogger(__name__)


def _device(manifest: EngineManifest, requested: str, has_gpu: bool) -> str:
    device = requested if requested != "auto" else ("cuda" if has_gpu else "cpu")
    if device not in manifest.targets:
        raise EngineError(f"this torch engine was built for {', '.join(manifest.targets)}, not "
                          f"{device}; rebuild with kiln build --backend torch --targets "
                          f"{device}")
    if device == "cuda" and not has_gpu:
        raise EngineError("no CUDA GPU is visible for this torch engine; run on a GPU machine "
                          "or pass device cpu (engines built for cpu run there, slowly)")
    return device


def check_machine(manifest: EngineManifest, machine: MachineInfo) -> None:
    if manifest.mapping.tp_size != 1 or manifest.mapping.pp_size != 1:
        raise EngineError(f"the torch executor runs tp_size=1, pp_size=1 engines, this one has "
                          f"tp_size={manifest.mapping.tp_size}, pp_size="
                          f"{manifest.mapping.pp_size}; rebuild from a tp 1 / pp 1 checkpoint")
    _device(manifest, "auto", bool(machine.gpus))


def _fraction(options: ExecutorOptions) -> float:
    """--kv_cache_free_gpu_memory_fraction, or the torch executor's default (0.9)."""
    value = options.kv_cache_free_gpu_memory_fraction
    return TorchExecutorOptions.kv_cache_free_gpu_memory_fraction if value is None else value


def load_executor(engine_dir: Path, manifest: EngineManifest, options: ExecutorOptions,
                  torch_options: TorchExecutorOptions | None = None) -> TorchExecutor:
    device = torch.device(_device(manifest, options.device, torch.cuda.is_available()))
    tensors: dict[str, torch.Tensor] = {}
    transposed: set[str] = set()
    for name in manifest.rank_files.get(0, ()):
        part, names = read_packed(Path(engine_dir) / name, device)
        tensors.update(part)
        transposed |= names
    check_packed(manifest.decoder, tensors, str(engine_dir))
    if torch_options is None:
        torch_options = TorchExecutorOptions(
            kv_cache_free_gpu_memory_fraction=_fraction(options))
    logger.info("torch engine: %d tensors on %s", len(tensors), device)
    return TorchExecutor(manifest.decoder, tensors, manifest.limits,
                         transposed=frozenset(transposed), device=device, options=torch_options)
