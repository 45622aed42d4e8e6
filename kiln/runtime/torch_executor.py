"""Runtime entry of the ``torch`` backend for :mod:`kiln.runtime.loader`.

``check_machine`` refuses, from the manifest alone, what cannot run here (no CUDA GPU for a
cuda-only engine, tensor/pipeline-parallel engines); ``check_options`` refuses ``device auto``
on a machine without a GPU: the CPU path runs PyTorch reference kernels, slower than an onnx
engine there (:data:`CPU_SPEED`), so it runs only when ``device cpu`` is asked, with a
warning. ``load_executor`` reads the packed weights of rank 0 and returns a
:class:`~kiln.runtime.torch_backend.executor.TorchExecutor` on CUDA (Triton kernels, CUDA
graphs) or, asked explicitly, on the CPU. The executor itself lives in
:mod:`kiln.runtime.torch_backend`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kiln.engine import EngineError, EngineManifest
from kiln.engine.torch_files import check_mapping, check_packed, read_packed
from kiln.runtime.compat import MachineInfo, sm
from kiln.runtime.loader import ExecutorOptions
from kiln.runtime.torch_backend.executor import (
    KV_CACHE_DTYPES,
    TorchExecutor,
    TorchExecutorOptions,
)
from kiln.runtime.torch_backend.paged_cache import PagedKVCache, cdiv

logger = logging.getLogger(__name__)

FP8_CAPABILITY = (8, 9)


# Measured by a new-user trial (kiln run, same machine, onnx vs torch --device cpu): a
# measurement to quote, not a factor that holds for every model.
CPU_SPEED = "slower than an onnx engine (SmolLM2 on 2 CPU cores: 25 vs 40 tokens/s)"
# Measured by the same trial on quantized SmolLM2 torch engines (kiln run --chat, 8 tokens).
QUANTIZED_CPU_SPEED = (", and a quantized one dequantizes every weight at every step there "
                       "(SmolLM2 on 2 idle cores: int8_wo 5.7, fp8 2.8, int4_awq 1.6 tokens/s)")
NEEDS_GPU = ("this torch engine needs a CUDA GPU for its Triton kernels; on this machine use an "
             "onnx engine (kiln build --backend onnx), or pass --device cpu to run the PyTorch "
             f"reference kernels, {CPU_SPEED}")


def _device(manifest: EngineManifest, requested: str, has_gpu: bool) -> str:
    if requested == "auto" and not has_gpu:
        raise EngineError(NEEDS_GPU)
    device = "cuda" if requested == "auto" else requested
    if device not in manifest.targets:
        raise EngineError(f"this torch engine was built for {', '.join(manifest.targets)}, not "
                          f"{device}; rebuild with kiln build --backend torch --target "
                          f"{device}")
    if device == "cuda" and not has_gpu:
        raise EngineError("no CUDA GPU is visible for this torch engine; run on a GPU machine, "
                          f"or pass --device cpu to run the PyTorch reference kernels, {CPU_SPEED}")
    return device


def check_machine(manifest: EngineManifest, machine: MachineInfo) -> None:
    check_mapping(manifest.mapping, "rebuild from a tp 1 / pp 1 checkpoint")
    if not machine.gpus and "cpu" not in manifest.targets:
        raise EngineError("no CUDA GPU is visible for this torch engine, built for "
                          f"{', '.join(manifest.targets)}; run it on a GPU machine")


def check_gpu_formats(manifest: EngineManifest, capability: tuple[int, int]) -> None:
    """Refuse FP8 (weights or KV cache) on a GPU below sm89: no FP8 conversion or tensor cores."""
    quant = manifest.quantization
    if quant is None or capability >= FP8_CAPABILITY:
        return
    what = [f"{quant.qformat} weights"] if quant.info.weight_dtype == "float8_e4m3fn" else []
    if quant.kv_cache_dtype == "fp8":
        what.append("an fp8 KV cache")
    if what:
        raise EngineError(f"this torch engine has {' and '.join(what)}, which need a GPU of "
                          f"compute capability 8.9 or newer (sm89: Ada, Hopper, Blackwell); this "
                          f"GPU is {sm(capability)}; quantize with int8_sq, int8_wo, int4_wo or "
                          f"int4_awq (and --kv_cache_dtype int8) for it, or pass --device cpu")


def check_options(manifest: EngineManifest, machine: MachineInfo,
                  options: ExecutorOptions) -> None:
    _device(manifest, options.device, bool(machine.gpus))


def host_bytes(manifest: EngineManifest, device: torch.device,
               options: TorchExecutorOptions) -> dict[str, int]:
    """Host memory the executor allocates beyond the weights: the rotary tables (built on the
    host, peak ~10 bytes per position per head-dim entry) and, on the CPU, the KV cache."""
    cfg, limits = manifest.decoder, manifest.limits
    need = {"rotary tables": (10 * cfg.head_dim + 12) * limits.max_seq_len}
    if device.type == "cpu":
        page = options.page_size
        blocks = options.kv_cache_blocks or \
            limits.max_batch_size * cdiv(limits.max_seq_len, page) + 1
        quant = manifest.quantization
        kv = quant.kv_cache_dtype if quant is not None else None
        dtype = KV_CACHE_DTYPES[kv] if kv else getattr(torch, manifest.dtype)
        need["KV cache"] = blocks * PagedKVCache.block_bytes(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page, dtype)
    return need


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(manifest: EngineManifest, device: torch.device,
                      options: TorchExecutorOptions) -> None:
    """Refuse, before allocating, limits whose host memory exceeds what is available: the
    kernel's OOM killer ends an overcommitted process before any allocation fails."""
    need, available = host_bytes(manifest, device, options), available_memory()
    if available is None or sum(need.values()) <= available:
        return
    parts = ", ".join(f"{what} {n / 2**30:.1f} GiB" for what, n in need.items())
    limits = manifest.limits
    raise EngineError(f"this torch engine's limits (max_seq_len {limits.max_seq_len}, "
                      f"max_batch_size {limits.max_batch_size}) need {parts} of host memory, "
                      f"and {available / 2**30:.1f} GiB is available; rebuild with a smaller "
                      f"--max_seq_len or --max_batch_size")


