"""The canonical decoder: one frozen config that describes Llama, Mistral, MPT and Falcon.

Every architecture kiln supports is one decoder-only transformer with switches. A converter
(``kiln/converters/<arch>.py``) translates an HF config into a :class:`DecoderConfig`; nothing
downstream of conversion knows which architecture it came from except through these fields.

Contract:
- Configs are immutable and validated on construction; an invalid one raises
  :class:`~kiln.errors.ConfigError` with a one-line message naming the field and the fix.
- Sizes are whole-model sizes. Tensor-parallel local sizes are derived by :class:`Mapping`,
  never stored.
- ``to_dict``/``from_dict`` give the JSON form stored in a kiln checkpoint's ``config.json``.

Non-goals: encoder-decoder models, MoE, learned absolute position embeddings.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kiln.errors import ConfigError, SettingRangeError, option


class NormType(str, Enum):
    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"


class PositionType(str, Enum):
    ROPE = "rope"
    ALIBI = "alibi"


class MlpType(str, Enum):
    SWIGLU = "swiglu"  # down(silu(gate(x)) * up(x))
    GELU = "gelu"  # down(gelu(up(x))), exact erf GELU


class ResidualType(str, Enum):
    SEQUENTIAL = "sequential"  # x += attn(norm1(x)); x += mlp(norm2(x))
    PARALLEL = "parallel"  # x += attn(norm1(x)) + mlp(norm1(x) or norm2(x))  (Falcon)


class RopeScalingType(str, Enum):
    LINEAR = "linear"
    DYNAMIC = "dynamic"
    LLAMA3 = "llama3"


DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as in HF's ``rope_scaling``/``rope_parameters`` (only the types listed)."""

    type: RopeScalingType
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3 only
    high_freq_factor: float | None = None  # llama3 only

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", _enum(RopeScalingType, self.type, "rope_scaling.type"))
        _require(self.factor > 0, "rope_scaling.factor", f"must be > 0, found {self.factor}")
        if self.type is RopeScalingType.LLAMA3:
            for name in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
                _require(getattr(self, name) is not None, f"rope_scaling.{name}",
                         "is required for rope type 'llama3'")


@dataclass(frozen=True)
class DecoderConfig:
    """Whole-model description of the canonical decoder (see the module docstring)."""

    architecture: str  # the HF architecture name it was converted from (provenance only)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_type: NormType = NormType.RMSNORM
    norm_eps: float = 1e-5
    norm_bias: bool = False
    position_type: PositionType = PositionType.ROPE
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Per-head additive ALiBi slopes, already multiplied by any factor the source model applies
    # to them (Falcon scales by 1/sqrt(head_dim)): score[h, i, j] += alibi_slopes[h] * j.
    alibi_slopes: tuple[float, ...] | None = None
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    sliding_window: int | None = None  # a query attends to keys at positions > pos - window
    clip_qkv: float | None = None  # clamp the fused QKV projection to [-clip, clip]
    qk_norm: bool = False  # a norm over the whole q and the whole k projection (MPT qk_ln)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_type: MlpType = MlpType.SWIGLU
    mlp_bias: bool = False
    residual: ResidualType = ResidualType.SEQUENTIAL
    parallel_norms: int = 1  # parallel residual only: 1 shared norm, or 2 (attn and mlp)
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name, enum in (("norm_type", NormType), ("position_type", PositionType),
                           ("mlp_type", MlpType), ("residual", ResidualType)):
            object.__setattr__(self, name, _enum(enum, getattr(self, name), name))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.alibi_slopes is not None:
            object.__setattr__(self, "alibi_slopes", tuple(float(s) for s in self.alibi_slopes))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name,
                     f"must be a positive integer, found {value!r}")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"must divide num_heads ({self.num_heads}), found {self.num_kv_heads}")
        _require(self.norm_eps > 0, "norm_eps", f"must be > 0, found {self.norm_eps}")
        self._check_positions()
        _require(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
                 f"must be a positive integer or null, found {self.sliding_window}")
        _require(self.clip_qkv is None or self.clip_qkv > 0, "clip_qkv",
                 f"must be > 0 or null, found {self.clip_qkv}")
        _require(self.parallel_norms in (1, 2), "parallel_norms",
                 f"must be 1 or 2, found {self.parallel_norms}")

    def _check_positions(self) -> None:
        if self.position_type is PositionType.ROPE:
            _require(self.rope_theta > 0, "rope_theta", f"must be > 0, found {self.rope_theta}")
            _require(self.head_dim % 2 == 0, "head_dim",
                     f"must be even for rotary embeddings, found {self.head_dim}")
            _require(self.alibi_slopes is None, "alibi_slopes", "must be null with rope")
        else:
            slopes = self.alibi_slopes
            _require(slopes is not None and len(slopes) == self.num_heads, "alibi_slopes",
                     f"needs one slope per head ({self.num_heads}), found "
                     f"{None if slopes is None else len(slopes)}")
            _require(self.rope_scaling is None, "rope_scaling", "must be null with alibi")

    # Derived sizes (whole model).
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        if self.attention_scale is not None:
            return self.attention_scale
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def gated_mlp(self) -> bool:
        return self.mlp_type is MlpType.SWIGLU

    @property
    def has_second_norm(self) -> bool:
        """Whether each layer has a second (pre-MLP) norm."""
        return self.residual is ResidualType.SEQUENTIAL or self.parallel_norms == 2

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, RopeScaling):
                value = {k: (v.value if isinstance(v, Enum) else v)
                         for k, v in dataclasses.asdict(value).items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"decoder config: unknown keys {unknown}; this kiln reads "
                              f"{sorted(known)} (was the checkpoint written by a newer kiln?)")
        return cls(**data)


