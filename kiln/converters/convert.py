"""``kiln convert_checkpoint``: HF checkpoint -> kiln checkpoint, streamed and atomic.

Steps: open the source (no data read) -> pick the converter -> canonical config -> validate
the split -> plan every target tensor (strict accounting, shapes derived on meta tensors) ->
stream tensors into one writer per rank -> config.json, tokenizer files -> rename into place.

Memory: tensors are streamed in row chunks of about 64 MB, each written straight to every
rank that keeps part of it, so no tensor (not even a fused qkv or a large embedding) is held
whole. Only a converter transform other than a row concatenation (Falcon's QKV regroup)
materializes its sources and result, one tensor at a time.

Quantized sources (FP8, kiln/converters/quantized.py): FP8 weights are copied as they are
(float8_e4m3fn, fused by row concatenation, never cast); their scales are companion targets
(``layers.{i}.attn.qkv.weight_scale`` ...) made by small transforms, written in float32 and
sharded by :func:`kiln.roles.tensor_sharding` (a per-row scale splits with its weight's rows).

Finite weights: every floating chunk is checked as it is cast, in the reading thread, with one
sum (NaN/Inf propagate; no copy; min/max confirms a non-finite sum). A NaN/Inf in the source is a
corrupt checkpoint; one that only appears after the cast is an overflow of the output dtype
(float32 1e38 -> float16 inf). Either refuses the conversion, naming the source tensor, its file
and the first bad row. Only then is the chunk searched for that row.

Atomicity: output goes to a hidden temporary directory beside ``output_dir`` and is renamed
into place at the end; on any error it is removed and an existing output is left untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Full, Queue
from threading import Event, Thread
from typing import TYPE_CHECKING, Any

import torch

import kiln
from kiln.checkpoint import (
    CONFIG_NAME,
    CheckpointConfig,
    hash_rank_files,
    rank_file,
    wider_dtypes,
)
from kiln.config import DTYPES, DecoderConfig, Mapping, options_from
from kiln.converters.base import (
    Converter,
    TensorRule,
    architecture_name,
    concat_rows,
    converter_for,
    reading_config,
)
from kiln.converters.options import ConvertOptions
from kiln.converters.quantized import FP8, ImportedQuant, import_quantization
from kiln.converters.source import Source, SourceTensor, open_source
from kiln.dirs import expand_home
from kiln.errors import (
    CheckpointError,
    ConfigError,
    KilnError,
    SettingRangeError,
    TensorMappingError,
    check_flag,
    check_path,
)
from kiln.hashing import sha256_file, stops_when
from kiln.output_dirs import (
    CHECKPOINT_KIND,
    atomic_dir,
    check_output,
    copy_tokenizer,
    output_path,
)
from kiln.progress import progress_bar
from kiln.quantization.config import INPUT_SCALE, KV_SCALES, WEIGHT_SCALE
from kiln.roles import (
    Role,
    ShardSpec,
    expected_shape,
    name_mismatch,
    parse_tensor,
    scale_shape,
    tensor_names,
    tensor_sharding,
)
from kiln.sharding import shard_ranges, shard_shape
from kiln.tensorio import StreamingWriter, all_finite, first_non_finite, iter_row_chunks

if TYPE_CHECKING:
    from kiln.runtime.tokenizer import ModelTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetPlan:
    """One canonical tensor: where it comes from and its whole-model shape."""

    name: str
    role: Role
    layer: int | None
    sources: tuple[SourceTensor, ...]
    rule: TensorRule
    shape: tuple[int, ...]
    kind: str | None = None  # a quantized weight's companion: weight_scale, input_scale, k_scale

    @property
    def spec(self) -> ShardSpec:
        return tensor_sharding(self.role, self.kind, len(self.shape))

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What this tensor is stored as: scales float32, imported FP8 weights float8_e4m3fn
        (the importer admits FP8 only there), other floating tensors ``dtype``."""
        source = self.sources[0].dtype
        if self.kind is not None:
            return torch.float32
        if source is FP8 or not source.is_floating_point:
            return source
        return dtype

    def row_pieces(self) -> list[SourceTensor] | None:
        """Sources whose rows, stacked, are this tensor's rows (a copy or a row concatenation);
        None for any other transform."""
        if self.rule.transform is None or self.rule.transform is concat_rows:
            return list(self.sources)
        return None

    def source_names(self) -> list[str]:
        """The source tensors' names, in the order of ``sources``."""
        return [s.format(layer=self.layer) for s in self.rule.sources]


