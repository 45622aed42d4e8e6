"""What a quantized kiln checkpoint records: :class:`QuantConfig`, the ``quantization`` key of
its ``config.json`` (docs/checkpoint.md, "Quantization"). Torch-free, so ``--help`` paths and the
engine manifest read it without importing torch.

A format (``qformat``) is a named preset with TensorRT-LLM / ModelOpt names; its numerics live in
:mod:`kiln.quantization.formats`. Which tensors a quantized checkpoint holds besides the
unquantized ones (scales, smoothing vectors) is decided here, by :func:`companion_names`.

Non-goals: asymmetric (zero-point) formats: TensorRT rejects asymmetric INT4 (TENSORRT_NOTES.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from kiln.errors import ConfigError


class Granularity(str, Enum):
    """How many scales a weight has: one, one per output channel, or one per group of
    ``group_size`` input features of each output channel."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


@dataclass(frozen=True)
class FormatInfo:
    """The torch-free facts of a qformat (its numerics: kiln.quantization.formats)."""

    name: str
    weight_dtype: str  # "float8_e4m3fn" | "int8" | "int4"
    weight_scales: tuple[Granularity, ...]  # allowed; the first is the default
    activation_dtype: str | None  # static per-tensor activation quantization, or None (weight-only)
    smoothing: bool  # per-input-channel smoothing (SmoothQuant, AWQ)
    needs_calibration: bool
    min_capability: int  # lowest GPU compute capability (x10) whose TensorRT builds it
    max_ppl_ratio: float  # default accuracy gate (docs/quantization.md: the measurements)
    description: str


FORMATS: dict[str, FormatInfo] = {f.name: f for f in (
    FormatInfo("fp8", "float8_e4m3fn", (Granularity.PER_TENSOR, Granularity.PER_CHANNEL),
               "float8_e4m3fn", False, True, 89, 1.05,
               "FP8 W8A8 (e4m3): per-tensor or per-channel weight scales, static per-tensor "
               "activation scales from calibration"),
    FormatInfo("int8_sq", "int8", (Granularity.PER_CHANNEL,), "int8", True, True, 75, 1.08,
               "INT8 SmoothQuant W8A8: smoothing folded into the preceding norm (else a "
               "pre_quant_scale), per-channel weights, static per-tensor activations"),
    FormatInfo("int8_wo", "int8", (Granularity.PER_CHANNEL,), None, False, False, 75, 1.01,
               "INT8 weight-only (W8A16), per-channel scales"),
    # int4: TensorRT-RTX compiles no int4 for sm75 ("HW-specific datatypes: int4", retest 48)
    FormatInfo("int4_wo", "int4", (Granularity.PER_GROUP,), None, False, False, 80, 1.35,
               "INT4 weight-only (W4A16), symmetric, groups of group_size input features"),
    FormatInfo("int4_awq", "int4", (Granularity.PER_GROUP,), None, True, True, 80, 1.25,
               "INT4 AWQ: activation-aware per-channel scale search, then symmetric group INT4"),
)}
KV_CACHE_DTYPES = ("fp8", "int8")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128

# Companion tensors of a quantized linear weight ``<prefix>.weight`` (ModelOpt's names).
WEIGHT_SCALE, INPUT_SCALE, PRE_QUANT_SCALE = "weight_scale", "input_scale", "pre_quant_scale"
KV_SCALES = ("k_scale", "v_scale")  # ``layers.{i}.attn.k_scale``: scalar KV-cache scales


