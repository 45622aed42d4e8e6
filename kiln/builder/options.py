"""BuildOptions: everything ``kiln build`` takes, validated, and how defaults resolve.

The CLI builds its options and help from these fields (``metadata["help"]``); the Python API
takes the same names by keyword. Defaults that depend on the model (limits, dtype) resolve in
:func:`resolve_limits` / the builder once the checkpoint config is read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from kiln.config import DTYPES, DecoderConfig, PositionType
from kiln.dirs import expand_home
from kiln.engine import BuildLimits
from kiln.errors import (
    ConfigError,
    OutputError,
    check_counts,
    check_flags,
    check_path,
    option,
    shown,
)
from kiln.plugins.registry import check_names, parse_mode
from kiln.sizes import size_option

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_INPUT_LEN = 1024
# The least max_seq_len kiln builds: a prompt token and a generated one. At 1 the only prompt
# that fits is one token (most tokenizers' BOS alone), so no text prompt could run and kiln eval
# has no two-token window; such builds had passed, to fail at the first prompt.
MIN_SEQ_LEN = 2
MEMORY_HEADROOM = 0.85  # share of available RAM the default --max_build_memory takes
# Bytes below which no backend builds anything: the least of their base_memory (onnx and
# torch: 400 MiB, their libraries and Python; a test keeps it so).
MIN_BUILD_MEMORY = 400 << 20


@dataclass(frozen=True)
class BuildOptions:
    checkpoint_dir: Path = field(metadata={"help": "kiln checkpoint (output of convert_checkpoint)."})
    output_dir: Path = field(metadata={"help": "Engine dir to write (must not exist unless --overwrite)."})
    backend: str = field(default="onnx", metadata={"help": "Engine backend."})
    max_batch_size: int = field(default=8, metadata={"help": "Sequences (KV-cache slots) per step."})
    max_input_len: int | None = field(default=None, metadata={
        "help": f"Prompt tokens of one request [default: min({DEFAULT_MAX_INPUT_LEN}, max_seq_len)]."})
    max_seq_len: int | None = field(default=None, metadata={
        "help": "Prompt + generated tokens of one request, the KV-cache length "
                f"[default: min({DEFAULT_MAX_SEQ_LEN}, the model's max positions)]."})
    max_num_tokens: int | None = field(default=None, metadata={
        "help": "Tokens of all sequences in one step (prefill chunks + decodes), at least "
                "max_batch_size [default: max(max_input_len, max_batch_size)]."})
    dtype: str | None = field(default=None, metadata={
        "help": "Weight/activation dtype [default: the checkpoint's]."})
    targets: tuple[str, ...] = field(default=(), metadata={
        "help": "Targets, comma-separated: sm75,sm80,sm86,sm89,sm120,sm121 (TensorRT-RTX), "
                "the local GPU (full TensorRT), cpu or cuda (onnx) [default: per backend]."})
    plugins: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Plugin name -> auto|enable|disable."})
    max_build_memory: int | str | None = field(default=None, metadata={
        "help": "Host RAM the build may use: bytes, or a size such as 20GB or 512MiB "
                f"[default: {MEMORY_HEADROOM:.0%} of available RAM]."})
    workers: int = field(default=1, metadata={
        "help": "Engine parts built in parallel (each gets max_build_memory / workers)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})
    allow_long_context: bool = field(default=False, metadata={
        "help": "Allow max_seq_len beyond the model's max positions without RoPE scaling."})
    gather_context_logits: bool = field(default=False, metadata={
        "help": "Engines that can return every prompt position's logits (prompt_logprobs, "
                "kiln eval); the lm_head then runs on every prefill token."})
    weight_only_int8_compute: bool = field(default=False, metadata={
        "help": "onnx backend, int8_wo/int4_wo/int4_awq checkpoints: MatMulNBits quantizes each "
                "activation block to int8 and computes in integers (ONNX Runtime's "
                "accuracy_level 4, onnxruntime-genai's CPU default): faster on CPU, but the "
                "logits no longer follow the checkpoint's weight-only numerics exactly."})

    def __post_init__(self) -> None:
        # the dirs first, before Path(), which reads "" as the current directory: a
        # BuildOptions made by hand had taken "", None and "-" (kiln.build had checked them)
        check_path("checkpoint_dir", self.checkpoint_dir, ConfigError,
                   "pass a kiln checkpoint directory", directory=True)
        check_path("output_dir", self.output_dir, OutputError, "give the directory to write",
                   directory=True)
        check_flags(self, ConfigError)
        check_counts(self, ConfigError, at_least={"max_seq_len": MIN_SEQ_LEN})
        # "18GB" as kiln build's flag takes it (an int is bytes)
        given = self.max_build_memory
        # (a number meant as GB: max_build_memory=40 had planned a build in 40 bytes)
        memory = size_option("max_build_memory", given, least=MIN_BUILD_MEMORY,
                             short=f"less than the {MIN_BUILD_MEMORY >> 20} MiB any build needs "
                                   f"(a backend's libraries alone)",
                             fix=f"give {MIN_BUILD_MEMORY >> 20}MiB or more")
        object.__setattr__(self, "max_build_memory", memory)
        if self.max_num_tokens is not None and self.max_num_tokens < self.max_batch_size:
            # as vLLM refuses max_num_batched_tokens < max_num_seqs: a step could not hold a
            # decode of each sequence (a trial's max_num_tokens 1 built, and ran a token a step)
            raise ConfigError(f"max_num_tokens {self.max_num_tokens} is below max_batch_size "
                              f"{self.max_batch_size}: a step could not decode a token of "
                              f"each sequence; raise {option('max_num_tokens')} to at least "
                              f"{self.max_batch_size} or lower {option('max_batch_size')}")
        for name in ("checkpoint_dir", "output_dir"):
            object.__setattr__(self, name, expand_home(getattr(self, name), name, ConfigError))
        object.__setattr__(self, "targets", _targets(self.targets))
        if not isinstance(self.plugins or {}, Mapping):  # (dict() of a string: a ValueError)
            raise ConfigError(f"plugins must be a dict of plugin name -> auto, enable or "
                              f"disable, such as {{'attention': 'enable'}}, found "
                              f"{shown(self.plugins)}")
        object.__setattr__(self, "plugins", dict(self.plugins or {}))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, found {self.dtype!r}")
        check_names(self.plugins)  # the names first, then their modes
        for name, mode in self.plugins.items():
            parse_mode(name, mode)

    def memory_budget(self) -> int:
        """Bytes of host RAM the whole build may use."""
        if self.max_build_memory is not None:
            return self.max_build_memory
        budget = int(psutil.virtual_memory().available * MEMORY_HEADROOM)
        log.info("max_build_memory defaults to %.1f GB (%.0f%% of available RAM)", budget / 1e9,
                 MEMORY_HEADROOM * 100)
        return budget


def _targets(given: Any) -> tuple[str, ...]:
    """The targets as one set: lower case, each once, sorted (a trial's sm86,sm86 had been
    recorded twice, and sm89,sm86 was another build cache entry than sm86,sm89)."""
    if not isinstance(given, (list, tuple, set, frozenset)) or \
            not all(isinstance(t, str) for t in given):
        raise ConfigError(f"targets must be a list of names such as ['sm86', 'sm89'] or "
                          f"['cpu'], found {given!r:.80}")
    return tuple(sorted({t.strip().lower() for t in given}))


def resolve_limits(options: BuildOptions, decoder: DecoderConfig,
                   config: Path | None = None) -> BuildLimits:
    """The engine's BuildLimits, with defaults filled in and the position range checked.
    ``config``: the config.json the model's positions were read from, named in messages
    (default: the checkpoint's; the build cache's is the Hugging Face one it converts)."""
    max_seq_len, max_input_len, max_num_tokens = (
        given or default for given, default in _lengths(options, decoder.max_position_embeddings))
    if max_seq_len < MIN_SEQ_LEN:  # given ones are checked in BuildOptions: the default
        # A trial's config.json edited to max_position_embeddings 1 had built an engine of
        # max_seq_len 1, whose every run gave one token.
        # the build cache's Hugging Face config: it converts again by itself (a retest's
        # --model_dir user had been told to convert)
        again = "" if config is not None else " and convert it again"
        config = config or options.checkpoint_dir / "config.json"
        raise ConfigError(f"max_seq_len defaults to the checkpoint's max_position_embeddings "
                          f"{decoder.max_position_embeddings} ({config}), below the "
                          f"{MIN_SEQ_LEN} kiln builds (a prompt token and a generated one); "
                          f"pass {option('max_seq_len')} (with "
                          f"{option('allow_long_context', True)}) or fix the model's "
                          f"config.json{again}")
    if options.max_seq_len is None and max_input_len > max_seq_len:
        # the default named, and what raising it takes (a retest's --max_input_len 300 of a
        # model of 256 positions had been told to raise --max_seq_len, then refused again)
        raise_it = f"pass {option('max_seq_len', max_input_len)} or more"
        if max_seq_len == decoder.max_position_embeddings:  # the model's positions
            default = f"the model's max_position_embeddings " \
                      f"({config or options.checkpoint_dir / 'config.json'})"
            if decoder.rope_scaling is None:  # (_check_positions)
                raise_it += f" with {option('allow_long_context', True)}"
        else:
            default = f"kiln's default, at most {DEFAULT_MAX_SEQ_LEN}"
        raise ConfigError(f"{option('max_input_len', max_input_len)} exceeds max_seq_len "
                          f"{max_seq_len}, {default}; lower {option('max_input_len')}, or "
                          f"{raise_it}")
    limits = BuildLimits(max_batch_size=options.max_batch_size, max_input_len=max_input_len,
                         max_seq_len=max_seq_len, max_num_tokens=max_num_tokens)
    _check_positions(limits, decoder, options.allow_long_context)
    return limits


def canonical(options: BuildOptions, max_positions: int) -> BuildOptions:
    """``options`` with what builds the same engine as the defaults set back to them: each
    length given at the value its default resolves to (the build cache had made a second entry
    for ``max_seq_len=2048`` of a model whose default is 2048), and ``allow_long_context``
    where max_seq_len stays within the model's positions (it allows nothing there)."""
    names = ("max_seq_len", "max_input_len", "max_num_tokens")
    lengths = _lengths(options, max_positions)
    seq = lengths[0][0] or lengths[0][1]
    return replace(options, allow_long_context=options.allow_long_context and seq > max_positions,
                   **{name: None if given == default else given
                      for name, (given, default) in zip(names, lengths, strict=True)})


