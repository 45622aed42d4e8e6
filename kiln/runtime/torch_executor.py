"""Runtime entry of the ``torch`` backend for :mod:`kiln.runtime.loader`.

``check_machine`` refuses, from the manifest alone, what cannot run here (no CUDA GPU for a
cuda-only engine); ``check_options`` refuses ``device auto`` on a machine without a GPU: the
CPU path runs PyTorch reference kernels, slower than an onnx engine there (:data:`CPU_SPEED`),
so it runs only when ``device cpu`` is asked, with a warning; and a tensor/pipeline-parallel
engine on CUDA with fewer visible GPUs than ranks on this machine (one process and one GPU per
rank; under torchrun, this node's ranks: ``LOCAL_WORLD_SIZE``).
``load_executor`` reads the packed weights of rank 0 and returns a
:class:`~kiln.runtime.torch_backend.executor.TorchExecutor` on CUDA (Triton kernels, CUDA
graphs) or, asked explicitly, on the CPU; for an engine of several ranks it starts one worker
process per other rank (or joins torchrun's: :func:`kiln.runtime.distributed.pool.start_ranks`)
and returns the driver's
:class:`~kiln.runtime.distributed.executor.DistributedExecutor` (:mod:`kiln.runtime.distributed`;
``loaded_ranks``: this process checks the files of every rank before starting them). The
executor itself lives in :mod:`kiln.runtime.torch_backend`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from kiln.engine import EngineError, EngineManifest
from kiln.engine.torch_files import check_packed, read_packed
from kiln.errors import build_smaller, option
from kiln.runtime.compat import MachineInfo, sm
from kiln.runtime.host_memory import available_memory
from kiln.runtime.launch import torchrun_env
from kiln.runtime.loader import ExecutorOptions, warn_once
from kiln.runtime.torch_backend.executor import (
    KV_CACHE_DTYPES,
    TorchExecutor,
    TorchExecutorOptions,
)
from kiln.runtime.torch_backend.paged_cache import PagedKVCache, cdiv
from kiln.runtime.torch_backend.parallel import RankShard
from kiln.sizes import need_and_available, size_text

logger = logging.getLogger(__name__)

FP8_CAPABILITY = (8, 9)


# Measured (forty-fifth session, the quiet 2-core dev machine, float32 engines of the same HF
# checkpoint, twice each: kiln bench --model_dir SMOLLM2 --device cpu --backend torch|onnx
# --input_len 32 --output_len 64 --num_requests 1 --warmup 1): torch 9.9-10.6 tokens/s, onnx
# 35.7-39.0 (the first trial's "25 vs 40" was not reproduced, by today's tree or its own: its
# decode GEMVs stream the float32 weights at ~9 GB/s, ONNX Runtime's at ~21). A measurement
# to quote, not a factor that holds for every model.
CPU_SPEED = "slower than an onnx engine: SmolLM2 on 2 CPU cores, 10 vs 37 tokens/s"
# Measured by the same trial on quantized SmolLM2 torch engines (kiln run --chat, 8 tokens);
# int4_wo (group 64) after the twenty-ninth session's faster unpacking, 12 tokens.
QUANTIZED_CPU_SPEED = (", and a quantized one dequantizes every weight at every step there "
                       "(SmolLM2 on 2 idle cores: int8_wo 5.7, fp8 2.8, int4_wo 1.6 in bfloat16 "
                       "and 3.0 in float32 tokens/s)")


def needs_gpu() -> str:
    """(A function: it names the options as the caller gives them, kiln.errors.option.)"""
    return (f"this torch engine needs a CUDA GPU for its Triton kernels; on this machine use an "
            f"onnx engine (build with {option('backend', 'onnx')}), or pass "
            f"{option('device', 'cpu')} to run the PyTorch reference kernels, {CPU_SPEED}")


def ranks_on_cpu() -> str:
    """An engine of several ranks: an onnx engine is no alternative (ONNX Runtime runs tp 1
    only)."""
    return (f"pass {option('device', 'cpu')} to run its ranks on the CPU with the PyTorch "
            f"reference kernels, {CPU_SPEED}")


def gpus_needed(manifest: EngineManifest) -> str:
    """``a CUDA GPU``, or for several ranks ``4 CUDA GPUs (4 ranks, tp 2 x pp 2, one GPU
    each)``."""
    mapping = manifest.mapping
    if mapping.world_size == 1:
        return "a CUDA GPU"
    return (f"{mapping.world_size} CUDA GPUs ({mapping.world_size} ranks, tp {mapping.tp_size} "
            f"x pp {mapping.pp_size}, one GPU each)")


def _device(manifest: EngineManifest, requested: str, has_gpu: bool) -> str:
    single = manifest.mapping.world_size == 1
    if requested == "auto" and "cuda" not in manifest.targets:  # built for the CPU alone
        requested = "cpu"  # (--target cpu: retest 45d's was refused as needing a GPU)
    if requested == "auto" and not has_gpu:
        raise EngineError(needs_gpu() if single else
                          f"this torch engine needs {gpus_needed(manifest)} for its Triton "
                          f"kernels, and none is visible here; {ranks_on_cpu()}")
    device = "cuda" if requested == "auto" else requested
    if device not in manifest.targets:
        raise EngineError(f"this torch engine was built for {', '.join(manifest.targets)}, not "
                          f"{device}; rebuild with kiln build --backend torch --target "
                          f"{device}")
    if device == "cuda" and not has_gpu:
        raise EngineError(f"no CUDA GPU is visible, and this torch engine needs "
                          f"{gpus_needed(manifest)}; run it where "
                          f"{'one is' if single else 'they are'} visible, or "
                          + (f"pass {option('device', 'cpu')} to run the PyTorch reference "
                             f"kernels, {CPU_SPEED}" if single else ranks_on_cpu()))
    return device


def check_machine(manifest: EngineManifest, machine: MachineInfo) -> None:
    if not machine.gpus and "cpu" not in manifest.targets:
        raise EngineError(f"no CUDA GPU is visible, and this torch engine, built for "
                          f"{', '.join(manifest.targets)}, needs {gpus_needed(manifest)}; run "
                          f"it on a GPU machine")


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
                          f"int4_awq (and {option('kv_cache_dtype', 'int8')}) for it, or pass "
                          f"{option('device', 'cpu')}")


def processes(manifest: EngineManifest) -> str:
    """``4 ranks (tp 2 x pp 2), one process each``: what an engine needs, in one phrase."""
    mapping = manifest.mapping
    return (f"{mapping.world_size} ranks (tp {mapping.tp_size} x pp {mapping.pp_size}), one "
            f"process each")


def check_options(manifest: EngineManifest, machine: MachineInfo,
                  options: ExecutorOptions) -> None:
    device = _device(manifest, options.device, bool(machine.gpus))
    if options.prefill_attention == "cudnn" and device != "cuda":  # else said at the load
        raise EngineError("prefill_attention='cudnn': cuDNN's attention runs on a CUDA GPU, "
                          "and this torch engine runs on the CPU here; use 'auto' or 'kiln'")
    world, gpus = manifest.mapping.world_size, len(machine.gpus)
    launch = torchrun_env()
    if device == "cuda" and launch is not None and launch.local_world_size > gpus:
        raise EngineError(f"this torch engine has {processes(manifest)} and one GPU per "
                          f"process, torchrun started {launch.local_world_size} of them on this "
                          f"node (LOCAL_WORLD_SIZE), and {gpus} CUDA GPU(s) are visible here; "
                          f"start at most {gpus} per node (--nproc_per_node)")
    if device == "cuda" and launch is None and world > gpus:
        raise EngineError(f"this torch engine has {processes(manifest)} and one GPU per "
                          f"process, and {gpus} CUDA GPU(s) are visible here; run "
                          f"it where {world} GPUs are visible, or rebuild from a checkpoint "
                          f"converted with fewer ranks (--tp_size/--pp_size)")
    if device == "cpu" and (launch is None or launch.rank == 0):
        # after the refusals: said only of an engine that runs, once (under torchrun by the
        # driver: a retest's 4 ranks had each said it)
        faster = "a CUDA GPU or build an onnx engine (build with --backend onnx)" \
            if manifest.mapping.world_size == 1 else f"{gpus_needed(manifest)}"  # onnx: tp 1
        warn_once(f"torch engine on the CPU: PyTorch reference kernels, the slow path "
                  f"({CPU_SPEED}){'' if manifest.quantization is None else QUANTIZED_CPU_SPEED};"
                  f" for speed run it on {faster}", logger)


def run_device(manifest: EngineManifest, machine: MachineInfo, options: ExecutorOptions) -> str:
    return _device(manifest, options.device, bool(machine.gpus))


def loaded_ranks(manifest: EngineManifest, rank: int) -> tuple[int, ...]:
    """Every rank: this process starts them all (a single-rank engine: rank 0). ``rank`` is
    0 (:func:`kiln.runtime.loader.check_rank`)."""
    return tuple(range(manifest.mapping.world_size))


def ranks_here(manifest: EngineManifest) -> int:
    """The engine's ranks on this machine: all of them, or under torchrun this node's."""
    launch = torchrun_env()
    return manifest.mapping.world_size if launch is None else launch.local_world_size


def host_bytes(manifest: EngineManifest, device: torch.device,
               options: TorchExecutorOptions) -> dict[str, int]:
    """Host memory the executor allocates beyond the weights, on this machine: the rotary
    tables (built on the host, peak ~10 bytes per position per head-dim entry) and, on the
    CPU, the KV cache."""
    cfg, limits, mapping = manifest.decoder, manifest.limits, manifest.mapping
    ranks = ranks_here(manifest)  # each rank's process builds its tables, on its host
    need = {"rotary tables": ranks * (10 * cfg.head_dim + 12) * limits.max_seq_len}
    if device.type == "cpu":
        page = options.page_size
        blocks = options.kv_cache_blocks or \
            limits.max_batch_size * cdiv(limits.max_seq_len, page) + 1
        quant = manifest.quantization
        kv = quant.kv_cache_dtype if quant is not None else None
        dtype = KV_CACHE_DTYPES[kv] if kv else getattr(torch, manifest.dtype)
        layers = cdiv(cfg.num_layers, mapping.pp_size)  # the largest stage
        need["KV cache"] = ranks * blocks * PagedKVCache.block_bytes(
            layers, mapping.local_kv_heads(cfg), cfg.head_dim, page, dtype)
    return need


def check_host_memory(manifest: EngineManifest, device: torch.device,
                      options: TorchExecutorOptions) -> None:
    """Refuse, before allocating, limits whose host memory exceeds what is available: the
    kernel's OOM killer ends an overcommitted process before any allocation fails."""
    need, available = host_bytes(manifest, device, options), available_memory()
    if available is None or sum(need.values()) <= available:
        return
    total, have = need_and_available(sum(need.values()), available)
    parts = ", ".join(f"{what} {size_text(n)}" for what, n in need.items())
    limits, here = manifest.limits, ranks_here(manifest)
    ranks = f" ({here} ranks together)" if here > 1 else ""
    raise EngineError(f"this torch engine's limits (max_seq_len {limits.max_seq_len}, "
                      f"max_batch_size {limits.max_batch_size}) need {total} of host memory "
                      f"({parts}){ranks}, "
                      f"and {have} is available; "
                      f"{build_smaller('max_seq_len', 'max_batch_size')}")


