"""Canonical tensor roles of the decoder, and how each one is sharded.

A role is one named tensor of the canonical decoder. Its canonical name (``Role.value``) is
what kiln checkpoints store; per-layer names carry a ``{layer}`` placeholder filled with the
*global* layer index. Weights keep the ``[out_features, in_features]`` layout of
``torch.nn.Linear``.

Fused tensors, and the segments the sharder splits one by one:

- ``layers.{i}.attn.qkv.weight``: ``[q | k | v]`` rows, ``q_size + 2 * kv_size``.
- ``layers.{i}.mlp.gate_up.weight`` (SwiGLU): ``[gate | up]`` rows, ``2 * intermediate``.

Sharding is declared here per role (:data:`SHARDING`) and applied by the generic sharder in
:mod:`kiln.sharding`; no other module decides how a tensor is split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from kiln.config import DecoderConfig, MlpType, NormType
from kiln.errors import listed
from kiln.quantization.config import (
    INPUT_SCALE,
    KV_SCALES,
    PRE_QUANT_SCALE,
    WEIGHT_SCALE,
    Granularity,
    QuantConfig,
)


class Role(str, Enum):
    EMBED = "embed.weight"
    ATTN_NORM = "layers.{layer}.attn_norm.weight"
    ATTN_NORM_BIAS = "layers.{layer}.attn_norm.bias"
    QKV = "layers.{layer}.attn.qkv.weight"
    QKV_BIAS = "layers.{layer}.attn.qkv.bias"
    Q_NORM = "layers.{layer}.attn.q_norm.weight"
    Q_NORM_BIAS = "layers.{layer}.attn.q_norm.bias"
    K_NORM = "layers.{layer}.attn.k_norm.weight"
    K_NORM_BIAS = "layers.{layer}.attn.k_norm.bias"
    OUT = "layers.{layer}.attn.o.weight"
    OUT_BIAS = "layers.{layer}.attn.o.bias"
    MLP_NORM = "layers.{layer}.mlp_norm.weight"
    MLP_NORM_BIAS = "layers.{layer}.mlp_norm.bias"
    GATE_UP = "layers.{layer}.mlp.gate_up.weight"
    GATE_UP_BIAS = "layers.{layer}.mlp.gate_up.bias"
    UP = "layers.{layer}.mlp.up.weight"
    UP_BIAS = "layers.{layer}.mlp.up.bias"
    DOWN = "layers.{layer}.mlp.down.weight"
    DOWN_BIAS = "layers.{layer}.mlp.down.bias"
    FINAL_NORM = "final_norm.weight"
    FINAL_NORM_BIAS = "final_norm.bias"
    LM_HEAD = "lm_head.weight"

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.value

    def name(self, layer: int | None = None) -> str:
        """The canonical tensor name (``layer`` is required for per-layer roles)."""
        if self.per_layer:
            if layer is None:
                raise ValueError(f"role {self._name_} needs a layer index")
            return self.value.format(layer=layer)
        return self.value


@dataclass(frozen=True)
class Segment:
    """A run of rows of a fused tensor that is split on its own.

    ``heads`` is the number of attention heads in the segment (rows = heads * head_dim), or
    None for a plain row block split evenly. When there are fewer heads than ranks, each rank
    gets one whole head (KV-head replication).
    """

    rows: int
    heads: int | None = None


@dataclass(frozen=True)
class ShardSpec:
    """How a role is split across tensor-parallel ranks.

    ``dim`` None: replicated. Otherwise split along ``dim``; ``segments`` (along ``dim``)
    are split one by one and concatenated per rank; ``pad_to_multiple`` pads ``dim`` with zero
    rows to a multiple of tp_size first (vocab-parallel lm_head).
    """

    dim: int | None = None
    segments: str | None = None  # name of a segment rule in kiln.sharding.SEGMENT_RULES
    pad_to_multiple: bool = False


REPLICATED = ShardSpec()
COLUMN = ShardSpec(dim=0)  # column-parallel linear: split output features
ROW = ShardSpec(dim=1)  # row-parallel linear: split input features

SHARDING: dict[Role, ShardSpec] = {
    Role.EMBED: REPLICATED,
    Role.ATTN_NORM: REPLICATED,
    Role.ATTN_NORM_BIAS: REPLICATED,
    Role.QKV: ShardSpec(dim=0, segments="qkv"),
    Role.QKV_BIAS: ShardSpec(dim=0, segments="qkv"),
    Role.Q_NORM: REPLICATED,
    Role.Q_NORM_BIAS: REPLICATED,
    Role.K_NORM: REPLICATED,
    Role.K_NORM_BIAS: REPLICATED,
    Role.OUT: ROW,
    Role.OUT_BIAS: REPLICATED,  # added once, after the all-reduce
    Role.MLP_NORM: REPLICATED,
    Role.MLP_NORM_BIAS: REPLICATED,
    Role.GATE_UP: ShardSpec(dim=0, segments="gate_up"),
    Role.GATE_UP_BIAS: ShardSpec(dim=0, segments="gate_up"),
    Role.UP: COLUMN,
    Role.UP_BIAS: COLUMN,
    Role.DOWN: ROW,
    Role.DOWN_BIAS: REPLICATED,  # added once, after the all-reduce
    Role.FINAL_NORM: REPLICATED,
    Role.FINAL_NORM_BIAS: REPLICATED,
    Role.LM_HEAD: ShardSpec(dim=0, pad_to_multiple=True),
}

# The linear weights a qformat quantizes; the embedding stays in the model dtype, and so does
# the lm_head unless the checkpoint says quantize_lm_head (quantized_roles).
QUANTIZED_ROLES = (Role.QKV, Role.OUT, Role.GATE_UP, Role.UP, Role.DOWN)


def quantized_roles(quant: QuantConfig | None) -> tuple[Role, ...]:
    """The roles whose weights ``quant`` stores quantized (none for an unquantized checkpoint)."""
    if quant is None:
        return ()
    return (*QUANTIZED_ROLES, Role.LM_HEAD) if quant.quantize_lm_head else QUANTIZED_ROLES

LAYER_ROLES = tuple(r for r in Role if r.per_layer)
FIRST_STAGE_ROLES = (Role.EMBED,)
LAST_STAGE_ROLES = (Role.FINAL_NORM, Role.FINAL_NORM_BIAS, Role.LM_HEAD)


def roles_for(config: DecoderConfig) -> tuple[Role, ...]:
    """The roles a model with this config has (whole model, any layer)."""
    layernorm_bias = config.norm_type is NormType.LAYERNORM and config.norm_bias
    present = {
        Role.ATTN_NORM_BIAS: layernorm_bias,
        Role.QKV_BIAS: config.qkv_bias,
        Role.Q_NORM: config.qk_norm,
        Role.Q_NORM_BIAS: config.qk_norm and layernorm_bias,
        Role.K_NORM: config.qk_norm,
        Role.K_NORM_BIAS: config.qk_norm and layernorm_bias,
        Role.OUT_BIAS: config.o_bias,
        Role.MLP_NORM: config.has_second_norm,
        Role.MLP_NORM_BIAS: config.has_second_norm and layernorm_bias,
        Role.GATE_UP: config.mlp_type is MlpType.SWIGLU,
        Role.GATE_UP_BIAS: config.mlp_type is MlpType.SWIGLU and config.mlp_bias,
        Role.UP: config.mlp_type is MlpType.GELU,
        Role.UP_BIAS: config.mlp_type is MlpType.GELU and config.mlp_bias,
        Role.DOWN_BIAS: config.mlp_bias,
        Role.FINAL_NORM_BIAS: layernorm_bias,
    }
    return tuple(r for r in Role if present.get(r, True))


def tensor_names(config: DecoderConfig, layers: range | None = None, *, first_stage: bool = True,
                 last_stage: bool = True, quant: QuantConfig | None = None) -> list[str]:
    """Canonical names of the tensors of a stage holding ``layers`` (default: all layers),
    with a quantized checkpoint's companion tensors (scales) after their weight."""
    layers = range(config.num_layers) if layers is None else layers
    names = []
    for role in roles_for(config):
        if role.per_layer:
            for i in layers:
                names.append(role.name(i))
                if quant is not None:
                    names.extend(companion_names(role, i, quant))
        elif (role in FIRST_STAGE_ROLES and first_stage) or (role in LAST_STAGE_ROLES and last_stage):
            names.append(role.name())
            if quant is not None:
                names.extend(companion_names(role, None, quant))
    return names


