"""QuantizeOptions: what ``kiln quantize`` takes besides its two directories.

The one definition of the options, their defaults and help: the Python API
(:func:`kiln.quantize`) takes them by keyword and the CLI builds its flags from these fields.
Torch-free, so ``kiln quantize --help`` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from kiln.errors import ConfigError, check_counts, check_flags, option, shown
from kiln.quantization.config import FORMATS, GROUP_SIZES, KV_CACHE_DTYPES, Granularity

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CALIB_SEQ_LENGTH = 512  # tokens per sample, unless the model's context is shorter
SHORT_CALIB_SEQ_LENGTH = 64  # shorter samples are warned about (unless the context is shorter)
WEIGHT_SCALES = (Granularity.PER_TENSOR.value, Granularity.PER_CHANNEL.value)


@dataclass(frozen=True)
class QuantizeOptions:
    qformat: str = field(default="", metadata={
        "help": f"Quantization format: {', '.join(FORMATS)} (docs/quantization.md)."})
    kv_cache_dtype: str | None = field(default=None, metadata={
        "help": "Also calibrate KV-cache scales for an fp8 or int8 cache (needs "
                "--calib_dataset; only `kiln build --backend torch` builds it: onnx and tensorrt "
                "keep the cache in the model dtype)."})
    calib_dataset: str | None = field(default=None, metadata={
        "help": "Calibration text: a .txt, .jsonl (text key) or .parquet file, a directory, or a "
                "hub dataset id[:glob]. Required by fp8, int8_sq, int4_awq and "
                "--kv_cache_dtype."})
    calib_size: int = field(default=512, metadata={
        "help": "Calibration samples (each --calib_max_seq_length tokens)."})
    calib_max_seq_length: int | None = field(default=None, metadata={
        "help": f"Tokens per calibration (and evaluation) sample [default: "
                f"{DEFAULT_CALIB_SEQ_LENGTH}, or the model's max_position_embeddings where "
                f"that is smaller]."})
    smoothquant_alpha: float | None = field(default=None, metadata={
        "help": "int8_sq migration strength in [0, 1]; default: the architecture's (Llama 0.85, "
                "Mistral 0.8, Falcon 0.6, others 0.5)."})
    group_size: int | None = field(default=None, metadata={
        "help": f"int4 formats: input features per scale, one of "
                f"{', '.join(map(str, GROUP_SIZES))} (default 128)."})
    weight_scales: str | None = field(default=None, metadata={
        "help": "fp8 weight scales: per_tensor (default) or per_channel."})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "Text for the accuracy gate (same forms as --calib_dataset); default: held-out "
                "calibration text (a fifth of it) never used to calibrate."})
    max_ppl_ratio: float | None = field(default=None, metadata={
        "help": "Refuse (exit 2, nothing written) above this perplexity ratio quantized/source; "
                "default per qformat (docs/quantization.md)."})
    quantize_lm_head: bool = field(default=False, metadata={
        "help": "Weight-only formats: quantize the lm_head too (round to nearest at the "
                "format's granularity; the embedding stays as it is)."})
    no_accuracy_gate: bool = field(default=False, metadata={
        "help": "Measure and record accuracy, but never refuse."})
    device: str = field(default="auto", metadata={
        "help": "Where calibration runs: auto (cuda if available), cpu or cuda."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing --output_dir (only one kiln wrote)."})

    @property
    def calibrates(self) -> bool:
        """Whether these options calibrate from data: activation ranges (the qformat's) or
        KV-cache scales."""
        return FORMATS[self.qformat].needs_calibration or self.kv_cache_dtype is not None

    def __post_init__(self) -> None:
        check_flags(self, ConfigError)
        if self.qformat == "":  # the default: not given (the CLI requires --qformat)
            raise ConfigError(f"qformat is required: one of {', '.join(FORMATS)}")
        if self.qformat not in FORMATS:
            raise ConfigError(f"qformat must be one of {', '.join(FORMATS)}, found "
                              f"{shown(self.qformat)}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"found {self.kv_cache_dtype!r}")
        check_counts(self, ConfigError)  # None: the model's or the format's default
        for name in ("max_ppl_ratio", "smoothquant_alpha"):  # (the Python API: "0.5" had
            value = getattr(self, name)                     # been a TypeError traceback)
            if value is not None and (not isinstance(value, (int, float))
                                      or isinstance(value, bool)):
                raise ConfigError(f"{name} must be a number, found {value!r}")
        if self.calib_max_seq_length is not None and self.calib_max_seq_length < 2:
            raise ConfigError("calib_max_seq_length must be at least 2 (a token and its next)")
        if self.max_ppl_ratio is not None and not 1 <= self.max_ppl_ratio < math.inf:
            raise ConfigError(f"max_ppl_ratio must be a finite number >= 1 "
                              f"({option('no_accuracy_gate', True)} measures without refusing), "
                              f"found {self.max_ppl_ratio!r}")
        # what is missing comes before what is extra
        if self.calibrates and not self.calib_dataset:
            what = self.qformat if FORMATS[self.qformat].needs_calibration else \
                option("kv_cache_dtype", self.kv_cache_dtype)
            raise ConfigError(f"{what} needs calibration data: pass {option('calib_dataset')} "
                              f"(a .txt, .jsonl or .parquet file, or a hub dataset id)")
        if self.calib_dataset is None:  # settings of text that is not given do nothing
            if self.calib_size != _DEFAULTS["calib_size"] and self.eval_dataset is not None:
                # "give --calib_dataset" would be read by nothing (a retest followed it)
                raise ConfigError(f"{option('calib_size')} does nothing here: {self.qformat} "
                                  f"calibrates nothing, and {option('eval_dataset')} scores the "
                                  f"accuracy gate; leave {option('calib_size')} out")
            if self.calib_size != _DEFAULTS["calib_size"]:
                raise ConfigError(f"{option('calib_size')} needs {option('calib_dataset')}, "
                                  f"which is not given; give it, or leave "
                                  f"{option('calib_size')} out")
            # an --eval_dataset's samples have --calib_max_seq_length tokens, and the gate
            # measures held-out calibration text or it
            asked = [] if self.eval_dataset is not None else \
                [option(name) for name in ("calib_max_seq_length", "max_ppl_ratio")
                 if getattr(self, name) is not None]
            if asked:
                verb, them = ("needs", "it") if len(asked) == 1 else ("need", "them")
                raise ConfigError(f"{' and '.join(asked)} {verb} text: "
                                  f"{option('calib_dataset')} or {option('eval_dataset')}, and "
                                  f"neither is given; give one, or leave {them} out")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, found "
                              f"{self.device!r}")
        if self.weight_scales is not None and self.qformat != "fp8":
            raise ConfigError(f"{option('weight_scales')} applies to fp8 only (per_tensor or "
                              f"per_channel); {self.qformat} has "
                              f"{FORMATS[self.qformat].weight_scales[0].value}")
        if self.weight_scales is not None and self.weight_scales not in WEIGHT_SCALES:
            raise ConfigError(f"weight_scales must be one of {', '.join(WEIGHT_SCALES)}, found "
                              f"{self.weight_scales!r}")
        if self.group_size is not None and not self.qformat.startswith("int4"):
            raise ConfigError(f"{option('group_size')} applies to int4 formats only, not "
                              f"{self.qformat}")
        alpha = self.smoothquant_alpha
        if alpha is not None and self.qformat != "int8_sq":
            raise ConfigError(f"{option('smoothquant_alpha')} applies to int8_sq only, in [0, 1]; "
                              f"found {alpha!r} for {self.qformat}")
        if alpha is not None and not 0 <= alpha <= 1:
            raise ConfigError(f"smoothquant_alpha must be in [0, 1], found {alpha!r}")


_DEFAULTS = {f.name: f.default for f in fields(QuantizeOptions)}