def _torch_options(options: ExecutorOptions,
                   given: TorchExecutorOptions | None) -> TorchExecutorOptions:
    """The executor's options: ``given`` (or the defaults) with what ``options`` sets."""
    set_here = {name: getattr(options, name) for name in
                ("kv_cache_free_gpu_memory_fraction", "prefill_attention")
                if getattr(options, name) is not None}
    return dataclasses.replace(given or TorchExecutorOptions(), **set_here)


def load_executor(engine_dir: Path, manifest: EngineManifest, options: ExecutorOptions,
                  torch_options: TorchExecutorOptions | None = None,
                  random_seed: int | None = None):
    """The executor of the loader's contract: a TorchExecutor, or for an engine of several
    ranks the driver's DistributedExecutor over one worker process per other rank.
    ``random_seed``: every rank makes random weights of the manifest's model on its device
    instead of reading files (:mod:`kiln.engine.random_weights`; ``engine_dir`` only names the
    engine in messages)."""
    device = torch.device(_device(manifest, options.device, torch.cuda.is_available()))
    if device.type == "cuda":
        check_gpu_formats(manifest, torch.cuda.get_device_capability(device))
    world = manifest.mapping.world_size  # on the CPU, check_options said the slow path
    torch_options = _torch_options(options, torch_options)
    check_host_memory(manifest, device, torch_options)
    if world > 1:
        from kiln.runtime.distributed.executor import DistributedExecutor

        logger.info("torch engine of %s: %s (%s)", processes(manifest),
                    "torchrun's processes" if torchrun_env() is not None else
                    f"starting {world - 1} worker processes",
                    "NCCL, one GPU each" if device.type == "cuda" else "gloo")
        return DistributedExecutor.open(engine_dir, manifest, device, torch_options,
                                        num_threads=options.num_threads,
                                        random_seed=random_seed)
    tensors = rank_weights(engine_dir, manifest, 0, device, random_seed)
    return build_executor(engine_dir, manifest, tensors, device, torch_options)