def companion(role: Role, layer: int | None, kind: str) -> str:
    """``layers.3.attn.qkv.weight_scale``: a companion tensor of a quantized weight; for the
    KV-cache scales (``k_scale``, ``v_scale``) the attention's: ``layers.3.attn.k_scale``."""
    if kind in KV_SCALES:
        return f"layers.{layer}.attn.{kind}"
    return role.name(layer).removesuffix("weight") + kind


def companion_names(role: Role, layer: int | None, quant: QuantConfig) -> list[str]:
    """The companions a quantized checkpoint stores with ``role``'s tensor of ``layer``."""
    names = []
    if role in quantized_roles(quant):
        names.append(companion(role, layer, WEIGHT_SCALE))
        if quant.activation_dtype is not None:
            names.append(companion(role, layer, INPUT_SCALE))
        if role.value in quant.pre_quant_scales:
            names.append(companion(role, layer, PRE_QUANT_SCALE))
    if role is Role.QKV and quant.kv_cache_dtype is not None:
        names.extend(companion(role, layer, kind) for kind in KV_SCALES)
    return names


def name_mismatch(expected: Iterable[str], found: Iterable[str]) -> str | None:
    """``missing [...], unexpected [...]`` (each sorted, an empty one left out: a retest's
    "unexpected []") when ``found`` is not exactly ``expected``, else None: the strict
    accounting every reader of tensor names reports (long lists cut:
    :func:`~kiln.errors.listed`)."""
    expected, found = set(expected), set(found)
    sides = (("missing", sorted(expected - found)), ("unexpected", sorted(found - expected)))
    return ", ".join(f"{side} {listed(names)}" for side, names in sides if names) or None


