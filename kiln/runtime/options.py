"""ExecutorOptions: the run-time choices that do not change the engine (device, threads, ...).

Torch-free on purpose: ``kiln run`` and ``kiln bench`` build their shared flags, defaults and
help from these fields (``metadata["help"]``), so ``--help`` loads no backend library. The
Python API (``LLM(engine_dir, ExecutorOptions(...))``) takes the same dataclass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kiln.engine import EngineError
from kiln.errors import check_counts, check_flags, option

DEVICES = ("auto", "cpu", "cuda")
PREFILL_ATTENTION = ("auto", "kiln", "cudnn")  # the torch backend's choices (TorchExecutorOptions)


@dataclass(frozen=True)
class ExecutorOptions:
    """Run-time choices that do not change the engine."""

    device: str = field(default="auto", metadata={"help": (
        "Where the engine runs. auto: onnx engines on CUDA when ONNX Runtime has it, else the "
        "CPU; torch engines need a CUDA GPU (cpu runs their slow PyTorch reference kernels).")})
    num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads [default: all cores]."})
    # ONNX Runtime's own default (and onnxruntime-genai's). On the 2-core dev box
    # (benchmarks/cpu_runtime_results.json, SmolLM2) it gained in one run (16 x 128/128: 157 vs
    # 147 tokens/s, batch-1 decode 32.1 vs 30.3) and was even in another (168 vs 174, 34.5 vs
    # 34.6). Under heavy load a spinning thread starves others and itself (batch-1 decode 106
    # ms/token spinning vs 59 ms not). An engine of several parts runs one session each, whose
    # idle pools spun on the cores the running part needed: a new-user trial's 4-part SmolLM2
    # decoded at 86.0 ms/token spinning, 27.7 not (one part: 25.4 / 28.3), so None (the
    # default) spins for a one-part engine only.
    cpu_spin_wait: bool | None = field(default=None, metadata={"help": (
        "Let idle CPU threads busy-wait between operators (ONNX Runtime's default) [default: "
        "on for an engine of one part, off for several, whose idle sessions would spin on the "
        "cores the running one needs]. Turn off on a machine shared with other busy "
        "processes.")})
    # The rank whose files this process opens. 0 for torch and tensorrt engines: the process
    # that opens one is the driver and starts the other ranks itself (kiln.runtime.loader).
    rank: int = 0
    dp: int = field(default=1, metadata={"help": (
        "Data-parallel replicas: run N copies of a single-rank engine, one process each (one GPU "
        "each on CUDA), and spread the requests over them. num_threads is per replica "
        "[default: all cores / N].")})
    engine_process: bool = field(default=False, metadata={"help": (
        "Run the engine (scheduler, model steps, sampling, detokenization) in a process of "
        "its own, so that the caller's Python threads (a server's event loop) do not slow its "
        "steps down through the GIL; only requests and tokens cross over. Single-rank "
        "engines, without dp (whose replicas run in processes of their own already).")})
    verify_checksums: bool = field(default=False, metadata={"help": (
        "sha256 the engine files before loading (reads every byte; by default only their "
        "presence and sizes are checked). See also kiln verify.")})
    kv_cache_free_gpu_memory_fraction: float | None = field(default=None, metadata={"help": (
        "torch backend: share of free GPU memory for the paged KV cache, at most what "
        "max_batch_size sequences of max_seq_len tokens can use [default: 0.9].")})
    prefill_attention: str | None = field(default=None, metadata={"help": (
        "torch backend: the attention of a fresh prompt (one prompt from position 0, of "
        "1,536 tokens or more). auto: cuDNN's fused attention where it runs, else kiln's "
        "kernel; kiln: kiln's paged kernel; cudnn: cuDNN's, an error where it cannot run "
        "[default: auto].")})

    def __post_init__(self) -> None:
        check_flags(self, EngineError)
        if self.device not in DEVICES:
            raise EngineError(f"device must be auto, cpu or cuda, found {self.device!r}")
        check_counts(self, EngineError, at_least={"rank": 0})
        if self.engine_process and self.dp > 1:  # it asks for nothing dp does not do: kiln
            # serve refused the pair, while LLM() took it and ran the dp replicas, flag unread
            raise EngineError(f"{option('dp', self.dp)} runs every replica in a process of its "
                              f"own already; leave {option('engine_process')} out")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        most = max(64, 4 * cpus)  # threads past the CPUs only contend
        if self.num_threads is not None and self.num_threads > most:
            raise EngineError(f"{option('num_threads', self.num_threads)} is more than {most}, "
                              f"the most kiln starts ({cpus} CPU(s) here, and threads past them "
                              f"only contend); pass {option('num_threads', cpus)} or fewer for "
                              f"speed, or leave it out (all cores)")
        if self.prefill_attention not in (None, *PREFILL_ATTENTION):
            raise EngineError(f"prefill_attention must be one of {', '.join(PREFILL_ATTENTION)}, "
                              f"found {self.prefill_attention!r}")
        fraction = self.kv_cache_free_gpu_memory_fraction
        if fraction is not None and (isinstance(fraction, bool)
                                     or not isinstance(fraction, (int, float))):
            raise EngineError(f"kv_cache_free_gpu_memory_fraction must be a number in (0, 1], "
                              f"found {fraction!r}")
        if fraction is not None and not 0 < fraction <= 1:
            raise EngineError(f"kv_cache_free_gpu_memory_fraction must be in (0, 1], found "
                              f"{fraction}")
