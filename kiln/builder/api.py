"""``kiln build``: kiln checkpoint -> engine dir, through a registered backend.

Passes: validate options and output -> read and check the checkpoint (config and every rank
file's header) -> resolve dtype, limits, targets, plugins -> backend check -> plan parts per
rank (memory budget) -> build parts (in-process, or ``workers`` processes), the rank files
hashed beside them against the checkpoint's recorded sha256 -> tokenizer, checksums, manifest
-> rename into place.

Atomicity: everything is written to a hidden temporary directory beside ``output_dir`` and
renamed onto it at the end; on any error it is removed and an existing output is untouched.
Errors a user can cause are :class:`~kiln.errors.KilnError` subclasses with one-line messages.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kiln
from kiln.builder.backends import Backend, BuildPlan, PartResult, get_backend
from kiln.builder.graph.context import GraphSpec, RankWeights
from kiln.builder.graph.linear import check_scales
from kiln.builder.options import BuildOptions, resolve_limits
from kiln.builder.plan import plan_rank
from kiln.builder.runner import run_parts
from kiln.checkpoint import (
    CheckpointConfig,
    check_other_files,
    check_rank_header,
    existing_rank_file,
    load_config,
    rank_files_checked,
)
from kiln.config import options_from
from kiln.engine import EngineManifest
from kiln.errors import ConfigError, check_flag, counted, option
from kiln.output_dirs import ENGINE_KIND, atomic_dir, check_output, copy_tokenizer
from kiln.plugins import PluginContext, resolve_plugins
from kiln.quantization.config import QuantConfig, slow_on_onnx_cpu
from kiln.sizes import MAX_SIZE, need_and_available, size_text

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What a build wrote and how long each stage took."""

    output_dir: Path
    manifest: EngineManifest
    parts: list[PartResult]
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds

    @property
    def peak_rss(self) -> int:
        """Peak resident memory (bytes) of the processes that built parts."""
        return max((p.peak_rss for p in self.parts), default=0)

    def summary(self) -> str:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        files, parts = sum(len(p.files) for p in self.parts), len(self.parts)
        counts = f"{files} file{'s' * (files != 1)}, {parts} part{'s' * (parts != 1)}"
        # the targets: a tensorrt build's defaults had been said with -v only (a retest)
        targets = ",".join(self.manifest.targets)
        return (f"built {self.output_dir} ({self.manifest.backend} for {targets}, {counts}): "
                f"{stages}; peak RSS {self.peak_rss / 1e9:.2f} GB")


def build(checkpoint_dir: str | Path, output_dir: str | Path, *, progress: bool = False,
          **options: Any) -> BuildResult:
    """Build an engine dir from a kiln checkpoint.

    ``options`` are :class:`BuildOptions` fields by keyword, with its defaults (backend,
    max_batch_size, max_input_len, max_seq_len, max_num_tokens, dtype, targets, plugins,
    max_build_memory, workers, overwrite, allow_long_context): one definition for this function
    and ``kiln build``. Raises :class:`~kiln.errors.KilnError` subclasses on bad input (an
    unknown option too), leaving nothing behind.
    ``output_dir``: a str or os.PathLike; ``"-"`` and ``Path("-")`` are refused, as
    the CLI refuses ``--output_dir -`` (``"./-"`` names a directory "-").
    """
    # (BuildOptions checks the dirs, before its Path() reads "" as the current directory)
    opts = options_from(BuildOptions, options, "build", also=("progress",),
                        checkpoint_dir=checkpoint_dir, output_dir=output_dir)
    check_flag("progress", progress, ConfigError)
    return build_with(opts, progress=progress)


def _warn_if_the_gate_failed(checkpoint_dir: Path, ckpt: CheckpointConfig) -> None:
    """Say so when the checkpoint was quantized past its accuracy gate (--no_accuracy_gate),
    with too few tokens to decide, or without text to measure it: the engine carries the
    figures, and nothing else would tell its user."""
    quant = ckpt.quantization
    if quant is None:
        return
    accuracy = quant.accuracy
    if accuracy is None:
        if quant.source_format == "kiln":  # an imported checkpoint's gate was its tool's
            log.warning("%s was quantized (%s) without measuring its accuracy (no text was "
                        "given to kiln quantize); `kiln eval` measures the engine's perplexity",
                        checkpoint_dir, quant.qformat)
    elif accuracy.get("passed") is None:
        log.warning("%s: its accuracy gate is undecided (%s scored, quantized with "
                    "--no_accuracy_gate); the engine is built from it as asked",
                    checkpoint_dir, counted(accuracy.get("tokens", 0), "token"))
    elif accuracy.get("passed") is False:
        log.warning("%s failed its accuracy gate (quantized with --no_accuracy_gate: ppl ratio "
                    "%.4f, over %s); the engine is built from it as asked", checkpoint_dir,
                    accuracy.get("ppl_ratio", float("nan")), accuracy.get("max_ppl_ratio"))


