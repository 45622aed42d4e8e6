"""Importing Hugging Face checkpoints that are already quantized: FP8 in NVIDIA ModelOpt's and
in compressed-tensors' (llm-compressor) formats, into kiln's ``fp8`` format (docs/checkpoint.md,
"Importing quantized Hugging Face checkpoints").

Contract: :func:`import_quantization` reads the source's quantization record (config.json's
``quantization_config``, ModelOpt's ``hf_quant_config.json``) and its scale tensors (small: read
while planning) and returns an :class:`ImportedQuant`: the checkpoint's QuantConfig and one
TensorRule per companion tensor (``(role, kind)``). The FP8 weights are copied byte for byte,
fused by row concatenation like float weights. Every other quantization is refused by name.

Source layouts (HF names of a Llama linear ``L``, attention ``A``):

- ModelOpt (``export_hf_checkpoint``, ``quant_algo: FP8``): ``L.weight`` float8_e4m3fn,
  ``L.weight_scale`` and ``L.input_scale`` float32 scalars, ``A.k_proj.k_scale`` and
  ``A.v_proj.v_scale`` (``kv_cache_quant_algo: FP8``).
- compressed-tensors (``format: float-quantized`` or ``naive-quantized``, FP8 weights with
  ``strategy: tensor`` or ``channel``, static per-tensor input activations): ``L.weight``
  float8_e4m3fn, ``L.weight_scale`` [1] or [out, 1] and ``L.input_scale`` [1] in the model
  dtype, ``A.k_scale`` / ``A.v_scale`` [1] (``kv_cache_scheme``).

Both mean what kiln's fp8 means: ``w = weight * weight_scale``, ``x -> fp8(x / input_scale)``,
``k -> fp8(k / k_scale)`` after the rotary embedding.

Fusion: kiln fuses q/k/v (gate/up) into one weight. Parts whose per-tensor scales differ get
a per-channel fused scale (each row its part's scale): exact, no requantization. When every
fused group shares one scale the checkpoint stays per-tensor. Per-channel anywhere makes the
whole checkpoint per-channel (QuantConfig has one granularity; a scalar expanded to rows is
exact). Input scales of fused parts quantize one activation, so one quantizer must serve them:
if they differ the largest is kept (no clipping), logged at INFO.

Non-goals: requantization, dynamic (per-token) activation scales, block-wise or grouped FP8,
integer formats (those come from ``kiln quantize`` on the unquantized model).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kiln.config import DecoderConfig
from kiln.converters.base import Converter, TensorRule, concat_rows
from kiln.converters.source import HF_QUANT_CONFIG, Source
from kiln.errors import (
    UNREADABLE_JSON,
    USER_TEXT,
    CheckpointError,
    ConfigError,
    TensorMappingError,
)
from kiln.quantization.config import (
    INPUT_SCALE,
    KV_SCALES,
    WEIGHT_SCALE,
    Granularity,
    QuantConfig,
)
from kiln.roles import QUANTIZED_ROLES, Role, roles_for

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
MODELOPT, COMPRESSED_TENSORS = "modelopt", "compressed-tensors"
CT_FORMATS = ("float-quantized", "naive-quantized")  # FP8 values stored as float8_e4m3fn
FIX = "convert the unquantized model and use kiln quantize"
FIX_FP8 = "convert the unquantized model and use kiln quantize --qformat fp8 (it calibrates static scales)"
_DETAIL_KEYS = ("quant_algo", "bits", "group_size", "weight_block_size", "activation_scheme",
                "format", "version", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type")


@dataclass(frozen=True)
class SourceScheme:
    """The source's quantization record, checked to be static FP8 in a format kiln imports."""

    method: str  # MODELOPT | COMPRESSED_TENSORS
    kv_cache: bool
    excluded: tuple[str, ...]  # the source's ignore / exclude_modules (quoted in errors)
    record: dict[str, Any]  # provenance, kept in QuantConfig.extra


@dataclass(frozen=True)
class ImportedQuant:
    """An imported FP8 checkpoint: its QuantConfig and the rules of its companion tensors."""

    config: QuantConfig
    rules: dict[tuple[Role, str], TensorRule]


