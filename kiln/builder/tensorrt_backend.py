"""The ``tensorrt`` backend: each part's ONNX graph parsed into a strongly typed network and
built into ``<stem>.engine`` with full TensorRT (``import tensorrt``) when present, else
TensorRT-RTX (``pip install tensorrt-rtx-cu13==1.7.1.116``, ``import tensorrt_rtx``), which
builds ahead of time on a machine without a GPU.

Targets: TensorRT-RTX builds for sm75, sm80, sm86, sm89, sm120, sm121 (one engine may carry
several); it refuses Hopper (sm90) and data-centre Blackwell (sm100), which need full
TensorRT. Full TensorRT builds for the GPU it runs on. Default: the local GPU if there is one
the library supports, else (TensorRT-RTX only) sm80, sm86, sm89 and sm120.

Optimization profiles (docs/engine.md): 0 = prefill/mixed steps (batch 1..max_batch_size,
seq 1..min(max_input_len, max_num_tokens)); 1 = decode steps (seq 1).

Host memory: TensorRT-RTX peaks near 3.1x the weight bytes of the network it builds; the
planner splits ranks into parts accordingly (TENSORRT_NOTES.md).
"""

from __future__ import annotations

import collections
import importlib
import logging
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import onnx
import torch
from tqdm import tqdm

from kiln.builder.backends import (
    Backend,
    BuildPlan,
    PartJob,
    PartResult,
    check_kv_cache,
    part_label,
    register_backend,
)
from kiln.builder.graph.context import BATCH, SEQ, RankWeights
from kiln.builder.graph.decoder import emit_part
from kiln.checkpoint import rank_file
from kiln.engine import BuildLimits, EngineError
from kiln.errors import BuildError, option
from kiln.graph.emitter import MemorySink
from kiln.interrupts import deferred_interrupts
from kiln.progress import progress_bar
from kiln.quantization.config import QuantConfig

log = logging.getLogger(__name__)

RTX_REQUIREMENT = "tensorrt-rtx-cu13==1.7.1.116"
RTX_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
RTX_DEFAULT_TARGETS = ("sm80", "sm86", "sm89", "sm120")
RTX_REFUSED = ("sm90", "sm100")


def rtx_refusal(target: str) -> str:
    """Why TensorRT-RTX refuses ``target`` (one of :data:`RTX_REFUSED`), and what to build with
    instead (a function: it names the option as the caller gave it, kiln.errors.option)."""
    if target == "sm90":
        return (f"Hopper (compute capability 9.0): the TensorRT-RTX runtime refuses it; build "
                f"with {option('backend', 'torch')} for Hopper, or on the Hopper machine with "
                f"full TensorRT (import tensorrt)")
    return ("data-centre Blackwell (10.0) is not a TensorRT-RTX target; build on the machine "
            "with full TensorRT (import tensorrt)")


def load_library() -> tuple[ModuleType, bool]:
    """(module, is_full_tensorrt): full TensorRT if importable, else TensorRT-RTX."""
    for name, full in (("tensorrt", True), ("tensorrt_rtx", False)):
        try:
            return importlib.import_module(name), full
        except ImportError:
            continue
    raise EngineError(f"the tensorrt backend needs TensorRT: pip install {RTX_REQUIREMENT} "
                      f"(TensorRT-RTX, builds without a GPU) or full TensorRT")