@dataclass(frozen=True)
class Mapping:
    """How a model is split: ``tp_size`` tensor-parallel ranks times ``pp_size`` stages.

    Rank numbering: ``rank = pp_rank * tp_size + tp_rank`` (ranks of one stage are adjacent).
    """

    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tp_size", "pp_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name,
                     f"must be a positive integer, found {value!r}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(tp_rank, pp_rank) of a global rank."""
        return rank % self.tp_size, rank // self.tp_size

    def stage_layers(self, pp_rank: int, num_layers: int) -> range:
        """Layers of a pipeline stage: contiguous, earlier stages take the remainder."""
        base, rem = divmod(num_layers, self.pp_size)
        start = pp_rank * base + min(pp_rank, rem)
        return range(start, start + base + (1 if pp_rank < rem else 0))

    def validate_for(self, config: DecoderConfig, as_options: bool = False) -> None:
        """Raise ConfigError if this split does not fit the model (a tp_size error lists the
        sizes that fit: :func:`tp_sizes`). ``as_options``: the sizes are a user's options
        (conversion's), named as given (:func:`~kiln.errors.option`: ``kiln run --model_dir M
        --tp_size 2`` had been told of ``tp_size``), not a checkpoint's settings."""
        tp_name, pp_name = (option(n) if as_options else n for n in ("tp_size", "pp_size"))
        tp = self.tp_size
        fits = f"; this model allows {tp_name} {', '.join(map(str, tp_sizes(config)))}"
        problem = tp_problem(config, tp)
        _require(problem is None, tp_name, f"{problem}{fits}")
        _require(self.pp_size <= config.num_layers, pp_name,
                 f"{self.pp_size} exceeds the {config.num_layers} layers (a stage holds at "
                 f"least one); this model allows {pp_name} 1 to {config.num_layers}")

    # TP-local sizes, derived.
    def local_heads(self, config: DecoderConfig) -> int:
        return config.num_heads // self.tp_size

    def local_kv_heads(self, config: DecoderConfig) -> int:
        return max(1, config.num_kv_heads // self.tp_size)

    def local_intermediate(self, config: DecoderConfig) -> int:
        return config.intermediate_size // self.tp_size


def tp_problem(config: DecoderConfig, tp: int) -> str | None:
    """Why ``tp`` tensor-parallel ranks cannot split ``config`` (None: they can). The query
    heads and the MLP width split evenly; the KV heads split evenly when tp <= their count and
    are duplicated (each rank of a group holds a copy) when tp is a multiple of it."""
    if config.num_heads % tp:
        return f"{tp} does not divide the {config.num_heads} query heads"
    if config.intermediate_size % tp:
        return f"{tp} does not divide the MLP width {config.intermediate_size}"
    kv = config.num_kv_heads
    if (kv % tp if kv >= tp else tp % kv):
        return (f"{tp} and the {kv} KV heads must divide one another (KV heads are split when "
                f"tp_size <= {kv}, duplicated when it is a multiple)")
    if config.qk_norm and tp > 1:
        return f"{tp} > 1: qk_norm normalizes across all heads, so it needs tp_size 1"
    return None


def tp_sizes(config: DecoderConfig) -> tuple[int, ...]:
    """Every tp_size that splits ``config`` (divisors of the query heads that pass
    :func:`tp_problem`)."""
    return tuple(tp for tp in range(1, config.num_heads + 1) if tp_problem(config, tp) is None)


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise SettingRangeError(f"{name} {message}")


def _enum(enum: type[Enum], value: Any, name: str) -> Enum:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)
        raise ConfigError(f"{name} must be one of {choices}, found {value!r}") from None


def _hint(name: str, names: list[str]) -> str | None:
    """What an unknown keyword ``name`` may have meant among ``names``: the CLI's
    ``--<plugin>_plugin MODE`` is ``plugins={'<plugin>': MODE}`` in the API, else the closest
    name."""
    plugin, suffix, tail = name.rpartition("_plugin")
    if plugin and suffix and not tail and "plugins" in names:
        return f"{name}: the API takes plugins={{{plugin!r}: 'enable'|'disable'|'auto'}}"
    close = difflib.get_close_matches(name, names, n=1)
    return f"{name}: did you mean {close[0]}?" if close else None


def options_from(cls: type, given: dict[str, Any], caller: str, also: tuple[str, ...] = (),
                 **fixed: Any) -> Any:
    """``cls(**fixed, **given)`` for an options dataclass, with a :class:`ConfigError` naming
    any unknown keyword, the closest known name, and every name ``caller`` takes: the
    dataclass's fields but ``fixed``, and ``also`` (the caller's own keywords)."""
    known = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(given) - known)
    if unknown:
        names = sorted(known | set(also))
        hints = [hint for name in unknown if (hint := _hint(name, names))]
        guess = f" ({'; '.join(hints)})" if hints else ""
        raise ConfigError(f"{caller}() got unknown options {unknown}{guess}; it takes "
                          f"{', '.join(names)}")
    return cls(**fixed, **given)