def refused(method: str, details: str, why: str = "kiln imports FP8 checkpoints in ModelOpt or "
            "compressed-tensors format only", fix: str = FIX) -> ConfigError:
    return ConfigError(f"HF checkpoint quantized with {method} ({details}): {why}; {fix}")


def read_scheme(source: Source) -> SourceScheme | None:
    """The source's quantization record (None: not quantized); refuses all but static FP8."""
    qc = source.hf_config.get("quantization_config")
    path = source.directory / HF_QUANT_CONFIG
    hqc = _read_json(path) if path.is_file() else None
    if qc is None and hqc is None:
        return None
    if not isinstance(qc or {}, dict):
        raise ConfigError(f"{source.directory}/config.json: quantization_config must be an "
                          f"object, found {qc!r}; fix config.json")
    qc = qc or {}
    method = str(qc.get("quant_method") or (MODELOPT if hqc is not None else "")).lower()
    if method == MODELOPT:
        return _modelopt_scheme(qc, hqc)
    if method == COMPRESSED_TENSORS:
        return _ct_scheme(qc)
    details = ", ".join(f"{k} {qc[k]}" for k in _DETAIL_KEYS if qc.get(k) is not None)
    raise refused(method or "an unnamed quant_method", details or "no details")


def _read_json(path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(USER_TEXT))
    except (OSError, *UNREADABLE_JSON) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object; re-download the checkpoint")
    return data


def _modelopt_scheme(qc: dict[str, Any], hqc: dict[str, Any] | None) -> SourceScheme:
    """ModelOpt: ``hf_quant_config.json`` {producer, quantization: {quant_algo,
    kv_cache_quant_algo, exclude_modules}} and/or config.json's flat quantization_config
    (quant_algo, kv_cache_quant_algo or kv_cache_scheme, exclude_modules or ignore)."""
    section = (hqc or {}).get("quantization") or {}
    algos = {a for a in (section.get("quant_algo"), qc.get("quant_algo")) if a is not None}
    if len(algos) > 1:
        raise ConfigError(f"ModelOpt checkpoint: {HF_QUANT_CONFIG} and config.json disagree on "
                          f"quant_algo ({' vs '.join(sorted(map(str, algos)))}); fix the files")
    algo = next(iter(algos), None)
    kv = section.get("kv_cache_quant_algo", qc.get("kv_cache_quant_algo"))
    if kv is None and qc.get("kv_cache_scheme") is not None:
        scheme = qc["kv_cache_scheme"]
        kv = "FP8" if isinstance(scheme, dict) and _static_fp8(scheme) else str(scheme)
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        raise refused(MODELOPT, f"quant_algo {algo}", "kiln's fp8 format has static per-tensor "
                      "activation scales only, not dynamic per-token ones", FIX_FP8)
    if algo != "FP8":
        raise refused(MODELOPT, f"quant_algo {algo}")
    if kv not in (None, "FP8"):
        raise refused(MODELOPT, f"quant_algo FP8, kv_cache_quant_algo {kv}",
                      "kiln imports an FP8 KV cache only")
    excluded = section.get("exclude_modules") or qc.get("exclude_modules") or qc.get("ignore")
    record = {"quantization_config": qc} if qc else {}
    if hqc is not None:
        record[HF_QUANT_CONFIG] = hqc
    return SourceScheme(MODELOPT, kv == "FP8", tuple(excluded or ()), record)


def _ct_scheme(qc: dict[str, Any]) -> SourceScheme:
    """compressed-tensors: every config group FP8 weights (tensor or channel) with static
    per-tensor FP8 input activations, stored float-quantized; an optional FP8 kv_cache_scheme."""
    groups = qc.get("config_groups") or {}
    if not groups:
        raise refused(COMPRESSED_TENSORS, f"format {qc.get('format')}, no config_groups")
    for group in groups.values():
        _check_ct_group(group, group.get("format") or qc.get("format"))
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise refused(COMPRESSED_TENSORS, f"sparsity {sparsity.get('format')}")
    if qc.get("transform_config"):
        raise refused(COMPRESSED_TENSORS, "transform_config (rotations)")
    kv = qc.get("kv_cache_scheme")
    if kv is not None and not _static_fp8(kv):
        raise refused(COMPRESSED_TENSORS, f"kv_cache_scheme {_describe(kv)}",
                      "kiln imports a static per-tensor FP8 KV cache only")
    return SourceScheme(COMPRESSED_TENSORS, kv is not None, tuple(qc.get("ignore") or ()),
                        {"quantization_config": qc})