@dataclass(frozen=True)
class QuantConfig:
    """The ``quantization`` key of a quantized checkpoint's config.json (None: unquantized)."""

    qformat: str
    group_size: int | None = None  # per_group formats only
    weight_scales: Granularity | None = None  # default: the format's first
    kv_cache_dtype: str | None = None
    smoothquant_alpha: float | None = None  # int8_sq only
    pre_quant_scales: tuple[str, ...] = ()  # canonical weight roles carrying a pre_quant_scale
    quantize_lm_head: bool = False  # weight-only formats: lm_head in the weight format too
    calibration: dict[str, Any] | None = None  # dataset, sha256, samples, seq_length
    accuracy: dict[str, Any] | None = None  # the gate's measurements, or None if not measured
    source_format: str = "kiln"  # kiln | modelopt | compressed-tensors (imported checkpoints)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        info = FORMATS.get(self.qformat)
        if info is None:
            raise ConfigError(f"qformat must be one of {', '.join(FORMATS)}, found "
                              f"{self.qformat!r}")
        scales = Granularity(self.weight_scales) if self.weight_scales else info.weight_scales[0]
        if scales not in info.weight_scales:
            raise ConfigError(f"{self.qformat} weights take {_names(info.weight_scales)} "
                              f"scales, found {scales.value!r}")
        object.__setattr__(self, "weight_scales", scales)
        if scales is Granularity.PER_GROUP:
            group = DEFAULT_GROUP_SIZE if self.group_size is None else self.group_size
            if group not in GROUP_SIZES:
                raise ConfigError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                                  f"found {group!r}")
            object.__setattr__(self, "group_size", group)
        elif self.group_size is not None:
            raise ConfigError(f"group_size applies to int4 formats only, not {self.qformat}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"found {self.kv_cache_dtype!r}")
        alpha = self.smoothquant_alpha
        if alpha is not None and (self.qformat != "int8_sq" or not 0 <= alpha <= 1):
            raise ConfigError(f"smoothquant_alpha applies to int8_sq only, in [0, 1]; found "
                              f"{alpha!r} for {self.qformat}")
        object.__setattr__(self, "pre_quant_scales", tuple(self.pre_quant_scales))
        if self.quantize_lm_head and info.activation_dtype is not None:
            raise ConfigError(f"quantize_lm_head applies to weight-only formats (int8_wo, "
                              f"int4_wo, int4_awq), not {self.qformat}")

    @property
    def info(self) -> FormatInfo:
        return FORMATS[self.qformat]

    @property
    def activation_dtype(self) -> str | None:
        return self.info.activation_dtype

    def with_(self, **changes: Any) -> QuantConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weight_scales"] = self.weight_scales.value
        data["weight_dtype"] = self.info.weight_dtype  # for readers; derived from qformat
        data["activation_dtype"] = self.info.activation_dtype
        data["pre_quant_scales"] = list(self.pre_quant_scales)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> QuantConfig | None:
        """None for an unquantized checkpoint (``null``, or format 1's ``{"scheme": null}``)."""
        if data is None or data == {"scheme": None}:
            return None
        if not isinstance(data, dict) or "qformat" not in data:
            raise ConfigError(f"quantization must be null or an object with a qformat, found "
                              f"{data!r}")
        derived = {"weight_dtype", "activation_dtype"}  # written for readers, implied by qformat
        unknown = sorted(set(data) - set(cls.__dataclass_fields__) - derived)
        if unknown:
            raise ConfigError(f"quantization has unknown keys {unknown}; written by a newer "
                              f"kiln? re-quantize with this one")
        return cls(**{k: v for k, v in data.items() if k not in derived})


def _names(values) -> str:
    return " or ".join(v.value for v in values)


def quant_dict(quant: QuantConfig | None) -> dict[str, Any] | None:
    return None if quant is None else quant.to_dict()


def slow_on_onnx_cpu(quant: QuantConfig | None, int8_compute: bool) -> str | None:
    """Why an onnx engine of ``quant`` runs slower on a CPU than a float32 engine, or None:
    ONNX Runtime's float path of 8-bit MatMulNBits and its FP8 Q/DQ are unoptimized kernels
    (SmolLM2 on 2 cores, batch 1: int8_wo 7.8 and fp8 5.3 tok/s against float32's 55; int4
    formats, int8_sq and int8_wo with int8 compute 79-89). Said by the build and the load."""
    if quant is None:
        return None
    if quant.qformat == "int8_wo" and not int8_compute:
        return ("int8_wo on ONNX Runtime's CPU runs 8-bit MatMulNBits in float32, several "
                "times slower than a float32 engine; for speed use int4_awq / int8_sq, or "
                "build with --weight_only_int8_compute (int8 activation blocks: fast, but no "
                "longer the numerics the accuracy gate measured: check it with kiln eval and a "
                "few prompts)")
    if quant.qformat == "fp8":
        return ("fp8 on ONNX Runtime's CPU runs Q/DQ around float kernels, for numerics: "
                "several times slower than a float32 engine; FP8 speed needs a GPU (tensorrt "
                "sm89+)")
    return None
