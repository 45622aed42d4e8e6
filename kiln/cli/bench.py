"""``kiln bench``: a synthetic serving workload against an engine dir (see kiln.runtime.bench).

Prints a table (TTFT, time per output token, inter-token latency and end-to-end latency as
mean/p50/p90/p99; output tokens/s; requests/s) and writes the same report as JSON.

Imports here stay light (``kiln bench --help`` must not load torch); the runtime is imported in
the command body.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kiln.cli.context import (
    CliContext,
    FloatRange,
    IntRange,
    PathArg,
    dp_option,
    executor_options,
    gpu_options,
)
from kiln.cli.engine_source import engine_command, held_engine
from kiln.dirs import DirKind, classify_dir
from kiln.errors import UNREADABLE_JSON, OutputError
from kiln.runtime.params import SEED_MAX, SEED_MIN  # torch-free: --help stays fast

if TYPE_CHECKING:
    from kiln.runtime import LLM, ExecutorOptions
    from kiln.runtime.bench import Workload

logger = logging.getLogger(__name__)
LONG_ARRIVALS_S = 3600.0  # --request_rate whose arrivals span longer than this is said so
MAX_ARRIVALS_S = 30 * 86400.0  # and longer than this, refused (a typo, not a benchmark)


@engine_command("bench", "Engine dir (output of kiln build).")
@click.option("--input_len", default=128, show_default=True, type=IntRange(min=1),
              help="Prompt tokens per request (random ids).")
@click.option("--output_len", default=128, show_default=True, type=IntRange(min=1),
              help="Generated tokens per request (EOS ignored).")
@click.option("--num_requests", default=16, show_default=True, type=IntRange(min=1),
              help="Requests in the workload.")
@click.option("--request_rate", default=None, type=FloatRange(min=0, min_open=True),
              help="Poisson arrivals per second [default: all queued at the start].")
@click.option("--concurrency", default=None, type=IntRange(min=1),
              help="Requests in flight at most [default: no limit].")
@click.option("--warmup", default=1, show_default=True, type=IntRange(min=0),
              help="Rounds run (and not measured) before the workload, each as many requests "
                   "as run at once in it (so its batch shapes are compiled and captured).")
@click.option("--seed", default=0, show_default=True, type=IntRange(SEED_MIN, SEED_MAX),
              help="Seed of prompts and arrivals, in [-2**63, 2**64 - 1] as kiln run's; a "
                   "negative one is its two's complement (-1 is 2**64 - 1).")
@click.option("--json_output", type=PathArg(dir_okay=False, path_type=Path), default=None,
              help="Write the report as JSON here (-: standard output) [default: print it "
                   "after the table].")
@executor_options
@dp_option
@gpu_options
@click.option("--baseline", type=click.Choice(("hf",)), default=None,
              help="Also run the same prompts through HF transformers generate() on the "
                   "engine's own weights (torch engines) and report kiln / HF.")
@click.option("--baseline_batch_size", default=64, show_default=True,
              type=IntRange(min=1), help="Batch size of the HF baseline.")
@click.pass_obj
def bench(obj: CliContext, warmup: int, json_output: Path | None, device: str,
          num_threads: int | None, cpu_spin_wait: bool | None, verify_checksums: bool, dp: int,
          kv_cache_free_gpu_memory_fraction: float | None, prefill_attention: str | None,
          baseline: str | None,
          baseline_batch_size: int, input_len: int, output_len: int, num_requests: int,
          request_rate: float | None, concurrency: int | None, seed: int,
          **source: Any) -> None:
    """Benchmark an engine with a synthetic workload (in the manner of trtllm-bench)."""
    from kiln.runtime import ExecutorOptions
    from kiln.runtime.bench import Workload

    # checked before any work (a build, with --model_dir): the baseline runs after the benchmark
    _check_request_rate(request_rate, num_requests)
    if baseline == "hf":
        _check_baseline(source["engine_dir"], source["backend"])
    json_only = json_output is not None and str(json_output) == "-"
    if json_only:  # standard output holds the JSON alone; the table goes to stderr
        json_output = None
    if json_output is not None and source["engine_dir"] is None:
        # checked again once the engine dir is known
        _check_json_output(json_output, None, model_dir=source["model_dir"])
    spec = Workload(input_len=input_len, output_len=output_len, num_requests=num_requests,
                    request_rate=request_rate, concurrency=concurrency, seed=seed)
    options = ExecutorOptions(device=device, num_threads=num_threads, cpu_spin_wait=cpu_spin_wait,
                              verify_checksums=verify_checksums, dp=dp,
                              kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
                              prefill_attention=prefill_attention)
    check = lambda manifest, _: _check_workload(spec, manifest.limits, warmup)  # noqa: E731
    with held_engine(obj, source, options, check=check) as engine_dir:
        if json_output is not None:
            _check_json_output(json_output, engine_dir)
        _bench(engine_dir, spec, options, warmup, json_output, baseline, baseline_batch_size,
               quiet=obj.verbosity < 0, progress=obj.progress, json_only=json_only)


def _check_request_rate(rate: float | None, num_requests: int) -> None:
    """A finite rate (no rate queues every request at the start) whose arrivals end within
    MAX_ARRIVALS_S; one whose arrivals take more than an hour is said so, with how long."""
    if rate is None:
        return
    if not math.isfinite(rate):
        raise click.BadParameter(f"{rate} is not a finite number of requests per second; leave "
                                 f"it out to queue every request at the start",
                                 param_hint="--request_rate")
    span = (num_requests - 1) / rate  # the first arrives at once; the mean span of the rest
    if span > MAX_ARRIVALS_S:
        when = f"would arrive over ~{_duration(span)}" if math.isfinite(span) else \
            "would never all arrive"
        raise click.BadParameter(f"{rate:g}: {num_requests} requests {when}; give at least "
                                 f"{(num_requests - 1) / MAX_ARRIVALS_S:.3g} requests/s",
                                 param_hint="--request_rate")
    if span > LONG_ARRIVALS_S:
        logger.warning("--request_rate %g: %d requests arrive over ~%s on average, and the "
                       "benchmark lasts that long", rate, num_requests, _duration(span))


def _duration(seconds: float) -> str:
    hours, days = seconds / 3600, seconds / 86400
    return f"{hours:.1f} hours" if hours < 48 else f"{days:.0f} days" if days < 730 \
        else f"{days / 365.25:.3g} years"


def _check_workload(spec: Workload, limits: Any, warmup: int) -> None:
    """The workload fits the engine's BuildLimits (with --model_dir, checked before a build on
    the limits it would have), and it and its warm-up fit in host memory."""
    from kiln.runtime.host_memory import available_memory

    if spec.input_len > limits.max_input_len:
        raise click.BadParameter(f"{spec.input_len} exceeds the engine's max_input_len "
                                 f"{limits.max_input_len}", param_hint="--input_len")
    if spec.input_len + spec.output_len - 1 > limits.max_seq_len:
        # the values that fit (retest 44c's defaults, 128 each, had been refused with none)
        raise click.BadParameter(f"input_len + output_len - 1 = "
                                 f"{spec.input_len + spec.output_len - 1} exceeds the "
                                 f"engine's max_seq_len {limits.max_seq_len}; pass an "
                                 f"--input_len and --output_len (128 each by default) that add "
                                 f"up to at most {limits.max_seq_len + 1}",
                                 param_hint="--output_len")
    available = available_memory()
    problem = spec.host_memory_problem(available)
    if problem:
        raise click.BadParameter(f"{spec.num_requests} requests of {spec.input_len} in / "
                                 f"{spec.output_len} out {problem}; lower --num_requests",
                                 param_hint="--num_requests")
    rounds = _warmup_workload(spec, warmup, limits)
    problem = rounds and rounds.host_memory_problem(available)
    if problem:
        raise click.BadParameter(f"{warmup} rounds of {rounds.num_requests // warmup} requests "
                                 f"{problem}; lower --warmup", param_hint="--warmup")


def _warmup_workload(spec: Workload, warmup: int, limits: Any) -> Workload | None:
    """``warmup`` rounds as wide as the workload gets, so its batch shapes are compiled and
    captured (None for no warm-up)."""
    from kiln.runtime.bench import Workload

    if not warmup:
        return None
    width = min(spec.num_requests, spec.concurrency or limits.max_batch_size,
                limits.max_batch_size)
    return Workload(spec.input_len, min(spec.output_len, 8), warmup * width,
                    seed=(spec.seed + 7) % 2**64)


def _bench(engine_dir: Path, spec: Workload, options: ExecutorOptions, warmup: int,
           json_output: Path | None, baseline: str | None, baseline_batch_size: int,
           quiet: bool = False, progress: bool = False, json_only: bool = False) -> None:
    from kiln.runtime import LLM
    from kiln.runtime.bench import run_benchmark
    from kiln.runtime.core import freeze_loaded_objects

    with LLM(engine_dir, options) as llm:
        limits = llm.limits
        _check_workload(spec, limits, warmup)
        if spec.concurrency is not None and spec.concurrency > limits.max_batch_size:
            # (the report says "concurrency 1000" of an engine of 8 slots: a retest)
            slots = "its max_batch_size" if options.dp == 1 else \
                f"{options.dp} replicas of max_batch_size {limits.max_batch_size // options.dp}"
            logger.warning("--concurrency %d: the engine runs at most %d requests at once (%s); "
                           "the others wait in its queue, and their wait counts in their TTFT",
                           spec.concurrency, limits.max_batch_size, slots)
        rounds = _warmup_workload(spec, warmup, limits)
        if rounds is not None:
            run_benchmark(llm.core, rounds, progress=progress, label="warm-up")
        freeze_loaded_objects()  # as kiln serve does after its warm-up
        report = run_benchmark(llm.core, spec, progress=progress)
    report = dataclasses.replace(report, engine=_engine_info(llm, options))
    click.echo(report.table(), err=json_only)
    if baseline == "hf":  # after the engine is closed: its KV cache holds most of the GPU
        report = dataclasses.replace(report, baseline=_hf_baseline(
            engine_dir, spec, llm.manifest.decoder.vocab_size, baseline_batch_size,
            report.output_tokens_per_s))
    if json_output is not None:
        write_report(json_output, report.to_json())
        if not quiet:
            click.echo(f"wrote {json_output}", err=True)
    else:
        click.echo(report.to_json())


# A report is a few KiB: a larger existing file is not one, and is not read to find out.
_REPORT_MAX_BYTES = 16 << 20


def _check_json_output(path: Path, engine_dir: Path | None,
                       is_report: Callable[[Path], bool] | None = None,
                       kind: str = "kiln bench report", model_dir: str | None = None) -> None:
    """Before any work: never overwrite a file kiln did not write (``is_report``: one of
    ``kind``, default a bench report), never write into the engine dir or into ``model_dir``
    (``--model_dir``, a Hugging Face checkpoint dir or hub id: an input), and the directory must
    take the file. Shared by ``kiln eval``."""
    if engine_dir is not None and path.resolve().is_relative_to(Path(engine_dir).resolve()):
        raise click.BadParameter(f"{path} is inside the engine dir {engine_dir}; write the "
                                 f"report elsewhere", param_hint="--json_output")
    if model_dir is not None and Path(model_dir).is_dir() \
            and path.resolve().is_relative_to(Path(model_dir).resolve()):
        raise click.BadParameter(f"{path} is inside the --model_dir {model_dir}, an input kiln "
                                 f"only reads; write the report elsewhere",
                                 param_hint="--json_output")
    for folder in path.resolve().parents:  # another engine, checkpoint or cache entry of kiln's
        if made := _made_by_kiln(folder):
            raise click.BadParameter(f"{path} is inside {made} {folder}, which kiln wrote and "
                                     f"replaces whole; write the report elsewhere",
                                     param_hint="--json_output")
    if path.exists() and not path.is_file():  # a device, pipe or socket: never read it whole
        raise click.BadParameter(f"{path} is not a regular file (a device, pipe or socket); "
                                 f"give a file path for the report", param_hint="--json_output")
    if path.exists() and (path.stat().st_size > _REPORT_MAX_BYTES
                          or not (is_report or _is_bench_report)(path)):
        raise click.BadParameter(f"{path} exists and is not a {kind} as kiln writes it; "
                                 f"kiln never overwrites a file it did not write (or one "
                                 f"changed since): choose another path",
                                 param_hint="--json_output")
    from kiln.output_dirs import cannot_create_in  # imports torch: not at --help time

    # missing directories are made at the write (write_report), as --output_dir's are; the
    # nearest existing one must take them
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise click.BadParameter(f"{path}: cannot be written, {parent} is a file, not a "
                                 f"directory; write the report elsewhere",
                                 param_hint="--json_output")
    if why := cannot_create_in(parent):
        raise click.BadParameter(f"{parent} is not a writable directory ({why})",
                                 param_hint="--json_output")


def _made_by_kiln(folder: Path) -> str | None:
    """What ``folder`` is if kiln wrote it and replaces it whole (an engine or checkpoint dir,
    a build cache entry), else None."""
    from kiln.build_cache.store import ENGINE_DIR, ENTRY_FILE

    made = classify_dir(folder)
    if made in (DirKind.ENGINE, DirKind.KILN_CHECKPOINT):
        return made.value
    if (folder / ENTRY_FILE).is_file() and classify_dir(folder / ENGINE_DIR) is DirKind.ENGINE:
        return "a build cache entry"
    return None


def _is_bench_report(path: Path) -> bool:
    """A bench report as kiln writes it: exactly its keys (one a user added notes to is the
    user's)."""
    from kiln.runtime.bench import BenchReport

    return is_report(path, {f.name for f in dataclasses.fields(BenchReport)})


# A report file's sha256 of its other keys (canonical JSON): kiln replaces a report only as it
# wrote it, not one a user changed since (a value edited, a note added).
REPORT_DIGEST = "kiln_sha256"


def _digest(data: dict) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_report(path: Path, keys: set[str]) -> bool:
    """Whether ``path`` holds a report as kiln wrote it: a JSON object of exactly ``keys`` and
    :data:`REPORT_DIGEST`, whose digest matches."""
    try:
        data = json.loads(path.read_text())
    except (OSError, *UNREADABLE_JSON):
        return False
    if not isinstance(data, dict) or data.keys() != keys | {REPORT_DIGEST}:
        return False
    digest = data.pop(REPORT_DIGEST)
    return digest == _digest(data)


def write_report(path: Path, text: str) -> None:
    """Write a report's JSON ``text`` to ``path`` (atomically), with its digest."""
    data = json.loads(text)
    data[REPORT_DIGEST] = _digest(data)
    _write_atomically(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it onto ``path`` (never
    onto a directory: the rename refuses one); missing parent directories are made first, and
    removed again if the write fails."""
    from kiln.output_dirs import make_parents

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    created, done = [], False
    try:
        created = make_parents(path.parent)
        tmp.write_text(text)
        os.replace(tmp, path)
        done = True
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e.strerror or e}); nothing was left "
                          f"half-written") from None
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
            for parent in reversed(created):
                with contextlib.suppress(OSError):
                    parent.rmdir()


def _check_baseline(engine_dir: Path | None, backend: str | None) -> None:
    """``--baseline hf`` needs a torch engine: ``engine_dir``'s, or the one --model_dir builds
    (``backend``, else this machine's default)."""
    if engine_dir is not None:
        from kiln.engine import read_manifest

        backend = read_manifest(engine_dir).backend
        what, fix = f"{engine_dir} was built with", "build one with kiln build --backend torch"
    else:
        from kiln.build_cache.key import default_backend

        backend = backend or default_backend()[0]
        what, fix = "--model_dir builds with", "add --backend torch"
    if backend != "torch":
        raise click.BadParameter(f"hf runs HF transformers on a torch engine's weights and "
                                 f"{what} --backend {backend}; {fix}, or leave out --baseline",
                                 param_hint="--baseline")


def _hf_baseline(engine_dir: Path, spec: Workload, vocab_size: int, batch_size: int,
                 kiln_tokens_per_s: float) -> dict:
    """HF generate() on the same prompts and weights, at most --concurrency at a time as kiln
    ran them; prints its rate and kiln / HF, and returns them for the JSON report."""
    import torch

    from kiln.runtime.bench import make_prompts
    from kiln.runtime.torch_backend.hf_baseline import hf_baseline_for_engine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = min(batch_size, spec.concurrency or batch_size)
    _, run = hf_baseline_for_engine(engine_dir, make_prompts(spec, vocab_size), spec.output_len,
                                    batch_size, device=device)
    ratio = kiln_tokens_per_s / run.tokens_per_second
    click.echo(f"{'HF generate tokens/s':<24}{run.tokens_per_second:>10.1f}  (batch "
               f"{run.batch_size}, {device})")
    click.echo(f"{'kiln / HF':<24}{ratio:>10.2f}x")
    return {"name": "hf", "device": device, "batch_size": run.batch_size,
            "output_tokens_per_s": run.tokens_per_second, "kiln_over_baseline": ratio}


def _engine_info(llm: LLM, options: ExecutorOptions) -> dict:
    """The engine and how it ran (every ExecutorOptions field as given: the GPU options too)."""
    manifest = llm.manifest
    info = {"engine_dir": str(llm.engine_dir), "backend": manifest.backend,
            "dtype": manifest.dtype, "limits": vars(manifest.limits), "dp": options.dp,
            "options": dataclasses.asdict(options)}
    if manifest.backend == "onnx":  # the spin-wait it ran with (the option's None: by parts)
        from kiln.runtime.onnx_executor import graph_files, spin_wait
        info["cpu_spin_wait"] = spin_wait(options.cpu_spin_wait, len(graph_files(manifest)))
    return info
