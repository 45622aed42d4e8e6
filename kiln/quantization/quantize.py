"""``kiln quantize``: a kiln checkpoint -> a quantized kiln checkpoint, layer by layer, gated.

Steps: check the options, the input and the output (nothing is read or written on bad input)
-> tokenize the calibration / evaluation text (kiln.quantization.data) -> open one writer per
output rank (the input's tp/pp mapping) -> for each layer: read its float tensors (ranks
merged, float32, on ``device``), run it on the calibration hidden states with the statistics
observer, run it on the source evaluation hidden states, quantize it (smoothing, weights,
scales), write each rank's part, run the quantized layer (as the reference decoder runs the
written checkpoint) on the quantized evaluation hidden states -> the head: the accuracy gate
-> config.json (``quantization`` with calibration provenance and accuracy), accuracy.json,
tokenizer files -> rename into place.

Memory: one float layer, one quantized layer, and the hidden states of the calibration samples
and of both evaluation streams ([samples, seq_length, hidden] float32 each); run in
micro-batches of about :data:`BATCH_TOKENS` tokens. Calibration hidden states move on through
the float layer (each layer is calibrated on the source model's activations).

The lm_head is quantized only with ``--quantize_lm_head`` (weight-only formats; round to nearest
at the format's granularity, no smoothing: its input is the final norm's), after the layers;
the gate then scores the quantized stream through the quantized head.

Non-goals: quantizing the embedding; calibrating on the quantized model's own activations
(GPTQ-style sequential error feedback).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kiln
from kiln.checkpoint import (
    CONFIG_NAME,
    REWRITE,
    CheckpointConfig,
    check_other_files,
    check_rank_header,
    check_tensor_dtypes,
    existing_rank_file,
    hash_rank_files,
    load_config,
    rank_files_checked,
)
from kiln.config import options_from
from kiln.datasets import TextDataset, load_texts
from kiln.dirs import expand_home
from kiln.errors import (
    ConfigError,
    DatasetError,
    QuantizationError,
    check_flag,
    check_path,
    counted,
    option,
)
from kiln.output_dirs import (
    CHECKPOINT_KIND,
    atomic_dir,
    check_output,
    copy_tokenizer,
    file_digests,
    output_path,
)
from kiln.progress import progress_bar
from kiln.quantization.accuracy import AccuracyMeter, check_gate, summary
from kiln.quantization.config import FORMATS, GROUP_SIZES, WEIGHT_SCALE, Granularity, QuantConfig
from kiln.quantization.data import (
    Samples,
    TooFewTokens,
    load_tokenizer_of,
    shared_lines,
    split_calibration,
    token_samples,
)
from kiln.quantization.formats import dequantize_weight, quantize_weight
from kiln.quantization.layerio import LayerReader, QuantizedWriter, unlayered_chunks
from kiln.quantization.options import (
    DEFAULT_CALIB_SEQ_LENGTH,
    SHORT_CALIB_SEQ_LENGTH,
    QuantizeOptions,
)
from kiln.quantization.transforms import AWQ_ROWS, LayerStats, quantize_layer
from kiln.reference import ReferenceDecoder, norm
from kiln.roles import Role, companion
from kiln.tensorio import read_header

log = logging.getLogger(__name__)
ACCURACY_FILE = "accuracy.json"
BATCH_TOKENS = 4096
FIRM_GATE_TOKENS = 4096  # fewer evaluation tokens than this: the gate says it is weak
MIN_GATE_TOKENS = 64  # fewer: the enforced gate refuses before any work (a handful of guesses)
DEFAULT_ALPHA = 0.5  # SmoothQuant's default migration strength (OPT, BLOOM)


def quantize(checkpoint_dir: str | Path, output_dir: str | Path, *, progress: bool = True,
             **options: Any) -> Path:
    """Quantize the kiln checkpoint ``checkpoint_dir`` into ``output_dir``.

    ``options`` are :class:`~kiln.quantization.options.QuantizeOptions` fields by keyword
    (``qformat`` is required): one definition for this function and ``kiln quantize``. Returns
    the output directory. Raises :class:`~kiln.errors.KilnError` subclasses on bad input or a
    failed accuracy gate (:class:`~kiln.errors.AccuracyGateError`), leaving nothing behind.
    ``output_dir``: a str or os.PathLike; ``"-"`` and ``Path("-")`` are refused, as
    the CLI refuses ``--output_dir -`` (``"./-"`` names a directory "-").
    """
    opts = options_from(QuantizeOptions, options, "quantize", also=("progress",))
    check_flag("progress", progress, ConfigError)
    # (before Path(), which reads "" as the current directory)
    check_path("checkpoint_dir", checkpoint_dir, ConfigError, "pass a kiln checkpoint directory")
    source_dir = expand_home(checkpoint_dir, "checkpoint_dir", ConfigError)
    output_dir = output_path(output_dir)
    check_output(output_dir, opts.overwrite, inputs=[source_dir], writes=CHECKPOINT_KIND)
    source = load_config(source_dir, "checkpoint_dir")
    check_other_files(source_dir, source)  # the tokenizer, copied into the output
    check_rank_files(source_dir, source)
    context = source.decoder.max_position_embeddings
    texts = opts.calib_dataset or opts.eval_dataset  # (without, the length is not used)
    if texts and opts.calib_max_seq_length is None:
        opts = dataclasses.replace(opts, calib_max_seq_length=min(DEFAULT_CALIB_SEQ_LENGTH,
                                                                  context))
    elif texts and opts.calib_max_seq_length > context:
        raise ConfigError(f"calib_max_seq_length {opts.calib_max_seq_length} exceeds the model's "
                          f"max_position_embeddings {context} (positions it was not trained "
                          f"for would calibrate it); lower {option('calib_max_seq_length')}")
    elif texts and opts.calib_max_seq_length < min(SHORT_CALIB_SEQ_LENGTH, context):
        what = ("activation ranges and the accuracy gate's perplexity come" if opts.calibrates
                else "the accuracy gate's perplexity comes")
        log.warning("%s: %s from %d-token contexts, far shorter than real prompts; %d or more "
                    "measures the model as it is used",
                    option("calib_max_seq_length", opts.calib_max_seq_length), what,
                    opts.calib_max_seq_length,
                    min(DEFAULT_CALIB_SEQ_LENGTH, context))
    if source.quantization is not None:
        raise QuantizationError(f"{source_dir} is already quantized "
                                f"({source.quantization.qformat}); quantize its unquantized "
                                f"source checkpoint instead")
    info = FORMATS.get(opts.qformat)
    if info is not None and Granularity.PER_GROUP in info.weight_scales:
        check_group_size(opts.group_size, source)  # before QuantConfig's, which knows no model
    quant = quant_config(opts, source)
    if opts.group_size is None:  # the format's default, known now
        check_group_size(quant.group_size, source, default=True)
    device = resolve_device(opts.device)
    job = _Job(source_dir, source, quant, device, opts, progress)
    job.load_data()
    started = time.perf_counter()
    # the source's rank files hashed beside the work: a damaged one must not come out under
    # fresh checksums (a trial quantized a checkpoint kiln build had refused)
    with atomic_dir(output_dir, opts.overwrite, CHECKPOINT_KIND) as tmp, \
            rank_files_checked(source_dir, source) as check:
        job.run(tmp, check)
        check()
    log.info("wrote %s in %.1f s", output_dir, time.perf_counter() - started)
    return output_dir


def check_rank_files(source_dir: Path, source: CheckpointConfig) -> None:
    """Every rank file of the source, from its header (no data read): present, the names and
    shapes a build checks, and the dtype config.json records, which the output is written in
    (a trial's hand-edited tp_size and dtype had been tracebacks midway)."""
    for rank in range(source.mapping.world_size):
        path = existing_rank_file(source_dir, source, rank)
        infos, _ = read_header(path, REWRITE)
        check_rank_header(path, source, rank, infos)
        check_tensor_dtypes(path, source, infos)


def quant_config(opts: QuantizeOptions, source: CheckpointConfig) -> QuantConfig:
    """The output's QuantConfig (calibration and accuracy filled in later)."""
    alpha = None
    if opts.qformat == "int8_sq":
        alpha = opts.smoothquant_alpha if opts.smoothquant_alpha is not None else \
            default_alpha(source.decoder.architecture)
    quant = QuantConfig(opts.qformat, group_size=opts.group_size,
                        weight_scales=opts.weight_scales, kv_cache_dtype=opts.kv_cache_dtype,
                        smoothquant_alpha=alpha, quantize_lm_head=opts.quantize_lm_head)
    if quant.info.smoothing:
        quant = quant.with_(pre_quant_scales=(Role.OUT.value, Role.DOWN.value))
    return quant


def default_alpha(architecture: str) -> float:
    """SmoothQuant alpha of an architecture: its converter's ``smoothquant_alpha`` (a number,
    or a dict by HF architecture name), else :data:`DEFAULT_ALPHA`."""
    from kiln.converters.base import converter_for

    try:
        value = getattr(converter_for({"architectures": [architecture]}), "smoothquant_alpha",
                        DEFAULT_ALPHA)
    except ConfigError:
        return DEFAULT_ALPHA
    return float(value.get(architecture, DEFAULT_ALPHA) if isinstance(value, dict) else value)


def check_group_size(group_size: int | None, source: CheckpointConfig,
                     default: bool = False) -> None:
    """An int4 ``group_size`` (None: no groups) is one of :data:`GROUP_SIZES` and splits each
    rank's input features of every quantized linear into whole groups; a refusal names the
    sizes that fit this checkpoint, and the size as the format's default where the user gave
    none (a trial's "--group_size 128" had not been typed)."""
    if group_size is None:
        return
    named = f"the default {option('group_size', group_size)}" if default else \
        option("group_size", group_size)
    cfg, tp = source.decoder, source.mapping.tp_size
    inputs = {"attn.qkv / mlp (hidden)": cfg.hidden_size, "attn.o": cfg.q_size // tp,
              "mlp.down": cfg.intermediate_size // tp}
    fits = [g for g in GROUP_SIZES if all(f % g == 0 for f in inputs.values())]
    if fits:
        use = f"use {' or '.join(option('group_size', g) for g in fits)}"
        which = f"; of those, {' and '.join(map(str, fits))} " \
                f"{'divides' if len(fits) == 1 else 'divide'}"
    else:
        use, which = "no int4 group size fits; use int8_wo", ", and none of those divides"
    if group_size not in GROUP_SIZES:
        widths = ", ".join(f"{what} {features}" for what, features in inputs.items())
        raise ConfigError(f"{option('group_size', group_size)} is not an int4 group size "
                          f"({', '.join(map(str, GROUP_SIZES))}){which} this checkpoint's input "
                          f"features per rank (tp_size {tp}: {widths}); {use}")
    for what, features in inputs.items():
        if features % group_size:
            raise ConfigError(f"{named} does not divide the "
                              f"{features} input features of {what} per rank (tp_size {tp}); "
                              f"{use}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option('device', 'cuda')}: no CUDA GPU is available to torch "
                          f"here; use {option('device', 'cpu')} (or auto)")
    return torch.device(device)


def _warn_of_calibration_text(texts: TextDataset, calib: Samples) -> None:
    """Warn where any of the evaluation text is calibration text, saying how much: the lines of
    the text the calibration samples read (``Samples.text``), not of the whole file (trial 37:
    the tail of a file whose head alone was read had been warned of) (:func:`shared_lines`).

    Any: unrelated texts share next to no line of
    :data:`~kiln.quantization.data.MIN_SHARED_CHARS` characters (kiln.testing.english's two sets
    share none). It had taken half, and a trial's one file given as both, with --calib_size 4
    reading about 40% of it, was told nothing; the count says whether a share is a stray
    boilerplate line or the gate's text."""
    shared, lines = shared_lines(texts, [calib.text])
    if shared:
        log.warning("%s %s: %d of its %d lines are in the text calibration read from %s: the "
                    "accuracy gate scores text calibration has seen, which flatters the "
                    "quantized checkpoint; give other text, or leave %s out (a fifth of the "
                    "calibration text read is then held out for the gate)",
                    option("eval_dataset"), texts.shown, shared, lines,
                    option("calib_dataset"), option("eval_dataset"))


@dataclass
class _Streams:
    """Hidden states [N, L, hidden] of the calibration samples and both evaluation streams."""

    calib: torch.Tensor | None = None
    source: torch.Tensor | None = None
    quantized: torch.Tensor | None = None


class _Job:
    """One quantization run: data, then the layer loop, the gate and the output files."""

    def __init__(self, source_dir: Path, source: CheckpointConfig, quant: QuantConfig,
                 device: torch.device, opts: QuantizeOptions, progress: bool):
        self.source_dir, self.source, self.quant = source_dir, source, quant
        self.device, self.opts, self.progress = device, opts, progress
        self.calib: Samples | None = None
        self.eval: Samples | None = None

    def load_data(self) -> None:
        """Tokenized calibration and evaluation samples (module docstring of data.py)."""
        opts = self.opts
        if not (opts.calib_dataset or opts.eval_dataset):
            return
        tokenizer = load_tokenizer_of(self.source_dir)
        calib_texts = load_texts(opts.calib_dataset, "calib_dataset") \
            if opts.calib_dataset else None
        if calib_texts is not None and not (opts.calibrates or opts.eval_dataset):
            # the held-out samples only: the format calibrates nothing
            self.eval = split_calibration(calib_texts, tokenizer, opts.calib_size,
                                          opts.calib_max_seq_length)[1]
        elif calib_texts is not None and opts.calibrates:
            # with an --eval_dataset scoring the gate, nothing is held out (trial 37: a run
            # that fit was refused for the held-out samples it would not read)
            calib, held = split_calibration(calib_texts, tokenizer, opts.calib_size,
                                            opts.calib_max_seq_length,
                                            hold_out=not opts.eval_dataset)
            self.calib = calib
            self.quant = self.quant.with_(calibration=calib.provenance)
            self.eval = held
        elif calib_texts is not None:
            log.warning("%s %s is not read: %s calibrates nothing, and %s scores the accuracy "
                        "gate", option("calib_dataset"), calib_texts.shown, opts.qformat,
                        option("eval_dataset"))
        if opts.eval_dataset:
            texts = load_texts(opts.eval_dataset, "eval_dataset")
            if self.calib is not None:
                _warn_of_calibration_text(texts, self.calib)
            try:
                self.eval = token_samples(texts, tokenizer, opts.calib_max_seq_length)
            except TooFewTokens as e:  # its advice, followed, must not meet the gate's refusal
                if opts.no_accuracy_gate or e.tokens > MIN_GATE_TOKENS:  # shorter samples do
                    raise
                raise DatasetError(f"{e}. The accuracy gate needs {MIN_GATE_TOKENS + 1} tokens "
                                   f"of it at the least ({MIN_GATE_TOKENS} scored: a sample's "
                                   f"first token predicts nothing); with fewer, pass "
                                   f"{option('no_accuracy_gate', True)} to record undecided "
                                   f"figures") from None
        self._check_vocabulary()
        if not opts.no_accuracy_gate:
            self._check_gate_size()

    def _check_vocabulary(self) -> None:
        """Refuse samples holding ids past the model's vocabulary: a tokenizer of another model
        beside the weights (a retest's SmolLM2 tokenizer with a 256-token model had indexed the
        embedding out of range, a traceback)."""
        vocab = self.source.decoder.vocab_size
        for samples in (self.calib, self.eval):
            if samples is not None and (largest := int(samples.tokens.max())) >= vocab:
                raise DatasetError(
                    f"{self.source_dir}: its tokenizer encodes {samples.dataset.shown} to token "
                    f"id {largest}, past the model's vocabulary of {vocab} (decoder.vocab_size): "
                    f"the tokenizer files are not this model's; convert the checkpoint again "
                    f"from the model's own Hugging Face dir")

    def _costly_settings(self) -> list[str]:
        """The options given that cost accuracy besides the format (a trial's int8_wo with an
        int8 KV cache failed its gate, told to choose a wider format than the widest)."""
        quant, opts = self.quant, self.opts
        settings = [option("kv_cache_dtype", quant.kv_cache_dtype)] if quant.kv_cache_dtype \
            else []
        if quant.quantize_lm_head:
            settings.append(option("quantize_lm_head", True))
        default = default_alpha(self.source.decoder.architecture)
        if opts.smoothquant_alpha not in (None, default):
            settings.append(f"{option('smoothquant_alpha', f'{opts.smoothquant_alpha:g}')} "
                            f"(this model's default: {default:g})")
        return settings

    def _check_gate_size(self) -> None:
        """Refuse an enforced gate that would score fewer than MIN_GATE_TOKENS tokens: a trial's
        ``--calib_size 1 --calib_max_seq_length 2`` gated fp8 on 1 token, 'passed', and the
        checkpoint's perplexity was 25% above its source's."""
        n, length = self.eval.tokens.shape
        scored = n * (length - 1)  # each window's positions 0..L-2 predict its next token
        if scored >= MIN_GATE_TOKENS:
            return
        more = (f"longer {option('eval_dataset')} text" if self.opts.eval_dataset else
                f"more calibration samples ({option('calib_size')}: a fifth of the text read is "
                f"held out for the gate), a longer {option('calib_max_seq_length')}, or an "
                f"{option('eval_dataset')}")
        raise ConfigError(f"the accuracy gate would score {counted(scored, 'token')} "
                          f"({counted(n, 'window')} of {length} tokens, whose first predicts "
                          f"nothing), too few to decide anything (it needs {MIN_GATE_TOKENS} "
                          f"scored, and {FIRM_GATE_TOKENS} for a firm answer): give {more}; or "
                          f"pass {option('no_accuracy_gate', True)} to record the figures "
                          f"without enforcing them")

    def run(self, out: Path, check_source: Callable[..., None]) -> None:
        """``check_source``: :func:`~kiln.checkpoint.rank_files_checked`'s check, made after
        each layer once the hashes are done, and before the accuracy gate in any case (a
        damaged source is named as such, not as the NaN or the perplexity it causes)."""
        cfg = self.source.decoder
        if self.source.rank_checksums is None:  # no hashes to name damage before the head's
            # turn, after every layer (a NaN in it had been met ~30 s into SmolLM2's): one read
            # of the embedding and head first, values checked, in row chunks
            log.info("%s records no checksums: reading its embedding and head for NaN/Inf "
                     "first", self.source_dir)
            for _ in unlayered_chunks(self.source_dir, range(self.source.mapping.world_size)):
                pass
        reader = LayerReader(self.source_dir, self.source, self.device)
        writer = QuantizedWriter(out, self.source_dir, self.source, self._target(self.quant))
        streams = self._embed(reader)
        started = time.perf_counter()
        # one bar to the end, the head and the accuracy gate named on it: in a log its clock
        # keeps the lines coming through them too
        with progress_bar(total=cfg.num_layers, desc="quantize", unit="layer",
                          show=self.progress, leave=False) as bar:
            for i in range(cfg.num_layers):
                layer_started = time.perf_counter()
                self._layer(i, reader, writer, streams)
                check_source(wait=False)
                bar.update()
                log.info("layer %d/%d quantized in %.2f s", i + 1, cfg.num_layers,
                         time.perf_counter() - layer_started)
            bar.set_postfix_str("lm_head", refresh=False)
            writer.copy_unlayered()
            head = self._quantize_head(reader, writer)
            writer.close()
            log.info("%d layers in %.1f s (%.2f s per layer)", cfg.num_layers,
                     time.perf_counter() - started,
                     (time.perf_counter() - started) / cfg.num_layers)
            bar.set_postfix_str("accuracy gate", refresh=False)
            check_source()
            accuracy = self._accuracy(reader, streams, head)
        quant = self.quant.with_(accuracy=accuracy)
        (out / ACCURACY_FILE).write_text(json.dumps(accuracy, indent=2) + "\n")
        other_files = {**copy_tokenizer(self.source_dir, out), **file_digests(out, [ACCURACY_FILE])}
        checksums = hash_rank_files(out, self.source.mapping.world_size)
        target = dataclasses.replace(self._target(quant, other_files), rank_checksums=checksums)
        # the manifest last (an older kiln's overwrite check trusted files no newer than it)
        (out / CONFIG_NAME).write_text(json.dumps(target.to_dict(), indent=2) + "\n")

    def _target(self, quant: QuantConfig,
                other_files: dict[str, str] | None = None) -> CheckpointConfig:
        src = self.source
        return CheckpointConfig(decoder=src.decoder, mapping=src.mapping, dtype=src.dtype,
                                quantization=quant,
                                source={**src.source,
                                        "quantized_from": os.path.abspath(self.source_dir)},
                                kiln_version=kiln.__version__,
                                other_files=None if other_files is None else
                                dict(sorted(other_files.items())))

    def _embed(self, reader: LayerReader) -> _Streams:
        embed = reader.read([Role.EMBED.name()], float32=False)[Role.EMBED.name()]

        def hidden(samples: Samples | None) -> torch.Tensor | None:
            return None if samples is None else embed[samples.tokens.to(self.device)].float()

        source = hidden(self.eval)
        return _Streams(hidden(self.calib), source, None if source is None else source.clone())

    def _layer(self, i: int, reader: LayerReader, writer: QuantizedWriter,
               streams: _Streams) -> None:
        cfg, quant = self.source.decoder, self.quant
        w = reader.layer(i)
        stats = None
        if streams.calib is not None:
            n, length = streams.calib.shape[:2]
            awq = quant.qformat == "int4_awq"
            stats = LayerStats(mean_abs=awq, row_stride=math.ceil(n * length / AWQ_ROWS) if awq
                               else 0)
        layer = ReferenceDecoder(cfg, w, observer=None if stats is None else stats.observe)
        _run(layer, i, streams.calib)
        layer.observer = None
        _run(layer, i, streams.source)
        tensors = quantize_layer(w, i, cfg, quant, stats, quant.smoothquant_alpha,
                                 self.source.torch_dtype)
        del layer, w
        writer.write_layer(i, tensors)
        if streams.quantized is not None:
            qlayer = ReferenceDecoder(cfg, {n: t.to(self.device) for n, t in tensors.items()},
                                      quant=quant)
            _run(qlayer, i, streams.quantized)

    def _quantize_head(self, reader: LayerReader, writer: QuantizedWriter) -> torch.Tensor | None:
        """With quantize_lm_head: write the quantized lm_head; return it dequantized (the
        quantized model's head for the gate)."""
        if not self.quant.quantize_lm_head:
            return None
        name = Role.LM_HEAD.name()
        weight = reader.read([name])[name]
        stored, scale = quantize_weight(weight, self.quant)
        writer.write_head({name: stored, companion(Role.LM_HEAD, None, WEIGHT_SCALE): scale})
        return dequantize_weight(stored, scale, self.quant)

    def _accuracy(self, reader: LayerReader, streams: _Streams,
                  quantized_head: torch.Tensor | None = None) -> dict[str, Any] | None:
        """The gate's figures (None, said at WARNING, when there is no evaluation text)."""
        if self.eval is None:
            log.warning("accuracy was not measured: no %s or %s, so the quantized checkpoint "
                        "records accuracy null", option("calib_dataset"), option("eval_dataset"))
            return None
        cfg = self.source.decoder
        names = [r.name() for r in (Role.FINAL_NORM, Role.FINAL_NORM_BIAS, Role.LM_HEAD)
                 if r.name() in self.source.rank_tensor_names(self.source.mapping.world_size - 1)]
        head = reader.read(names, float32=False)
        weight = head[Role.FINAL_NORM.name()].float()
        bias = head.get(Role.FINAL_NORM_BIAS.name())
        bias = None if bias is None else bias.float()
        lm_head = head[Role.LM_HEAD.name()]
        meter = AccuracyMeter()
        n, length = self.eval.tokens.shape
        step = max(1, (1 << 25) // (length * cfg.vocab_size))
        for a in range(0, n, step):
            logits = [_logits(norm(h[a:a + step], weight, bias, cfg), head)
                      for h, head in ((streams.source, lm_head),
                                      (streams.quantized, quantized_head
                                       if quantized_head is not None else lm_head))]
            meter.update(*logits, self.eval.tokens[a:a + step])
        accuracy = {**meter.result(), **self.eval.provenance}
        if MIN_GATE_TOKENS <= accuracy["tokens"] < FIRM_GATE_TOKENS:
            more = f"longer {option('eval_dataset')} text" if self.opts.eval_dataset else \
                f"more calibration samples ({option('calib_size')}: a fifth of them is held out " \
                f"for the gate), or an {option('eval_dataset')}"
            log.warning("the accuracy gate rests on %s only (under %d: its ratio can miss a "
                        "real loss); give %s", counted(accuracy["tokens"], "token"),
                        FIRM_GATE_TOKENS, more)
        limit = self.opts.max_ppl_ratio or self.quant.info.max_ppl_ratio
        accuracy["max_ppl_ratio"] = limit
        accuracy["passed"] = check_gate(accuracy, self.quant.qformat, limit,
                                        enforce=not self.opts.no_accuracy_gate,
                                        settings=self._costly_settings())
        log.info("accuracy: %s", summary(accuracy))
        if accuracy["tokens"] < MIN_GATE_TOKENS:  # --no_accuracy_gate: the enforced gate refuses
            accuracy["passed"] = None  # too few tokens to decide (_check_gate_size)
            log.warning("the accuracy gate's figures rest on %s, too few to decide (under %d): "
                        "recorded as undecided (passed: null)",
                        counted(accuracy["tokens"], "token"), MIN_GATE_TOKENS)
        elif not accuracy["passed"]:
            log.warning("%s is above the accuracy gate (%s): %s", self.quant.qformat,
                        option("no_accuracy_gate", True), summary(accuracy))
        return accuracy


def _run(layer: ReferenceDecoder, i: int, x: torch.Tensor | None) -> None:
    """Layer ``i`` on hidden states x [N, L, hidden], in place, in micro-batches."""
    if x is None:
        return
    step = max(1, BATCH_TOKENS // x.shape[1])
    for a in range(0, x.shape[0], step):
        x[a:a + step] = layer.forward_layer(i, x[a:a + step])


def _logits(h: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """``h @ lm_head.T`` in float32, the head upcast 32768 rows at a time."""
    if lm_head.dtype == torch.float32:
        return h @ lm_head.T
    return torch.cat([h @ lm_head[r:r + 32768].float().T
                      for r in range(0, lm_head.shape[0], 32768)], dim=-1)