def parse_tensor(name: str) -> tuple[Role, int | None, str | None]:
    """``(role, layer, companion kind or None)`` of any checkpoint tensor name:
    ``layers.3.attn.qkv.weight_scale`` -> (Role.QKV, 3, "weight_scale")."""
    for kind in KV_SCALES:
        if name.startswith("layers.") and name.endswith(f".attn.{kind}"):
            return (Role.QKV, *parse_name(name.removesuffix(kind) + "qkv.weight")[1:], kind)
    for kind in (WEIGHT_SCALE, INPUT_SCALE, PRE_QUANT_SCALE):
        if name.endswith("." + kind):
            role, layer = parse_name(name.removesuffix(kind) + "weight")
            if role in QUANTIZED_ROLES or (role is Role.LM_HEAD and kind == WEIGHT_SCALE):
                return role, layer, kind
    return (*parse_name(name), None)


def tensor_sharding(role: Role, kind: str | None, ndim: int) -> ShardSpec:
    """How a tensor of ``role`` is split; a companion follows its weight's channels:

    - scalars (per-tensor scales, input and KV-cache scales): replicated;
    - ``weight_scale`` [out] (per channel): split like the weight's rows (column-parallel),
      replicated for a row-parallel weight (every rank has every output channel);
    - ``weight_scale`` [out, in / group] (per group): split like the weight itself;
    - ``pre_quant_scale`` [in]: split with a row-parallel weight's input features.
    A quantized weight (int4 packed [out, in / 2] included) splits like the float one.
    """
    spec = SHARDING[role]
    if kind is None or (kind == WEIGHT_SCALE and ndim == 2):
        return spec
    if ndim == 0 or kind in (INPUT_SCALE, *KV_SCALES):
        return REPLICATED
    if kind == WEIGHT_SCALE:
        return spec if spec.dim == 0 else REPLICATED
    return ShardSpec(dim=0) if spec.dim == 1 else REPLICATED


def scale_shape(role: Role, kind: str, config: DecoderConfig, quant: QuantConfig) -> tuple[int, ...]:
    """Whole-model shape of a companion tensor."""
    out, k = expected_shape(role, config)
    if kind == PRE_QUANT_SCALE:
        return (k,)
    if kind != WEIGHT_SCALE or quant.weight_scales is Granularity.PER_TENSOR:
        return ()
    if quant.weight_scales is Granularity.PER_CHANNEL:
        return (out,)
    return (out, k // quant.group_size)


def parse_name(name: str) -> tuple[Role, int | None]:
    """Inverse of :meth:`Role.name`: ``layers.3.attn.o.weight`` -> (Role.OUT, 3)."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        if index.isdigit():
            try:
                return Role("layers.{layer}." + rest), int(index)
            except ValueError:
                pass
    else:
        try:
            return Role(name), None
        except ValueError:
            pass
    raise KeyError(f"{name!r} is not a canonical kiln tensor name")


def expected_shape(role: Role, config: DecoderConfig) -> tuple[int, ...]:
    """Whole-model shape of a role's tensor."""
    h, q, kv, i = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    qkv = q + 2 * kv
    shapes = {
        Role.EMBED: (config.vocab_size, h), Role.LM_HEAD: (config.vocab_size, h),
        Role.QKV: (qkv, h), Role.QKV_BIAS: (qkv,),
        Role.Q_NORM: (q,), Role.Q_NORM_BIAS: (q,), Role.K_NORM: (kv,), Role.K_NORM_BIAS: (kv,),
        Role.OUT: (h, q), Role.OUT_BIAS: (h,),
        Role.GATE_UP: (2 * i, h), Role.GATE_UP_BIAS: (2 * i,),
        Role.UP: (i, h), Role.UP_BIAS: (i,), Role.DOWN: (h, i), Role.DOWN_BIAS: (h,),
    }
    return shapes.get(role, (h,))  # the remaining roles are hidden-size norms and biases