def local_gpu() -> str | None:
    """The first local GPU's compute capability as ``smXY`` (None without nvidia-smi/GPU)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = [line.strip() for line in out.splitlines() if line.strip()]
    return "sm" + caps[0].replace(".", "") if caps else None


@register_backend("tensorrt")
class TensorRTBackend(Backend):
    memory_factor = 3.1
    base_memory = 1 << 30  # the libraries, the parsed graph, Python
    # Phases such as "Determining refit engines" run for seconds (minutes for 8B) without a
    # progress callback, so a cancel through the monitor alone can wait that long.
    isolated = True

    def __init__(self) -> None:
        self.trt, self.full = load_library()

    def versions(self) -> dict[str, str]:
        return {"tensorrt" if self.full else "tensorrt_rtx": self.trt.__version__}

    def default_targets(self, dtype: str) -> tuple[str, ...]:
        gpu = local_gpu()
        if self.full:
            if gpu is None:
                raise EngineError("full TensorRT builds for the local GPU, and none was found "
                                  f"(nvidia-smi); install {RTX_REQUIREMENT} to build without one")
            return (gpu,)
        if gpu in RTX_TARGETS:
            log.info("tensorrt: target defaults to the local GPU %s", gpu)
            return (gpu,)
        log.info("tensorrt: no usable local GPU; targets default to %s", ",".join(RTX_DEFAULT_TARGETS))
        return RTX_DEFAULT_TARGETS

    def check(self, plan: BuildPlan) -> None:
        check_targets(plan.targets, self.full, local_gpu() if self.full else None)
        check_precision(plan.targets, plan.dtype, plan.checkpoint.quantization,
                        rtx=not self.full)
        check_kv_cache(plan, "tensorrt")

    def build_part(self, job: PartJob) -> PartResult:
        """Emit the part's graph with its weights kept in memory, hand both to the parser
        (no ONNX file is written: weights go straight from the checkpoint to TensorRT), build,
        write ``<stem>.engine``."""
        part, started = job.part, time.perf_counter()
        sink = MemorySink()
        weights = RankWeights(job.plan.checkpoint_dir / rank_file(part.rank), job.plan.dtype)
        model = emit_part(job.plan.graph, part, weights, sink)
        emitted = time.perf_counter()
        label = part_label(job.plan, part)
        engine, layers = build_engine(self.trt, self.full, model, sink.tensors, job.plan,
                                      label, job.progress)
        del sink, weights
        built = time.perf_counter()
        name = f"{part.stem}.engine"
        with open(job.out_dir / name, "wb") as f:
            f.write(engine)
        del engine
        return PartResult(part=part, files=(name,),
                          seconds={"graph": emitted - started, "engine": built - emitted,
                                   "write": time.perf_counter() - built},
                          peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          info={"layers": layers})


def _capability(target: str) -> int:
    digits = target[2:] if target.startswith("sm") else ""
    if not digits.isdigit():
        raise EngineError(f"target {target!r} is not a compute capability like sm86")
    return int(digits)


def check_targets(targets: tuple[str, ...], full: bool, gpu: str | None) -> None:
    for target in targets:
        _capability(target)
        if full:
            if target != gpu:
                raise EngineError(f"full TensorRT builds for the GPU it runs on ({gpu}), not "
                                  f"{target}; build on a {target} machine, or use TensorRT-RTX "
                                  f"({RTX_REQUIREMENT}) for its targets")
        elif target in RTX_REFUSED:
            raise EngineError(f"TensorRT-RTX cannot build for {target}: {rtx_refusal(target)}")
        elif target not in RTX_TARGETS:
            raise EngineError(f"TensorRT-RTX cannot build for {target}; its targets are "
                              f"{', '.join(RTX_TARGETS)}")


def check_precision(targets: tuple[str, ...], dtype: str, quant: QuantConfig | None,
                    rtx: bool = True) -> None:
    for target in targets:  # the format first: the dtype's advice would not get past it
        if quant is not None and _capability(target) < quant.info.min_capability:
            flag = option("targets", flag="target")
            why, fix = ("FP8 tensor cores", f"build with {flag} sm89, sm120 or sm121, or "
                        f"quantize to an int8/int4 format") \
                if quant.info.weight_dtype == "float8_e4m3fn" else \
                ("TensorRT compiles no int4 weights for Turing", f"build with {flag} sm80 or "
                 f"later, or quantize to int8_wo or int8_sq")
            among = f" (of {', '.join(targets)})" if len(targets) > 1 else ""
            raise EngineError(f"target {target}{among} cannot run the checkpoint's "
                              f"{quant.qformat} quantization (needs "
                              f"sm{quant.info.min_capability}+: {why}); {fix}")
    for target in targets:
        cap = _capability(target)
        if dtype == "bfloat16" and cap < 80:
            raise EngineError(f"{target} has no bfloat16 support (needs sm80+); build with "
                              f"{option('dtype', 'float16')} or drop the target")
        if dtype == "float32" and cap == 75 and rtx:  # (its Myelin refuses each GEMM, seconds
            # into the build: "FP32 GEMM is not supported" for Turing; retest 45d)
            raise EngineError(f"TensorRT-RTX has no float32 matrix multiply for {target} "
                              f"(Turing); build with {option('dtype', 'float16')} or drop the "
                              f"target")


def profile_ranges(limits: BuildLimits) -> list[dict[str, tuple[int, int, int]]]:
    """(min, opt, max) per symbolic dim for profile 0 (prefill/mixed) and 1 (decode)."""
    batch, seq = limits.max_batch_size, min(limits.max_input_len, limits.max_num_tokens)
    rows = max(1, min(batch, limits.max_num_tokens // seq))
    return [{BATCH: (1, rows, batch), SEQ: (1, seq, seq)},
            {BATCH: (1, batch, batch), SEQ: (1, 1, 1)}]


def _input_dims(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}


def _add_profiles(builder, network, config, model: onnx.ModelProto, limits: BuildLimits) -> None:
    dims = _input_dims(model)
    for ranges in profile_ranges(limits):
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            shapes = [[ranges[d][k] if isinstance(d, str) else d for d in dims[name]]
                      for k in range(3)]
            profile.set_shape(name, *shapes)
        config.add_optimization_profile(profile)


def _logger(trt: ModuleType):
    """A TensorRT logger that forwards to Python logging (the build's return value decides
    success: builds without a GPU log a harmless 'CUDA driver version is insufficient')."""
    class Logger(trt.ILogger):
        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            if "driver version is insufficient" in msg or "BuildCanceled" in msg:
                log.debug("TensorRT: %s", msg)
            elif severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                log.warning("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.info("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)
    logger = Logger()
    trt.ILogger.__init__(logger)
    return logger


def _parse(trt: ModuleType, parser, model: onnx.ModelProto,
           tensors: dict[str, torch.Tensor]) -> None:
    """Parse ``model`` whose initializers are the in-memory ``tensors`` (TensorRT reads them
    in place; they must outlive the build)."""
    ok = parser.load_model_proto(model.SerializeToString(), ".")
    for name, tensor in tensors.items():
        ok = ok and parser.load_initializer(name, tensor.data_ptr(),
                                            tensor.numel() * tensor.element_size())
    if not (ok and parser.parse_model_proto()):
        first = parser.get_error(0).desc().splitlines()[0] if parser.num_errors else "no detail"
        raise BuildError(f"TensorRT could not parse the graph {model.graph.name}: {first}")


def _progress_monitor(trt: ModuleType, label: str, live: bool, cancelled: Callable[[], bool]):
    """A TensorRT progress monitor: shows the build's phases (a live line on stderr when
    ``live``, else INFO logs of the top-level steps with the elapsed time) and cancels the build
    once ``cancelled()`` (a pending Ctrl-C or SIGTERM: kiln.interrupts.deferred_interrupts)."""
    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started = time.perf_counter()
            self.bar: tqdm | None = None
            self.top: str | None = None

        def phase_start(self, phase, parent, steps):  # noqa: D401 - TensorRT callbacks
            if parent is None and self.top is None:
                self.top = phase
                self.bar = progress_bar(total=steps, desc=f"{label}: TensorRT",
                                        unit="step", leave=False, show=live)
            elif self.bar is not None:
                self.bar.set_postfix_str(phase, refresh=True)

        def step_complete(self, phase, step):
            if phase == self.top:
                self.bar.update(1)
                log.info("%s: TensorRT %s step %d/%d (%.0f s)", label, phase, step + 1,
                         self.bar.total, time.perf_counter() - self.started)
            return not cancelled()

        def phase_finish(self, phase):
            if phase == self.top and self.bar is not None:
                self.bar.close()

    return Monitor()


def _quantized_layers(network) -> dict[str, int]:
    """``{"DEQUANTIZE int4": 8, "QUANTIZE float8_e4m3fn": 8, ...}``: the parsed network's Q/DQ
    layers by their quantized tensor's type (the engine inspector, which would show the
    kernels' precisions, needs a GPU to deserialize the engine)."""
    counts: collections.Counter = collections.Counter()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type.name
        if kind == "DEQUANTIZE":
            counts[f"{kind} {layer.get_input(0).dtype.name.lower()}"] += 1
        elif kind == "QUANTIZE":
            counts[f"{kind} {layer.get_output(0).dtype.name.lower()}"] += 1
    return dict(counts)