def build_with(options: BuildOptions, progress: bool = False) -> BuildResult:
    started = time.perf_counter()
    check_output(options.output_dir, options.overwrite, inputs=[options.checkpoint_dir],
                 writes=ENGINE_KIND)
    ckpt = load_config(options.checkpoint_dir, "checkpoint_dir")
    weights = check_rank_files(options.checkpoint_dir, ckpt)
    check_other_files(options.checkpoint_dir, ckpt)
    _warn_if_the_gate_failed(options.checkpoint_dir, ckpt)
    engine = get_backend(options.backend)
    plan = make_plan(options, ckpt, engine)
    engine.check(plan)  # (a refusal there comes before any warning of speed)
    _warn_slow_forms(engine.name, plan.graph.quantization, plan.graph.weight_only_int8_compute)
    _check_the_cache_size(plan, engine)
    # no more workers than parts can be (a layer each): each is given its share of the memory
    # (a retest's --workers 100 of a 4-layer model had been refused for 0.2 GB a worker)
    workers = min(options.workers, ckpt.decoder.num_layers * ckpt.mapping.tp_size)
    if workers < options.workers:
        log.info("workers: %d, one per layer of every rank at most (%s)", workers,
                 option("workers", options.workers))
    budget = options.memory_budget() // workers
    parts = [p for rank in range(ckpt.mapping.world_size)
             for p in plan_rank(ckpt, rank, RankWeights(weights[rank].path, plan.dtype), budget,
                                engine.memory_factor, engine.base_memory, engine.tensor_copies,
                                workers)]
    seconds = {"plan": time.perf_counter() - started}
    with atomic_dir(options.output_dir, options.overwrite, ENGINE_KIND) as tmp, \
            rank_files_checked(options.checkpoint_dir, ckpt) as check:
        results = run_parts(engine, plan, parts, tmp, workers, progress)
        check()
        seconds["parts"] = time.perf_counter() - started - seconds["plan"]
        manifest = _finish(tmp, engine, plan, results)
    seconds["total"] = time.perf_counter() - started
    result = BuildResult(options.output_dir, manifest, results, seconds)
    log.debug("%s", result.summary())  # kiln build echoes it (at INFO, -v printed it twice)
    return result


def _check_the_cache_size(plan: BuildPlan, engine: Backend) -> None:
    """Refuse limits whose whole KV cache is more than any machine holds (MAX_SIZE, 1 EB: a
    typo such as max_batch_size 99999999999, 8.2 EiB, had built); a torch engine pages its
    cache, but keeps per-slot state and logits rows of max_batch_size too. An onnx engine for
    the CPU allocates the whole cache at load: warn when it needs more than this machine has
    (built ahead of time for a larger machine, as on CI, that is fine)."""
    need = plan_manifest(plan, engine, rank_files={}, checksums={}).full_kv_cache_bytes()
    limits, lower = plan.limits, f"lower {option('max_batch_size')} or {option('max_seq_len')}"
    if need > MAX_SIZE:
        raise ConfigError(f"this engine's limits (max_batch_size {limits.max_batch_size}, "
                          f"max_seq_len {limits.max_seq_len}) need a KV cache of "
                          f"{size_text(need)}, more than any machine holds; {lower}")
    if engine.name != "onnx" or "cpu" not in plan.targets:
        return
    import psutil

    total = psutil.virtual_memory().total
    if need > total:
        need_text, total_text = need_and_available(need, total)
        log.warning("this engine's limits (max_batch_size %d, max_seq_len %d) need a KV cache "
                    "of %s at load on the CPU, and this machine has %s of memory: it will not "
                    "load here; %s unless it runs on a larger machine",
                    limits.max_batch_size, limits.max_seq_len, need_text, total_text, lower)