def rank_weights(engine_dir: Path, manifest: EngineManifest, rank: int, device: torch.device,
                 random_seed: int | None = None,
                 ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """:func:`read_rank`, or with ``random_seed`` the random weights of that rank."""
    if random_seed is None:
        return read_rank(engine_dir, manifest, rank, device)
    from kiln.engine.random_weights import random_rank_weights

    logger.warning("torch engine rank %d: random weights (seed %d), not %s's files", rank,
                   random_seed, engine_dir)
    return random_rank_weights(manifest, rank, device, random_seed)


def read_rank(engine_dir: Path, manifest: EngineManifest, rank: int, device: torch.device,
              ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Rank ``rank``'s packed weights on ``device``, checked against the manifest's model:
    (tensors, names stored transposed)."""
    tensors: dict[str, torch.Tensor] = {}
    transposed: set[str] = set()
    for name in manifest.rank_files.get(rank, ()):
        part, names = read_packed(Path(engine_dir) / name, device, manifest.quantization, rank,
                                  manifest.mapping)
        tensors.update(part)
        transposed |= names
    check_packed(manifest.decoder, tensors, str(engine_dir), manifest.quantization,
                 manifest.mapping, rank)
    logger.info("torch engine rank %d: %d tensors on %s", rank, len(tensors), device)
    return tensors, frozenset(transposed)


def build_executor(engine_dir: Path, manifest: EngineManifest,
                   weights: tuple[dict[str, torch.Tensor], frozenset[str]], device: torch.device,
                   torch_options: TorchExecutorOptions, shard: RankShard | None = None,
                   ) -> TorchExecutor:
    """The executor of one rank over the weights :func:`read_rank` gave; an allocation failure
    is one line naming the limits."""
    tensors, transposed = weights
    try:
        return TorchExecutor(manifest.decoder, tensors, manifest.limits,
                             transposed=transposed, device=device, options=torch_options,
                             gather_context_logits=manifest.gather_context_logits,
                             quant=manifest.quantization, shard=shard)
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
                          f"{reason}; {build_smaller('max_seq_len', 'max_batch_size')}"
                          + (f", or lower {option('kv_cache_free_gpu_memory_fraction')}"
                             if device.type == "cuda" else "")) from None