def build_engine(trt: ModuleType, full: bool, model: onnx.ModelProto,
                 tensors: dict[str, torch.Tensor], plan: BuildPlan, label: str = "engine",
                 progress: bool = False) -> tuple[Any, dict]:
    """Parse ``model`` strongly typed, build it for the plan's targets and profiles.

    Returns the serialized engine and the parsed network's layer counts by type (with
    ``quantized``: its Q/DQ layers by quantized type, when it has any). Ctrl-C or
    SIGTERM cancels the build through its progress monitor and is raised when it returns.
    """
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    _parse(trt, parser, model, tensors)
    layers = dict(collections.Counter(network.get_layer(i).type.name
                                      for i in range(network.num_layers)))
    quantized = _quantized_layers(network)
    if quantized:
        layers["quantized"] = quantized
    config = builder.create_builder_config()
    if not full:
        config.num_compute_capabilities = len(plan.targets)
        for k, target in enumerate(plan.targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), k)
    _add_profiles(builder, network, config, model, plan.limits)
    with deferred_interrupts() as cancelled:
        config.progress_monitor = monitor = _progress_monitor(trt, label, progress, cancelled)
        engine = builder.build_serialized_network(network, config)
        del monitor  # referenced until the build returns: TensorRT does not own it
    if engine is None:
        raise BuildError(f"TensorRT failed to build {model.graph.name} for "
                         f"{','.join(plan.targets)} (its errors are the TensorRT lines above; "
                         f"-v shows its whole log)")
    return engine, layers