def _lengths(options: BuildOptions, max_positions: int) -> list[tuple[int | None, int]]:
    """(given, default) of max_seq_len, max_input_len and max_num_tokens; each default
    follows the lengths before it as resolved."""
    seq = options.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, max_positions)
    inp = options.max_input_len or min(DEFAULT_MAX_INPUT_LEN, seq)
    return [(options.max_seq_len, min(DEFAULT_MAX_SEQ_LEN, max_positions)),
            (options.max_input_len, min(DEFAULT_MAX_INPUT_LEN, seq)),
            (options.max_num_tokens, max(inp, options.max_batch_size))]


def _check_positions(limits: BuildLimits, decoder: DecoderConfig, allow: bool) -> None:
    limit = decoder.max_position_embeddings
    if limits.max_seq_len <= limit or decoder.rope_scaling is not None:
        return
    kind = "ALiBi" if decoder.position_type is PositionType.ALIBI else "RoPE without scaling"
    if not allow:
        raise ConfigError(f"max_seq_len {limits.max_seq_len} exceeds the model's "
                          f"max_position_embeddings {limit} ({kind}); lower "
                          f"{option('max_seq_len')} or pass {option('allow_long_context', True)} "
                          f"to build anyway")
    log.warning("max_seq_len %d exceeds max_position_embeddings %d (%s): outputs past position "
                "%d are untested by the model's training (%s)",
                limits.max_seq_len, limit, kind, limit, option("allow_long_context", True))