def convert_checkpoint(model_dir: str | Path, output_dir: str | Path, *, progress: bool = True,
                       **options: Any) -> Path:
    """Convert an HF checkpoint (local dir or hub id) into a kiln checkpoint at ``output_dir``.

    ``options`` are :class:`~kiln.converters.options.ConvertOptions` fields by keyword, with its
    defaults (dtype, tp_size, pp_size, revision, overwrite, allow_pickle): one definition for
    this function and ``kiln convert_checkpoint``. Returns the output directory. Raises
    :class:`~kiln.errors.KilnError` subclasses on bad input, leaving nothing behind.
    ``output_dir``: a str or os.PathLike; ``"-"`` and ``Path("-")`` are refused, as
    the CLI refuses ``--output_dir -`` (``"./-"`` names a directory "-").
    """
    opts = options_from(ConvertOptions, options, "convert_checkpoint",
                        also=("progress",))
    check_flag("progress", progress, ConfigError)
    dtype, tp_size, pp_size = opts.dtype, opts.tp_size, opts.pp_size
    revision, overwrite, allow_pickle = opts.revision, opts.overwrite, opts.allow_pickle
    # (before Path(), which reads "" as the current directory)
    check_path("model_dir", model_dir, CheckpointError,
               "pass an HF checkpoint directory or hub id")
    output_dir = output_path(output_dir)
    local = expand_home(model_dir, "model_dir", CheckpointError)
    check_output(output_dir, overwrite, inputs=[local] if local.exists() else [],
                 writes=CHECKPOINT_KIND)
    plan = plan_conversion(str(model_dir), dtype=dtype, tp_size=tp_size, pp_size=pp_size,
                           revision=revision, allow_pickle=allow_pickle, name="model_dir")
    return write_checkpoint(plan, output_dir, overwrite=overwrite, progress=progress)


