"""The ``onnx`` backend: each part's graph, optimized offline and saved for ONNX Runtime.

Files per part: ``<stem>.onnx`` and its weights ``<stem>.onnx.data`` (``<stem>`` is
``rank{N}`` or ``rank{N}.part{k}``). Targets: ``cpu`` (ONNX Runtime's extended optimizations
for the CPU provider; the graph uses com.microsoft CPU ops: the gqa and residual_norm plugins,
and what the optimizer fuses) or ``cuda`` (basic, provider-independent optimizations only, for
onnxruntime-gpu).

Non-goals: tensor parallelism (ONNX Runtime has no collective op; build tp > 1 checkpoints
with ``--backend torch``, which runs one process per rank, or ``--backend tensorrt``), bfloat16 on the CPU provider (it has no bfloat16 MatMul).
"""

from __future__ import annotations

import importlib.metadata
import resource
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort

from kiln.builder.backends import (
    Backend,
    BuildPlan,
    PartJob,
    PartResult,
    check_kv_cache,
    part_label,
    register_backend,
)
from kiln.checkpoint import rank_file
from kiln.engine import EngineError
from kiln.errors import BuildError, option, wording
from kiln.progress import progress_bar

# ONNX Runtime's GraphOptimizationLevel per target (names: the child process looks them up).
LEVELS = {"cpu": "ORT_ENABLE_EXTENDED", "cuda": "ORT_ENABLE_BASIC"}


@register_backend("onnx")
class OnnxBackend(Backend):
    memory_factor = 2.5  # the raw weights as ONNX Runtime loads them, plus the saved copy
    base_memory = 400 << 20

    def versions(self) -> dict[str, str]:
        return {"onnx": _onnx_version(), "onnxruntime": ort.__version__}

    def default_targets(self, dtype: str) -> tuple[str, ...]:
        return ("cpu",)

    def check(self, plan: BuildPlan) -> None:
        if len(plan.targets) != 1 or plan.targets[0] not in LEVELS:
            raise EngineError(f"the onnx backend builds for one target, cpu or cuda; found "
                              f"{','.join(plan.targets)}")
        if plan.checkpoint.mapping.tp_size > 1:
            raise EngineError(f"the onnx backend cannot run tp_size "
                              f"{plan.checkpoint.mapping.tp_size}: ONNX Runtime has no "
                              f"collective op; use {option('backend', 'torch')} (one process "
                              f"per rank), {option('backend', 'tensorrt')} (NVIDIA GPUs), or "
                              f"{_tp_one()}")
        check_kv_cache(plan, "onnx")
        if plan.dtype == "bfloat16":  # (for cuda too: the build optimizes on the CPU provider)
            raise EngineError(f"ONNX Runtime's CPU provider, which builds every onnx engine, "
                              f"has no bfloat16 MatMul; build with {option('dtype', 'float16')} "
                              f"or float32 (or {option('backend', 'torch')} for a bfloat16 "
                              f"engine on an NVIDIA GPU)")

    def build_part(self, job: PartJob) -> PartResult:
        from kiln.builder.graph.decoder import write_part  # onnx: only to build (see _onnx_version)

        part, started = job.part, time.perf_counter()
        label = part_label(job.plan, part)
        # a live line on a terminal (the runner's report comes when the part is done)
        with progress_bar(total=2, desc=f"{label}: graph", bar_format="{desc} {elapsed}",
                          show=job.progress, leave=False) as bar:
            raw = write_part(job.plan.graph, part,
                             job.plan.checkpoint_dir / rank_file(part.rank), job.work_dir)
            emitted = time.perf_counter()
            bar.set_description_str(f"{label}: optimize")
            bar.update()
            optimize(raw, job.out_dir / f"{part.stem}.onnx", job.plan.targets[0])
        for path in (raw, raw.with_name(raw.name + ".data")):
            path.unlink()
        done = time.perf_counter()
        files = tuple(name for name in (f"{part.stem}.onnx", f"{part.stem}.onnx.data")
                      if (job.out_dir / name).is_file())
        return PartResult(part=part, files=files,
                          seconds={"graph": emitted - started, "optimize": done - emitted},
                          peak_rss=max(resource.getrusage(who).ru_maxrss * 1024 for who in
                                       (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def _onnx_version() -> str:
    """The installed onnx's version, read from its package metadata: importing onnx takes
    ~0.6 s (ml_dtypes), and a build cache hit asks the backend its versions, not for a build."""
    try:
        return importlib.metadata.version("onnx")
    except importlib.metadata.PackageNotFoundError:  # installed under another name
        import onnx

        return onnx.__version__


def optimize(raw: Path, out: Path, target: str) -> None:
    """Let ONNX Runtime optimize ``raw`` for ``target`` and save it (weights beside it), in a
    child process that an interrupt stops at once (see kiln/builder/ort_optimize.py)."""
    script = Path(__file__).with_name("ort_optimize.py")
    child = subprocess.Popen([sys.executable, str(script), str(raw), str(out), LEVELS[target]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, errors = child.communicate()
    except BaseException:  # Ctrl-C / SIGTERM: stop the child before unwinding
        child.kill()
        child.wait()
        raise
    if child.returncode != 0:
        last = (errors.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        raise BuildError(f"ONNX Runtime could not optimize {raw.name} for {target}: {last}")


def _tp_one() -> str:
    """tp_size 1 in its user's words: the option, where the engine is built from the command's
    (``kiln run --model_dir``: a retest had been told of a checkpoint it never made), else a
    checkpoint converted so."""
    return option("tp_size", 1) if wording().limits_as_options else "a tp_size 1 checkpoint"