def _fraction(options: ExecutorOptions) -> float:
    """--kv_cache_free_gpu_memory_fraction, or the torch executor's default (0.9)."""
    value = options.kv_cache_free_gpu_memory_fraction
    return TorchExecutorOptions.kv_cache_free_gpu_memory_fraction if value is None else value


def load_executor(engine_dir: Path, manifest: EngineManifest, options: ExecutorOptions,
                  torch_options: TorchExecutorOptions | None = None) -> TorchExecutor:
    device = torch.device(_device(manifest, options.device, torch.cuda.is_available()))
    if device.type == "cuda":
        check_gpu_formats(manifest, torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        logger.warning("torch engine on the CPU: PyTorch reference kernels, the slow path (%s)%s; "
                       "for speed run it on a CUDA GPU or build an onnx engine (kiln build "
                       "--backend onnx)", CPU_SPEED,
                       "" if manifest.quantization is None else QUANTIZED_CPU_SPEED)
    tensors: dict[str, torch.Tensor] = {}
    transposed: set[str] = set()
    for name in manifest.rank_files.get(0, ()):
        part, names = read_packed(Path(engine_dir) / name, device, manifest.quantization)
        tensors.update(part)
        transposed |= names
    check_packed(manifest.decoder, tensors, str(engine_dir), manifest.quantization)
    if torch_options is None:
        torch_options = TorchExecutorOptions(
            kv_cache_free_gpu_memory_fraction=_fraction(options))
    logger.info("torch engine: %d tensors on %s", len(tensors), device)
    check_host_memory(manifest, device, torch_options)
    try:
        return TorchExecutor(manifest.decoder, tensors, manifest.limits,
                             transposed=frozenset(transposed), device=device,
                             options=torch_options,
                             gather_context_logits=manifest.gather_context_logits,
                             quant=manifest.quantization)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        limits = manifest.limits
        reason = str(e).splitlines()[0]
        if len(reason) > 160:  # cut at a word
            reason = reason[:160].rsplit(" ", 1)[0] + " ..."
        raise EngineError(f"{engine_dir}: the torch executor could not allocate its tables and KV "
                          f"cache on {device} for this engine's limits (max_seq_len "
                          f"{limits.max_seq_len}, max_batch_size {limits.max_batch_size}): "
                          f"{reason}; rebuild with a smaller --max_seq_len or --max_batch_size"
                          + (", or lower --kv_cache_free_gpu_memory_fraction"
                             if device.type == "cuda" else "")) from None