def _check_ct_group(group: dict[str, Any], fmt: str | None) -> None:
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    details = (f"{_describe(weights)} weights, "
               f"{_describe(acts) + ' activations' if acts else 'no activation quantization'}, "
               f"format {fmt}")
    fp8_weights = (_is_fp8(weights) and weights.get("strategy") in ("tensor", "channel")
                   and not weights.get("dynamic"))
    if _is_fp8(weights) and weights.get("strategy") in ("block", "group"):
        raise refused(COMPRESSED_TENSORS, details, f"kiln's fp8 format has per-tensor or "
                      f"per-channel weight scales, not {weights.get('strategy')}-wise ones")
    if not fp8_weights or fmt not in CT_FORMATS or group.get("output_activations"):
        raise refused(COMPRESSED_TENSORS, details)
    if acts is None:
        raise refused(COMPRESSED_TENSORS, details, "kiln's fp8 format needs static per-tensor "
                      "activation scales (input_scale) and this checkpoint has none", FIX_FP8)
    if acts.get("dynamic", False) is not False:
        raise refused(COMPRESSED_TENSORS, details, "kiln's fp8 format has static per-tensor "
                      "activation scales only, not dynamic ones", FIX_FP8)
    if not _static_fp8(acts):
        raise refused(COMPRESSED_TENSORS, details)


def _is_fp8(args: dict[str, Any]) -> bool:
    return (args.get("type") == "float" and args.get("num_bits") == 8
            and args.get("symmetric", True) is not False and not args.get("group_size")
            and not args.get("block_structure"))


def _static_fp8(args: dict[str, Any]) -> bool:
    """Static symmetric FP8, one scale per tensor (compressed-tensors' QuantizationArgs)."""
    return (isinstance(args, dict) and _is_fp8(args) and args.get("dynamic", False) is False
            and args.get("strategy", "tensor") == "tensor")


def _describe(args: Any) -> str:
    """``float8 (channel)``, ``dynamic int8 (token)``, ``int4 (group 128)``: a QuantizationArgs."""
    if not isinstance(args, dict):
        return str(args)
    kind = {"float": "float", "int": "int"}.get(args.get("type"), str(args.get("type")))
    strategy = args.get("strategy") or "tensor"
    if args.get("group_size"):
        strategy += f" {args['group_size']}"
    dynamic = "dynamic " if args.get("dynamic") else ""
    return f"{dynamic}{kind}{args.get('num_bits')} ({strategy})"


def refuse_unrecorded_fp8(source: Source) -> None:
    """A checkpoint with FP8 tensors but no quantization record: the scales are unknown."""
    for name in sorted(source.tensors):
        if source.tensors[name].dtype in FLOAT8:
            raise CheckpointError(
                f"{source.directory}: {name} is {str(source.tensors[name].dtype)[6:]} but "
                f"config.json has no quantization_config (nor {HF_QUANT_CONFIG}), so its scales "
                f"are unknown and it cannot be dequantized; use the checkpoint's complete files "
                f"or the unquantized model")