def check_rank_files(checkpoint_dir: Path, ckpt: CheckpointConfig) -> dict[int, RankWeights]:
    """Open every rank file's header and check its names against the config (no data read)."""
    out = {}
    for rank in range(ckpt.mapping.world_size):
        path = existing_rank_file(checkpoint_dir, ckpt, rank)
        weights = RankWeights(path, ckpt.dtype)
        check_rank_header(path, ckpt, rank, weights.infos)
        if ckpt.quantization is not None:
            check_scales(path, weights.infos, ckpt.quantization)
        out[rank] = weights
    return out


def make_plan(options: BuildOptions, ckpt: CheckpointConfig, engine: Backend,
              config: Path | None = None) -> BuildPlan:
    """Resolve dtype, limits, targets and plugins for this checkpoint and backend. ``config``:
    the config.json ``ckpt``'s model settings were read from, for messages (default: the
    checkpoint's own)."""
    dtype = options.dtype or ckpt.dtype
    limits = resolve_limits(options, ckpt.decoder, config)
    targets = options.targets or engine.default_targets(dtype)
    context = PluginContext(decoder=ckpt.decoder, dtype=dtype, backend=engine.name,
                            targets=tuple(targets), tp_size=ckpt.mapping.tp_size)
    plugins = resolve_plugins(options.plugins, context)
    quant = ckpt.quantization
    if quant is not None and plugins.get("gated_mlp"):
        # The fused form is a function of float weights; a quantized projection is not one.
        log.info("gated_mlp: the fused form takes float weights; the %s checkpoint's MLP is "
                 "emitted unfused", quant.qformat)
        plugins = {**plugins, "gated_mlp": False}
    if options.weight_only_int8_compute and (engine.name != "onnx" or quant is None
                                             or quant.activation_dtype is not None):
        raise ConfigError(f"{option('weight_only_int8_compute', True)} applies to onnx engines "
                          f"of weight-only checkpoints (int8_wo, int4_wo, int4_awq), not to a "
                          f"{engine.name} engine of a {quant.qformat if quant else 'float'} "
                          f"checkpoint; drop the flag")
    graph = GraphSpec(decoder=ckpt.decoder, mapping=ckpt.mapping, dtype=dtype,
                      max_seq_len=limits.max_seq_len, plugins=plugins,
                      gather_context_logits=options.gather_context_logits,
                      quantization=quant, backend=engine.name,
                      weight_only_int8_compute=options.weight_only_int8_compute)
    return BuildPlan(checkpoint_dir=options.checkpoint_dir, checkpoint=ckpt, graph=graph,
                     limits=limits, targets=tuple(targets))


def _warn_slow_forms(backend: str, quant: QuantConfig | None, int8_compute: bool) -> None:
    """Say when an onnx engine of this checkpoint runs slower than float32 on a CPU."""
    slow = slow_on_onnx_cpu(quant, int8_compute) if backend == "onnx" else None
    if slow is not None:
        log.warning("%s", slow)


def plan_manifest(plan: BuildPlan, engine: Backend, **files: Any) -> EngineManifest:
    """The manifest of an engine built from ``plan`` by ``engine``; ``files``: its
    ``rank_files``, ``checksums``, ``sizes`` and ``source`` (none before the build: the build
    cache checks a planned engine against the machine before building it)."""
    ckpt = plan.checkpoint
    return EngineManifest(
        backend=engine.name, backend_version=engine.versions(), targets=plan.targets,
        decoder=ckpt.decoder, mapping=ckpt.mapping, dtype=plan.dtype, limits=plan.limits,
        plugins=dict(plan.graph.plugins), quantization=ckpt.quantization,
        gather_context_logits=plan.graph.gather_context_logits,
        weight_only_int8_compute=plan.graph.weight_only_int8_compute,
        kiln_version=kiln.__version__, **files)


def _finish(tmp: Path, engine: Backend, plan: BuildPlan, results: list[PartResult]) -> EngineManifest:
    """Tokenizer files, checksums, sizes and the manifest, written into the temporary dir."""
    other_files = copy_tokenizer(plan.checkpoint_dir, tmp)
    rank_files: dict[int, list[str]] = {}
    for result in sorted(results, key=lambda r: (r.part.rank, r.part.index)):
        rank_files.setdefault(result.part.rank, []).extend(result.files)
    manifest = plan_manifest(
        plan, engine, rank_files={r: tuple(f) for r, f in rank_files.items()},
        checksums={name: digest for r in results for name, digest in r.checksums.items()},
        sizes={name: size for r in results for name, size in r.sizes.items()},
        source={"checkpoint_dir": os.path.abspath(plan.checkpoint_dir),
                **plan.checkpoint.source},
        other_files=other_files)
    manifest.write(tmp)
    return manifest