def write_checkpoint(plan: ConversionPlan, output_dir: Path, *, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Write the kiln checkpoint ``plan`` (:func:`plan_conversion`) describes to ``output_dir``
    (through a temporary dir, renamed at the end); the caller has checked ``output_dir``
    (:func:`convert_checkpoint` does). The build cache plans once, before it takes its lock,
    and writes with this."""
    source, decoder, mapping, out_dtype = plan.source, plan.decoder, plan.mapping, plan.dtype
    log.info("converting %s (%s, %d layers) to %s, tp=%d pp=%d", source.directory,
             decoder.architecture, decoder.num_layers, out_dtype, mapping.tp_size,
             mapping.pp_size)
    started = time.perf_counter()
    stop = Event()  # set: the hashing thread stops within a block (an interrupted conversion)
    with atomic_dir(output_dir, overwrite, CHECKPOINT_KIND) as tmp, \
            ThreadPoolExecutor(1) as pool:
        try:
            hashes = pool.submit(_hash_files, source.weight_files, stop)
            _write_ranks(tmp, plan.targets, decoder, mapping, getattr(torch, out_dtype),
                         progress)
            config = replace(plan.checkpoint_config(),
                             source=_provenance(source, plan.converter, hashes),
                             other_files=copy_tokenizer(source.directory, tmp),
                             rank_checksums=hash_rank_files(tmp, mapping.world_size))
            (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        finally:
            stop.set()  # (the pool's exit waits for the thread: gigabytes of files unstopped)
    log.info("wrote %s in %.1f s", output_dir, time.perf_counter() - started)
    return output_dir


@dataclass(frozen=True)
class ConversionPlan:
    """What :func:`convert_checkpoint` checks and decides before it writes anything."""

    source: Source
    converter: type[Converter]
    decoder: DecoderConfig
    mapping: Mapping
    quant: ImportedQuant | None
    targets: list[TargetPlan]
    dtype: str  # the checkpoint's dtype, ``auto`` resolved

    def checkpoint_config(self) -> CheckpointConfig:
        """The checkpoint's config as conversion will write it, less its provenance."""
        return CheckpointConfig(decoder=self.decoder, mapping=self.mapping, dtype=self.dtype,
                                quantization=self.quant.config if self.quant else None,
                                kiln_version=kiln.__version__)


def plan_conversion(model_dir: str, *, dtype: str = "auto", tp_size: int = 1, pp_size: int = 1,
                    revision: str | None = None, allow_pickle: bool = False,
                    name: str | None = None) -> ConversionPlan:
    """Open the source (its config and tensor headers; no tensor data read, but for a tied
    checkpoint that stores an LM head too: :func:`untie_a_different_head`) and run every check
    of the conversion: architecture, config, mapping, quantization, strict tensor accounting.
    Also what the build cache checks before it converts (:mod:`kiln.build_cache.preflight`).
    ``name``: the option ``model_dir`` was given as (:func:`~kiln.converters.source.locate`)."""
    source = open_source(model_dir, revision=revision, allow_pickle=allow_pickle, name=name)
    tokenizer = check_tokenizer_files(source.directory)
    where = source.directory / "config.json"
    try:
        with reading_config(where):  # the converter's errors name it
            converter = converter_for(source.hf_config)
            decoder = converter.config_from_source(
                source.hf_config, {n: tuple(t.shape) for n, t in source.tensors.items()})
    except SettingRangeError as e:  # a converted value out of range (num_kv_heads 3 of 4)
        raise ConfigError(f"{where}: {e} (kiln's names for the settings); fix it in "
                          f"config.json") from e
    except KilnError:  # said already (ConfigError is a ValueError: not the line below's)
        raise
    except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as e:
        # a setting of a type or range the converter did not check (a string for a nested
        # dict, -1 heads): one line, not a traceback
        raise ConfigError(f"{where}: a setting has a value of the wrong type or range "
                          f"({type(e).__name__}: {e}); compare it with a config.json that "
                          f"transformers wrote for this architecture") from e  # --debug: where
    decoder = untie_a_different_head(converter, decoder, source)
    if tokenizer is not None:
        warn_of_the_tokenizer_files(tokenizer, decoder, source.directory)
    mapping = Mapping(tp_size=tp_size, pp_size=pp_size)
    mapping.validate_for(decoder, as_options=True)
    quant = import_quantization(source, converter, decoder)
    plans = plan_targets(converter, decoder, source, quant)
    return ConversionPlan(source, converter, decoder, mapping, quant, plans,
                          _resolve_dtype(dtype, source, plans))


def check_tokenizer_files(directory: Path) -> ModelTokenizer | None:
    """The source's tokenizer (None where it has no tokenizer.json); refuse one whose files do
    not load as the runtime loads them: a trial's corrupt tokenizer.json passed conversion and
    build (exit 0), and only ``kiln run`` failed, advising to re-copy the checkpoint's copy, as
    corrupt. A source without tokenizer.json is warned about where the files are copied
    (:func:`kiln.output_dirs.copy_tokenizer`)."""
    from kiln.runtime.errors import TokenizerError
    from kiln.runtime.tokenizer import RECOPY, load_tokenizer

    if not (directory / "tokenizer.json").is_file():
        return None
    try:
        return load_tokenizer(directory)
    except TokenizerError as e:
        if not str(e).endswith(RECOPY):  # a field to correct, said so already
            raise CheckpointError(str(e)) from None
        raise CheckpointError(f"{str(e).removesuffix(f'; {RECOPY}')}: an engine needs the file "
                              f"to load (kiln run, LLM and kiln serve read it); restore the "
                              f"model's own copy") from None


def warn_of_the_tokenizer_files(tokenizer: ModelTokenizer, decoder: DecoderConfig,
                               directory: Path) -> None:
    """Say where the tokenizer has ids the model lacks (ModelTokenizer.past_vocabulary): such
    a source converts, and its text is refused at quantize and run; and what the generation
    config asks that kiln does not do, naming the file to edit (an engine's copy, which a run
    names, fails ``kiln verify`` once edited)."""
    from kiln.runtime.loader import warn_once
    from kiln.runtime.tokenizer import generation_config_warnings

    if said := tokenizer.past_vocabulary(decoder.vocab_size):
        log.warning("%s: %s (copy in the model's own)", directory, said)
    for said in generation_config_warnings(tokenizer.generation_config, decoder.vocab_size,
                                           str((directory / "generation_config.json")
                                               .absolute())):
        warn_once(said, log)  # (as LLM names it for --model_dir's engine, loaded next: once)


def untie_a_different_head(converter: type[Converter], decoder: DecoderConfig,
                           source: Source) -> DecoderConfig:
    """``decoder`` untied where its config ties the LM head to the embedding but the source also
    stores an LM head that differs from it: transformers loads such a checkpoint untied, with
    the stored head (a trial's engine left HF's tokens at the first one). Compared in row
    chunks, so no more than ~64 MB of each is held; a warning says what was done."""
    if not decoder.tie_word_embeddings:
        return decoder
    untied = replace(decoder, tie_word_embeddings=False)
    embed_name = _head_source(converter, decoder)
    head_name = _head_source(converter, untied)
    embed, head = source.tensors.get(embed_name), source.tensors.get(head_name)
    if head is None or embed is None or head_name == embed_name or _same(embed, head):
        return decoder
    log.warning("config.json: tie_word_embeddings is true, but %s differs from %s; converting "
                "with the stored %s as the LM head, as transformers loads it (untied)",
                head_name, embed_name, head_name)
    return untied


def _head_source(converter: type[Converter], decoder: DecoderConfig) -> str:
    rule, = (r for r in converter.tensor_rules(decoder) if r.target is Role.LM_HEAD)
    return rule.sources[0]


def _same(a: SourceTensor, b: SourceTensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    rows = a.shape[0] if a.shape else 0
    return all(torch.equal(a.read(chunk), b.read(chunk))
               for chunk in iter_row_chunks(rows, a.nbytes // max(rows, 1)))


def plan_targets(converter: type[Converter], config: DecoderConfig, source: Source,
                 quant: ImportedQuant | None = None) -> list[TargetPlan]:
    """Expand the converter's rules (and an imported quantization's companion rules) over
    layers and account for every tensor, strictly."""
    rules = {rule.target: rule for rule in converter.tensor_rules(config)}
    companions = quant.rules if quant is not None else {}
    plans, wanted = [], set()
    for name in tensor_names(config, quant=quant.config if quant is not None else None):
        role, layer, kind = parse_tensor(name)
        rule = rules.get(role) if kind is None else companions.get((role, kind))
        if rule is None:
            raise TensorMappingError(f"{converter.__name__} has no rule for {name} (a kiln bug)")
        names = [s.format(layer=layer) for s in rule.sources]
        wanted.update(names)
        if any(n not in source.tensors for n in names):
            continue  # reported below, with every other missing source
        sources = tuple(source.tensors[n] for n in names)
        plans.append(TargetPlan(name, role, layer, sources, rule, _planned_shape(rule, sources),
                                kind))
    ignored = [re.compile(p) for p in converter.ignored_patterns(config)]
    found = (n for n in source.tensors if n in wanted or not any(p.fullmatch(n) for p in ignored))
    if problem := name_mismatch(wanted, found):
        raise TensorMappingError(
            f"{source.directory}: source tensors do not match the {config.architecture} config: "
            f"{problem}; check config.json against the weights (biases, tied embeddings, layer "
            f"count)")
    for plan in plans:
        want = expected_shape(plan.role, config) if plan.kind is None else \
            scale_shape(plan.role, plan.kind, config, quant.config)
        if plan.shape != want:
            raise TensorMappingError(_shape_mismatch(plan, want, source.directory))
    return plans


def _shape_mismatch(plan: TargetPlan, want: tuple[int, ...], directory: Path) -> str:
    """The weights' file(s) and the shape the config implies: "<file>: model.embed_tokens.weight
    has shape [49152, 576], the config implies [49152, 640]; ..." (a trial's had been
    "['model.embed_tokens.weight']: give embed.weight shape ..." without a path)."""
    files = ", ".join(sorted({str(directory / s.location()[0]) for s in plan.sources}))
    names = plan.source_names()
    if len(names) == 1 and plan.shape == tuple(plan.sources[0].shape):
        what = f"{names[0]} has shape {list(plan.shape)}"
    else:  # several tensors fused, or one reshaped: the shape of what they make
        verb = "makes" if len(names) == 1 else "make"
        what = f"{', '.join(names)} {verb} {plan.name} of shape {list(plan.shape)}"
    return (f"{files}: {what}, the config implies {list(want)}; the weights and config.json "
            f"are of different models (or one of them was edited)")


def _planned_shape(rule: TensorRule, sources: tuple[SourceTensor, ...]) -> tuple[int, ...]:
    if rule.transform is None:
        return tuple(sources[0].shape)
    metas = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in sources]
    return tuple(rule.transform(*metas).shape)


def _resolve_dtype(dtype: str, source: Source, plans: list[TargetPlan]) -> str:
    if dtype != "auto":
        return dtype
    name = source.hf_config.get("torch_dtype") or source.hf_config.get("dtype")
    if name in DTYPES:
        return name
    names = (str(p.sources[0].dtype).removeprefix("torch.") for p in plans if p.kind is None)
    return next((n for n in names if n in DTYPES), "float32")  # FP8 weights are no model dtype


def _write_ranks(out: Path, plans: list[TargetPlan], config: DecoderConfig, mapping: Mapping,
                 dtype: torch.dtype, progress: bool) -> None:
    """Stream every target, in row chunks, into its ranks' files; sources read in file order."""
    writers = _open_writers(out, plans, config, mapping, dtype)
    plans = sorted(plans, key=lambda p: p.sources[0].location())
    total = sum(s.nbytes for p in plans for s in p.sources)
    with progress_bar(total=total, unit="B", unit_scale=True, desc="convert", show=progress,
                      leave=False) as bar:
        # Reading (and casting) runs one chunk ahead of writing, in a thread: both are mostly
        # system calls that release the GIL, so disk reads overlap disk writes.
        chunks = ((p, r, c) for p in plans for r, c in _row_chunks(p, p.out_dtype(dtype)))
        for plan, row, chunk in _prefetch(chunks, depth=2):
            if row == 0:
                placements = [_Placement.create(writers[rank], plan, config, mapping, tp_rank, dtype)
                              for tp_rank, rank in _ranks_holding(plan, config, mapping)]
            for placement in placements:
                placement.write(row, chunk)
            bar.update(chunk.numel() * plan.sources[0].dtype.itemsize if plan.kind is None
                       else sum(s.nbytes for s in plan.sources))
    for writer in writers.values():
        writer.close()


PREFETCH_JOIN_S = 1.0  # _prefetch: how long a stopped consumer waits for the reader thread


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """Yield from ``items``, produced by a worker thread up to ``depth`` items ahead.

    An error in the producer is re-raised here; if the consumer stops early (an error while
    writing, Ctrl-C, SIGTERM, SIGHUP), the producer is told to stop, and the consumer waits
    for it at most :data:`PREFETCH_JOIN_S` (it is a daemon thread). The consumer never touches
    the queue again once it stops: a signal's exception can land while its thread holds the
    queue's lock (inside ``Queue.get``), which is then never released, and a drain of the queue
    in cleanup hung on it (a trial's SIGHUP during a conversion, 1 in ~20 signals).
    """
    done, stop = object(), Event()
    queue: Queue = Queue(maxsize=depth)

    def offer(item: Any) -> bool:
        """Put ``item`` unless the consumer stopped first; True if it was put."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            offer(e)

    worker = Thread(target=produce, name="kiln-convert-read", daemon=True)
    worker.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(PREFETCH_JOIN_S)  # it ends within its put's 0.1 s, or its read's time


def _row_chunks(plan: TargetPlan, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) chunks of the whole target tensor, each at most ~64 MB of source,
    cast to ``dtype`` (the plan's :meth:`~TargetPlan.out_dtype`: FP8 stays FP8) and checked
    finite (:func:`_refuse_non_finite`).

    Copies and row concatenations (fused qkv, gate_up) are read piece by piece, so no fused
    tensor is ever materialized; any other transform is applied to whole sources once.
    """
    pieces = plan.row_pieces()
    names = plan.source_names()
    if pieces is None:
        sources = [s.read() for s in plan.sources]
        whole = _cast(plan.rule.transform(*sources), dtype)
        if not all_finite(whole):
            for name, src, raw in zip(names, plan.sources, sources, strict=True):
                _refuse_non_finite(name, src, raw, _cast(raw, dtype), 0)
            raise RuntimeError(f"{plan.name}: {plan.rule.transform.__name__} made NaN/Inf from "
                               f"finite sources (a kiln bug)")
        del sources
        yield 0, whole
        return
    row = 0
    for name, src in zip(names, pieces, strict=True):
        rows = src.shape[0]
        for a, b in iter_row_chunks(rows, src.nbytes // max(rows, 1)):
            raw = src.read((a, b))
            chunk = _cast(raw, dtype)
            if not all_finite(chunk):
                _refuse_non_finite(name, src, raw, chunk, a)
            del raw  # only the cast chunk waits in the prefetch queue
            yield row + a, chunk
        row += rows


def _refuse_non_finite(name: str, src: SourceTensor, raw: torch.Tensor, cast: torch.Tensor,
                       first_row: int) -> None:
    """Raise CheckpointError for rows ``raw`` of source tensor ``name`` (from ``first_row``)
    whose cast ``cast`` holds NaN/Inf: corrupt if the source does, else an overflow."""
    where = f"{name} in {src.location()[0]}"
    unit = "row" if len(src.shape) > 1 else "element"
    if (bad := first_non_finite(raw)) is not None:
        raise CheckpointError(f"{where} holds NaN/Inf values (first at {unit} {first_row + bad}); "
                              f"the checkpoint is corrupt: re-download it")
    if (bad := first_non_finite(cast)) is not None:
        limit = torch.finfo(cast.dtype).max
        out = str(cast.dtype).removeprefix("torch.")
        wider = wider_dtypes(cast.dtype)
        fix = (f"convert with --dtype {' or '.join(wider)}" if wider else
               f"no kiln dtype holds these values ({', '.join(DTYPES)})")
        raise CheckpointError(f"{where} overflows {out}: values beyond +-{limit:.4g} (first at "
                              f"{unit} {first_row + bad}) become inf; {fix}")


@dataclass(frozen=True)
class _Placement:
    """Where rows of a whole tensor go in one rank's shard of it."""

    writer: StreamingWriter
    name: str
    dim: int | None
    ranges: tuple[tuple[int, int, int], ...]  # (start, stop, local offset) along dim

    @classmethod
    def create(cls, writer: StreamingWriter, plan: TargetPlan, config: DecoderConfig,
               mapping: Mapping, tp_rank: int, dtype: torch.dtype) -> _Placement:
        spec = plan.spec
        dim = spec.dim
        ranges, local = [], 0
        if dim is not None:
            for start, stop in shard_ranges(plan.role, config, mapping, tp_rank, plan.shape[dim],
                                            spec):
                ranges.append((start, stop, local))
                local += stop - start
        placement = cls(writer, plan.name, dim, tuple(ranges))
        rows = plan.shape[0] if plan.shape else 1  # a scalar (scale) is one row
        for start, stop, offset in placement.ranges if dim == 0 else ():
            if stop > rows:  # vocab padding of the last rank: zero rows
                pad = torch.zeros((stop - max(start, rows), *plan.shape[1:]), dtype=dtype)
                writer.write_rows(plan.name, pad, offset + max(start, rows) - start)
        return placement

    def write(self, row: int, chunk: torch.Tensor) -> None:
        """Write rows ``[row, row + len(chunk))`` of the whole tensor (those this rank keeps)."""
        if self.dim is None:
            self.writer.write_rows(self.name, chunk, row)
        elif self.dim == 1:  # row-parallel weight: every row, this rank's columns
            (start, stop, _), = self.ranges
            self.writer.write_rows(self.name, chunk[:, start:stop].contiguous(), row)
        else:
            for start, stop, offset in self.ranges:
                lo, hi = max(row, start), min(row + chunk.shape[0], stop)
                if lo < hi:
                    self.writer.write_rows(self.name, chunk[lo - row:hi - row], offset + lo - start)


def _open_writers(out: Path, plans: list[TargetPlan], config: DecoderConfig, mapping: Mapping,
                  dtype: torch.dtype) -> dict[int, StreamingWriter]:
    entries: dict[int, list] = {rank: [] for rank in range(mapping.world_size)}
    for plan in plans:
        out_dtype = plan.out_dtype(dtype)
        for tp_rank, rank in _ranks_holding(plan, config, mapping):
            shape = shard_shape(plan.shape, plan.role, config, mapping, tp_rank, plan.spec)
            entries[rank].append((plan.name, out_dtype, shape))
    meta = {"format": "pt", "kiln_format": "checkpoint"}
    return {rank: StreamingWriter(out / rank_file(rank), sorted(e, key=lambda x: _name_key(x[0])),
                                  {**meta, "rank": str(rank)})
            for rank, e in entries.items()}


_KINDS = (None, WEIGHT_SCALE, INPUT_SCALE, *KV_SCALES)


def _name_key(name: str) -> tuple:
    """Natural order: embed, layers.0.*, layers.1.* ..., layers.10.*, then the head; a
    quantized weight's scales right after it."""
    role, layer, kind = parse_tensor(name)
    return (-1 if layer is None and role is Role.EMBED else layer if layer is not None else 1 << 30,
            list(Role).index(role), _KINDS.index(kind))


def _ranks_holding(plan: TargetPlan, config: DecoderConfig, mapping: Mapping) -> list[tuple[int, int]]:
    """(tp_rank, rank) pairs that store this target: the ranks of its pipeline stage."""
    if plan.layer is not None:
        stage = next(s for s in range(mapping.pp_size)
                     if plan.layer in mapping.stage_layers(s, config.num_layers))
    else:
        stage = 0 if plan.role is Role.EMBED else mapping.pp_size - 1
    return [(t, mapping.rank(t, stage)) for t in range(mapping.tp_size)]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _hash_files(files: list[Path], stop: Event) -> dict[str, str]:
    """sha256 of each weight file (runs in a worker thread; hashlib releases the GIL); stops
    within a block once ``stop`` is set."""
    return {path.name: sha256_file(path, on_block=stops_when(stop)) for path in files}


def _provenance(source: Source, converter: type[Converter], hashes: Future) -> dict:
    return {
        "model_dir": os.path.abspath(source.directory),  # meaningful from any directory
        "repo_id": source.repo_id,
        "revision": source.revision,
        "architecture": architecture_name(source.hf_config),
        "converter": converter.__name__,
        "files": hashes.result(),
    }