def import_quantization(source: Source, converter: type[Converter],
                        config: DecoderConfig) -> ImportedQuant | None:
    """The imported QuantConfig and companion rules of an FP8 source (None: not quantized)."""
    scheme = read_scheme(source)
    if scheme is None:
        refuse_unrecorded_fp8(source)
        return None
    rules = {rule.target: rule for rule in converter.tensor_rules(config)}
    linears = {role: rules[role] for role in QUANTIZED_ROLES if role in roles_for(config)}
    _refuse_other_fp8(source, config, linears)
    survey = _Survey(source, scheme)
    for layer in range(config.num_layers):
        for role, rule in linears.items():
            survey.add(role, layer, [s.format(layer=layer) for s in rule.sources])
    survey.log_input_scales()
    granularity = Granularity.PER_CHANNEL if survey.per_channel else Granularity.PER_TENSOR
    companions = {}
    for role, rule in linears.items():
        prefixes = [_prefix(s) for s in rule.sources]
        if survey.per_channel and survey.channel_roles.get(role) and \
                rule.transform not in (None, concat_rows):
            raise ConfigError(f"{rule.sources[0]}: per-channel FP8 scales of a weight kiln "
                              f"reorders ({rule.transform.__name__}) are not imported; {FIX}")
        weight_fn = _row_scales(survey.rows[role]) if survey.per_channel else _shared_scale
        companions[role, WEIGHT_SCALE] = TensorRule(
            role, tuple(f"{p}.{WEIGHT_SCALE}" for p in prefixes), weight_fn)
        companions[role, INPUT_SCALE] = TensorRule(
            role, tuple(f"{p}.{INPUT_SCALE}" for p in prefixes), _largest_scale)
    if scheme.kv_cache:
        for kind, name in zip(KV_SCALES, _kv_scale_sources(scheme, rules[Role.QKV]), strict=True):
            companions[Role.QKV, kind] = TensorRule(Role.QKV, (name,), _scalar_scale)
    quant = QuantConfig(qformat="fp8", weight_scales=granularity,
                        kv_cache_dtype="fp8" if scheme.kv_cache else None,
                        source_format=scheme.method, calibration=None, accuracy=None,
                        extra={"source_quantization": scheme.record})
    log.info("importing %s FP8 checkpoint: %s weight scales, KV cache %s", scheme.method,
             granularity.value, quant.kv_cache_dtype or "unquantized")
    return ImportedQuant(quant, companions)


def _prefix(source_name: str) -> str:
    """``model.layers.{layer}.mlp.down_proj.weight`` -> ``model.layers.{layer}.mlp.down_proj``."""
    if not source_name.endswith(".weight"):
        raise TensorMappingError(f"{source_name}: a quantized weight's source must end in "
                                 f".weight (a kiln bug)")
    return source_name.removesuffix(".weight")


def _kv_scale_sources(scheme: SourceScheme, qkv: TensorRule) -> tuple[str, str]:
    """HF names of a layer's k and v cache scales: ModelOpt hangs them on k_proj / v_proj
    (``k_proj.k_scale``), compressed-tensors on the attention module (``self_attn.k_scale``)."""
    prefixes = [_prefix(s) for s in qkv.sources]
    if scheme.method == MODELOPT and len(prefixes) == 3:
        return f"{prefixes[1]}.k_scale", f"{prefixes[2]}.v_scale"
    attention = prefixes[0].rsplit(".", 1)[0]
    return f"{attention}.k_scale", f"{attention}.v_scale"


def _refuse_other_fp8(source: Source, config: DecoderConfig, linears: dict[Role, TensorRule]) -> None:
    """FP8 tensors outside the decoder's linears (lm_head, the embedding): kiln keeps those
    in the model dtype, and dequantizing them here would be a silent change."""
    weights = {s.format(layer=i) for rule in linears.values() for s in rule.sources
               for i in range(config.num_layers)}
    for name in sorted(source.tensors):
        if source.tensors[name].dtype in FLOAT8 and name not in weights:
            raise ConfigError(f"{name} is FP8 in the source: kiln's fp8 format quantizes only "
                              f"the decoder layers' linears and keeps the embedding and lm_head "
                              f"in the model dtype; {FIX}")


def _shared_scale(*scales: torch.Tensor) -> torch.Tensor:
    """One per-tensor scale for the fused weight (every part has it: checked when planning)."""
    return scales[0].float().reshape(())


def _largest_scale(*scales: torch.Tensor) -> torch.Tensor:
    """The fused input scale: the largest part's (equal parts give that value exactly)."""
    return torch.stack([s.float().reshape(()) for s in scales]).amax()


