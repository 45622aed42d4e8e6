"""What a converter is, and the registry of them.

A converter holds all knowledge of one HF architecture family and nothing else:

- ``config_from_hf(hf)``: the HF ``config.json`` dict -> :class:`~kiln.config.DecoderConfig`.
- ``config_from_source(hf, shapes)``: the same, given the source tensors' shapes too; a
  converter overrides it only where HF's own code takes a size from the weights, not the config.
- ``tensor_rules(config)``: how each canonical role is made from HF tensors, as
  ``target <- [sources] + pure function`` (:class:`TensorRule`), with ``{layer}`` in names.
- ``ignored``: regular expressions of HF tensor names that are deliberately dropped.

The conversion engine (:mod:`kiln.converters.convert`) expands the rules per layer, checks
that every source tensor is used or ignored and every target produced, plans shapes without
reading data, and streams the tensors out.

A converter's errors name the config they read as :func:`config_name` says: the path of the
checkpoint's config.json where its reader says which (:func:`reading_config`), else
``config.json`` (an HF config dict given alone).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kiln.config import DecoderConfig, RopeScaling, RopeScalingType
from kiln.errors import ConfigError, UnsupportedArchitectureError
from kiln.roles import Role

Transform = Callable[..., torch.Tensor]
log = logging.getLogger(__name__)


# The config.json being converted, as messages name it (:func:`reading_config`).
_CONFIG_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("kiln_hf_config_name",
                                                                   default="config.json")


@contextlib.contextmanager
def reading_config(path: str | Path) -> Iterator[None]:
    """Converters called inside read the HF config of the file ``path``: their errors name it
    (``/models/x/config.json: hidden_size 100 is not a multiple ...``), where they had named
    "config.json" for a caller to rewrite with its path (and the build cache's reading of
    max_position_embeddings had named no path)."""
    token = _CONFIG_NAME.set(str(path))
    try:
        yield
    finally:
        _CONFIG_NAME.reset(token)


def config_name() -> str:
    """The HF config being read, as an error names it: its path inside
    :func:`reading_config`, else ``config.json``."""
    return _CONFIG_NAME.get()


def concat_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """Fuse projections along the output dim (``[q | k | v]``, ``[gate | up]``)."""
    return torch.cat(tensors, dim=0)


@dataclass(frozen=True)
class TensorRule:
    """``target <- transform(*sources)``; names may contain ``{layer}``.

    With no transform there must be exactly one source, copied as is.
    """

    target: Role
    sources: tuple[str, ...]
    transform: Transform | None = None

    def __post_init__(self) -> None:
        if self.transform is None and len(self.sources) != 1:
            raise ValueError(f"{self.target.name}: several sources need a transform")


class Converter:
    """Base class: subclass per architecture family and decorate with :func:`register`."""

    architectures: ClassVar[tuple[str, ...]] = ()
    ignored: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> DecoderConfig:
        raise NotImplementedError

    @classmethod
    def max_positions(cls, hf: dict[str, Any]) -> int:
        """The config's ``max_position_embeddings`` (what the build's default lengths follow),
        read alone: the build cache keys an engine by its resolved lengths."""
        return hf_get(hf, "max_position_embeddings")

    @classmethod
    def config_from_source(cls, hf: dict[str, Any],
                           shapes: Mapping[str, tuple[int, ...]]) -> DecoderConfig:
        """The config of a checkpoint whose tensors have ``shapes`` (name -> shape)."""
        return cls.config_from_hf(hf)

    @classmethod
    def tensor_rules(cls, config: DecoderConfig) -> list[TensorRule]:
        raise NotImplementedError

    @classmethod
    def ignored_patterns(cls, config: DecoderConfig) -> tuple[str, ...]:
        """Regexes (full match) of source tensors dropped on purpose."""
        return cls.ignored


_REGISTRY: dict[str, type[Converter]] = {}
# HF model_type -> the architecture transformers' AutoModelForCausalLM builds for it.
_MODEL_TYPES: dict[str, str] = {}


def register(*architectures: str, model_types: Mapping[str, str] | None = None
             ) -> Callable[[type[Converter]], type[Converter]]:
    """Class decorator: register a converter under one or more HF architecture names.

    ``model_types`` maps HF ``model_type`` values to one of ``architectures``: the class
    transformers builds for a config.json without ``architectures``.
    """
    model_types = dict(model_types or {})

    def wrap(cls: type[Converter]) -> type[Converter]:
        for name in architectures:
            if name in _REGISTRY:
                raise ValueError(f"architecture {name} registered twice")
            _REGISTRY[name] = cls
        for model_type, name in model_types.items():
            if name not in architectures or model_type in _MODEL_TYPES:
                raise ValueError(f"model_type {model_type}: {name} is not registered here, or "
                                 f"the model_type is registered twice")
            _MODEL_TYPES[model_type] = name
        cls.architectures = tuple(architectures)
        return cls

    return wrap


def supported_architectures() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def architecture_name(hf: dict[str, Any], where: str | None = None) -> str:
    """The registered HF architecture an HF config describes (``where``: the config as
    messages name it, default :func:`config_name`).

    The first registered name in ``architectures``; a config without ``architectures`` falls
    back to its ``model_type``, as transformers' ``AutoModelForCausalLM`` does.
    """
    _load_builtin()
    where = where or config_name()
    names = hf.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        example = names if isinstance(names, str) else "LlamaForCausalLM"
        raise ConfigError(f"{where}: architectures must be a list of class names, found "
                          f"{names!r}; write it as [\"{example}\"]")
    for name in names:
        if name in _REGISTRY:
            return name
    model_type = hf.get("model_type")
    if not names and model_type in _MODEL_TYPES:
        log.info("%s has no architectures; model_type %s means %s", where, model_type,
                 _MODEL_TYPES[model_type])
        return _MODEL_TYPES[model_type]
    found = ", ".join(map(str, names)) if names else f"<none> (model_type {model_type or '<none>'})"
    raise UnsupportedArchitectureError(
        f"{where}: architecture {found} is not supported; kiln converts "
        f"{', '.join(supported_architectures())} (or a config without architectures whose "
        f"model_type is {', '.join(sorted(_MODEL_TYPES))})")


def converter_for(hf: dict[str, Any], where: str | None = None) -> type[Converter]:
    """The converter for an HF config, from its ``architectures`` (or ``model_type``)."""
    return _REGISTRY[architecture_name(hf, where)]


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    from kiln.converters import falcon, llama, mpt  # noqa: F401


# HF config helpers, shared by the converters -------------------------------------------------

_MISSING = object()


# settings read through hf_get that must be positive integers, or positive numbers (a string "4"
# had made a traceback out of the arithmetic on it, 0 heads a ZeroDivisionError)
_INTEGERS = {"vocab_size", "hidden_size", "d_model", "n_embed", "num_attention_heads", "n_heads",
             "n_head", "num_key_value_heads", "num_kv_heads", "n_head_kv", "kv_n_heads",
             "num_hidden_layers", "n_layers", "n_layer", "intermediate_size", "ffn_hidden_size",
             "max_position_embeddings", "max_seq_len", "head_dim", "sliding_window",
             "original_max_position_embeddings"}
_NUMBERS = {"rms_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta", "expansion_ratio",
            "factor", "low_freq_factor", "high_freq_factor", "softmax_scale", "clip_qkv",
            "alibi_bias_max"}
# ... of which these may not be null: HF's config classes refuse it, or its code fails on None
_NOT_NULL = {"rms_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta"}


def hf_get(hf: dict[str, Any], *keys: str | Sequence[str], default: Any = _MISSING) -> Any:
    """First present, non-null value among alias keys; a key may be a path ``("a", "b")``.

    Resolves transformers v4/v5 and remote-code spellings of one setting in one place. A size
    that is not a positive integer (or an epsilon, theta, factor, scale or ratio that is not a
    positive, finite number) is a ConfigError naming the key, and so is an epsilon or theta
    given as null (HF refuses it; absent, the default applies).
    """
    null = None  # the first key present as null, of a setting that may not be
    for key in keys:
        value: Any = hf
        present = True
        for part in (key,) if isinstance(key, str) else key:
            present = isinstance(value, dict) and part in value
            value = value.get(part) if isinstance(value, dict) else None
        spelled = key if isinstance(key, str) else ".".join(key)
        if value is not None:
            _check_type(spelled, value)
            return value
        if present and null is None and spelled.rpartition(".")[2] in _NOT_NULL:
            null = spelled
    if null is not None:
        raise ConfigError(f"{config_name()}: {null} must be a positive number, found null; fix it "
                          f"in config.json (or remove it for the default)")
    if default is _MISSING:
        spelled = " / ".join(k if isinstance(k, str) else ".".join(k) for k in keys)
        raise ConfigError(f"{config_name()}: missing {spelled}; is this a complete HF config?")
    return default


def refuse_a_decode_only_window(hf: dict[str, Any], architecture: str, positions: int,
                                also: str = "") -> None:
    """A ``sliding_window`` on a model whose attention masks none (Llama, Falcon): transformers'
    cache still keeps only the last ``sliding_window`` positions when the config has one, so a
    prompt is read whole and decoding then sees a window. That is no single model: refused
    unless the window covers every position (a trial's Falcon with a window had converted
    without it, and its tokens left HF's at the second)."""
    window = hf_get(hf, "sliding_window", default=None)
    if window is not None and window < positions:
        raise ConfigError(
            f"{config_name()}: sliding_window {window} on {architecture}: transformers attends "
            f"to a whole prompt but decodes with only the last {window} positions cached, which "
            f"kiln does not copy; fix it in config.json: null for full attention"
            + (f", or {also}" if also else ""))


def hf_section(hf: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested settings object (``attn_config``, ``rope_scaling``): {} when absent or null, a
    ConfigError naming the key when not an object (``"attn_config": "x"`` had been a generic
    'wrong type' message naming no key)."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{config_name()}: {key} must be an object of settings ({{...}}), found "
                          f"{value!r}; fix it in config.json")
    return value


def _check_type(key: str, value: Any) -> None:
    name = key.rpartition(".")[2]
    if name in _INTEGERS:
        ok, what = isinstance(value, int) and value > 0, "a positive integer"
    elif name in _NUMBERS:
        ok, what = isinstance(value, (int, float)) and 0 < value < math.inf, "a positive number"
    else:
        return
    if not ok or isinstance(value, bool):
        raise ConfigError(f"{config_name()}: {key} must be {what}, found {value!r}; fix it in "
                          f"config.json")


def hf_flag(hf: dict[str, Any], key: str, default: bool, *, section: str = "") -> bool:
    """A true/false setting, read as HF's modeling code reads it (``if config.alibi:``).

    Absent: ``default``; null: false (the attribute is None). A value whose truth cannot be
    what its writer meant is a ConfigError naming the key: a string (``"false"`` is true to
    Python, so HF's Falcon runs ALiBi for it), a list, a number other than 0 or 1. ``section``
    prefixes the key in the message (``"attn_config."``).
    """
    if key not in hf:
        return default
    value = hf[key]
    if value is None:
        return False
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ConfigError(f"{config_name()}: {section}{key} must be true or false, found "
                      f"{value!r}; fix it in config.json")


_ROPE_TYPES = {"linear": RopeScalingType.LINEAR, "dynamic": RopeScalingType.DYNAMIC,
               "llama3": RopeScalingType.LLAMA3}


# Llama 3.1's rope scaling, named where a llama3 config lacks a setting.
_LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def rope_from_hf(hf: dict[str, Any], default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from ``rope_theta``/``rope_scaling`` (v4) or ``rope_parameters`` (v5)."""
    params = hf_section(hf, "rope_parameters")
    scaling = hf_section(hf, "rope_scaling")
    theta = float(hf_get(hf, ("rope_parameters", "rope_theta"), "rope_theta",
                         default=default_theta))
    # rope_scaling's type over rope_parameters', each spelled rope_type or (older) type: a
    # trial's {"type": "linear"} beside a default rope_parameters had converted unscaled
    kind = next((section[key] for section in (scaling, params) for key in ("rope_type", "type")
                 if section.get(key) is not None), "default")
    if kind == "default":
        return theta, None
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"{config_name()}: rope scaling type {kind!r} is not supported; kiln "
                          f"supports default, {', '.join(_ROPE_TYPES)}")
    section = "rope_scaling" if scaling else "rope_parameters"

    def get(key: str, default: Any = _MISSING) -> Any:  # rope_scaling's over rope_parameters'
        value = hf_get(hf, ("rope_scaling", key), ("rope_parameters", key), default=None)
        if value is None and default is _MISSING:  # transformers refuses the config too
            typical = f" (Llama 3.1's is {_LLAMA3[key]})" if kind == "llama3" else ""
            raise ConfigError(f"{config_name()}: {section} of rope type {kind!r} has no {key}; "
                              f"add it to {section}{typical}")
        return default if value is None else value

    optional = () if kind == "llama3" else (None,)  # llama3's frequency bands need them
    original = get("original_max_position_embeddings", *optional)
    if original is None and kind != "linear":
        original = hf_get(hf, "max_position_embeddings", default=None)
    return theta, RopeScaling(type=_ROPE_TYPES[kind], factor=float(get("factor")),
                              original_max_position_embeddings=original,
                              low_freq_factor=get("low_freq_factor", *optional),
                              high_freq_factor=get("high_freq_factor", *optional))


def unknown_keys(hf: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """HF keys a converter did not interpret, kept in ``DecoderConfig.extra`` for provenance."""
    generic = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
               "_name_or_path", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
               "use_cache", "initializer_range",
               "quantization_config"}  # read by kiln/converters/quantized.py, kept in its record
    return {k: v for k, v in sorted(hf.items()) if k not in known | generic}