def _scalar_scale(scale: torch.Tensor) -> torch.Tensor:
    """A KV-cache scale ([] or [1]) as kiln's scalar."""
    return scale.float().reshape(())


def _row_scales(rows: tuple[int, ...]) -> Callable[..., torch.Tensor]:
    """Per-row scales [sum(rows)] of a fused weight: a part's scalar repeated over its rows,
    a per-channel part's [rows] or [rows, 1] as it is."""
    def row_scales(*scales: torch.Tensor) -> torch.Tensor:
        return torch.cat([s.float().reshape(-1).expand(n) for s, n in zip(scales, rows, strict=True)])
    return row_scales


class _Survey:
    """Reads and checks every linear's scales once, to pick the granularity."""

    def __init__(self, source: Source, scheme: SourceScheme):
        self.source, self.scheme = source, scheme
        self.per_channel = False
        self.rows: dict[Role, tuple[int, ...]] = {}
        self.channel_roles: dict[Role, bool] = {}
        self.input_spread: list[tuple[str, float]] = []  # (layer/role, largest/smallest)

    def add(self, role: Role, layer: int, weights: list[str]) -> None:
        rows, scales = [], []
        for weight in weights:
            tensor = self._fp8_weight(weight)
            rows.append(tensor.shape[0])
            scales.append(self._scale(weight, WEIGHT_SCALE, tensor.shape[0]))
        self.rows[role] = tuple(rows)
        channel = any(s.numel() > 1 for s in scales)
        self.channel_roles[role] = self.channel_roles.get(role, False) or channel
        self.per_channel |= channel or len({float(s) for s in scales}) > 1
        inputs = [float(self._scale(w, INPUT_SCALE, None)) for w in weights]
        if len(set(inputs)) > 1:
            self.input_spread.append((role.name(layer), max(inputs) / min(inputs)))

    def log_input_scales(self) -> None:
        if self.input_spread:
            where, ratio = max(self.input_spread, key=lambda x: x[1])
            log.info("%d fused linears have parts with different input scales (largest ratio "
                     "%.4g, %s); the parts read one activation, which kiln quantizes once, so "
                     "each takes its parts' largest scale", len(self.input_spread), ratio, where)

    def _fp8_weight(self, name: str):
        tensor = self.source.tensors.get(name)
        if tensor is None:
            raise TensorMappingError(f"{self.source.directory}: {name} is missing; re-download "
                                     f"the checkpoint")
        if tensor.dtype is not FP8:
            layer = name.removesuffix(".weight")
            listed = [str(e) for e in self.scheme.excluded][:6]
            raise ConfigError(f"{layer} is {str(tensor.dtype)[6:]}, not FP8 e4m3, while other "
                              f"linears are (the source left it out; its ignore list: {listed}): "
                              f"kiln's fp8 format quantizes every decoder linear in e4m3; {FIX}")
        return tensor

    def _scale(self, weight: str, kind: str, rows: int | None) -> torch.Tensor:
        """A validated scale: present, floating, finite and positive; one value, or (weight
        scales) one per output row, as [rows] or [rows, 1]."""
        name = f"{weight.removesuffix('.weight')}.{kind}"
        tensor = self.source.tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"{self.source.directory}: {weight} is FP8 but {name} is "
                                  f"missing; FP8 values mean nothing without their scale: "
                                  f"re-download the checkpoint")
        shape = tuple(tensor.shape)
        per_channel = rows is not None and shape in ((rows,), (rows, 1)) and rows > 1
        if not (per_channel or tensor.dtype.is_floating_point and _numel(shape) == 1):
            what = "one value or one per output row" if rows is not None else "one value " \
                "(static per-tensor activation scale)"
            raise ConfigError(f"{name} has shape {list(shape)}, {str(tensor.dtype)[6:]}; kiln "
                              f"imports FP8 scales of {what} only; {FIX}")
        value = tensor.read().float()
        if not bool(torch.isfinite(value).all() & (value > 0).all()):
            raise CheckpointError(f"{self.source.directory}: {name} holds a scale that is not a "
                                  f"finite positive number; the checkpoint is corrupt: "
                                  f"re-download it")
        return value


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
