"""One decoder layer's quantization: activation statistics, smoothing (SmoothQuant, AWQ) and
its folding, then the format's weights and scales (kiln.quantization.formats).

Contract: :class:`LayerStats` is an ``observer`` for :class:`kiln.reference.ReferenceDecoder`
(it sees each linear's input and each layer's post-rotary keys and values) and keeps what the
format needs: per-input-channel ``max|x|`` (static activation scales, SmoothQuant), per-channel
``mean|x|`` and a strided subset of input rows (AWQ), ``max|k|``, ``max|v|`` (KV-cache scales).
:func:`quantize_layer` turns one layer's float32 whole-model tensors and its statistics into the
tensors a quantized checkpoint stores for that layer (casting the unquantized ones back to the
checkpoint dtype).

Smoothing: linears that read one activation form an :class:`InputGroup`. A per-input-channel
vector ``s`` multiplies the group's weight columns and divides the activation: folded into the
producing norm's weight (and bias) when the activation is a norm output, else recorded as the
linear's ``pre_quant_scale = 1 / s`` (attention output -> o, MLP activation -> down). Either
way the float function is unchanged before rounding (tested to 1e-5 in float64).

- SmoothQuant (Xiao et al. 2023, https://arxiv.org/abs/2211.10438):
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, ``max|W_j|`` over every weight row of the
  group; channels whose activation or weights are all zero keep ``s_j = 1``.
- AWQ (Lin et al. 2024, https://arxiv.org/abs/2306.00978): ``s = mean|X|^a`` normalised by
  ``sqrt(max(s) * min(s))``, ``a`` in {0, 0.05, ..., 1} chosen to minimise the summed mean
  squared error ``|| X (Q(W s) / s)^T - X W^T ||`` over the group's linears on the stored rows
  (a = 0 is plain group INT4, so AWQ never does worse than int4_wo on those rows). AWQ's weight
  clipping search is not done.

Non-goals: mixed formats per layer, dynamic (per-token) activation scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.config import DecoderConfig
from kiln.quantization.config import (
    INPUT_SCALE,
    KV_SCALES,
    PRE_QUANT_SCALE,
    WEIGHT_SCALE,
    QuantConfig,
)
from kiln.quantization.formats import KV_DTYPES, fake_quant_weight, quantize_weight, scale_from_amax
from kiln.roles import QUANTIZED_ROLES, Role, companion, parse_name

AWQ_GRID = tuple(k / 20 for k in range(21))
AWQ_ROWS = 1024  # input rows per linear kept for AWQ's search


@dataclass(frozen=True)
class InputGroup:
    """Linears reading one activation, and the norm that produces it (None: o, down)."""

    linears: tuple[Role, ...]
    norm: Role | None = None
    norm_bias: Role | None = None


def input_groups(config: DecoderConfig) -> list[InputGroup]:
    """The layer's activation groups: Falcon's one-norm parallel block feeds the attention's
    qkv and the MLP's first linear from one norm; otherwise each has its own."""
    mlp_first = Role.GATE_UP if config.gated_mlp else Role.UP
    if not config.has_second_norm:
        groups = [InputGroup((Role.QKV, mlp_first), Role.ATTN_NORM, Role.ATTN_NORM_BIAS)]
    else:
        groups = [InputGroup((Role.QKV,), Role.ATTN_NORM, Role.ATTN_NORM_BIAS),
                  InputGroup((mlp_first,), Role.MLP_NORM, Role.MLP_NORM_BIAS)]
    return groups + [InputGroup((Role.OUT,)), InputGroup((Role.DOWN,))]


@dataclass
class LayerStats:
    """Calibration statistics of one layer (module docstring); ``observe`` is the observer."""

    mean_abs: bool = False  # AWQ
    row_stride: int = 0  # AWQ: keep every row_stride-th input row (0: none)
    amax: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def observe(self, name: str, x: torch.Tensor) -> None:
        if name.endswith((".attn.k", ".attn.v")):  # post-rotary keys / values: one amax
            self._max(name, x.detach().abs().amax().float())
            return
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]
        self._max(name, flat.abs().amax(dim=0))
        if self.mean_abs:
            total = flat.abs().sum(dim=0, dtype=torch.float64)
            self.abs_sum[name] = self.abs_sum[name] + total if name in self.abs_sum else total
            self.count[name] = self.count.get(name, 0) + flat.shape[0]
        if self.row_stride:
            self.rows.setdefault(name, []).append(flat[::self.row_stride].clone())

    def _max(self, name: str, value: torch.Tensor) -> None:
        self.amax[name] = torch.maximum(self.amax[name], value) if name in self.amax else value

    def mean(self, name: str) -> torch.Tensor:
        return (self.abs_sum[name] / self.count[name]).float()

    def input_rows(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows[name])[:AWQ_ROWS]


def smoothquant_scales(act_amax: torch.Tensor, weights: list[torch.Tensor],
                       alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s`` (module docstring)."""
    w_amax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((act_amax > 0) & (w_amax > 0), s, torch.ones_like(s))


def awq_scales(x: torch.Tensor, mean_abs: torch.Tensor, weights: list[torch.Tensor],
               quant: QuantConfig) -> torch.Tensor:
    """AWQ's per-input-channel ``s``, grid-searched on input rows ``x`` [n, in]."""
    refs = [x @ w.T for w in weights]
    base = mean_abs.clamp(min=1e-4)
    best, best_s = float("inf"), torch.ones_like(base)
    for a in AWQ_GRID:
        s = base.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(float((x @ (fake_quant_weight(w * s, quant) / s).T - ref).pow(2).mean())
                  for w, ref in zip(weights, refs, strict=True))
        if err < best:
            best, best_s = err, s
    return best_s


def fold_smoothing(w: dict[str, torch.Tensor], layer: int, group: InputGroup,
                   s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Multiply the group's weight columns by ``s`` and divide its activation by ``s`` (into the
    norm, or a ``pre_quant_scale`` per linear); returns the new pre_quant_scales."""
    for role in group.linears:
        name = role.name(layer)
        w[name] = w[name] * s
    if group.norm is not None:
        for role in (group.norm, group.norm_bias):
            if role.name(layer) in w:
                w[role.name(layer)] = w[role.name(layer)] / s
        return {}
    return {companion(role, layer, PRE_QUANT_SCALE): 1.0 / s for role in group.linears}


def group_scales(w: dict[str, torch.Tensor], layer: int, group: InputGroup, stats: LayerStats,
                 quant: QuantConfig, alpha: float | None) -> torch.Tensor:
    """The smoothing vector of one group: SmoothQuant (int8_sq) or AWQ (int4_awq)."""
    names = [role.name(layer) for role in group.linears]
    weights = [w[n] for n in names]
    if quant.qformat == "int8_sq":
        act = torch.stack([stats.amax[n] for n in names]).amax(dim=0)
        return smoothquant_scales(act, weights, alpha)
    x = torch.cat([stats.input_rows(n) for n in names[:1]])  # one activation: the same rows
    return awq_scales(x, stats.mean(names[0]), weights, quant)


def quantize_layer(w: dict[str, torch.Tensor], layer: int, config: DecoderConfig,
                   quant: QuantConfig, stats: LayerStats | None, alpha: float | None,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s checkpoint tensors (CPU) from its float32 tensors ``w`` (module
    docstring); ``w`` is not modified."""
    w = dict(w)
    extra: dict[str, torch.Tensor] = {}
    smooth: dict[str, torch.Tensor] = {}  # linear weight name -> its activation's divisor
    for group in input_groups(config) if quant.info.smoothing else ():
        s = group_scales(w, layer, group, stats, quant, alpha)
        extra.update(fold_smoothing(w, layer, group, s))
        smooth.update({role.name(layer): s for role in group.linears})
    out: dict[str, torch.Tensor] = {}
    for name, tensor in w.items():
        role = parse_name(name)[0]
        if role not in QUANTIZED_ROLES:
            out[name] = tensor.to(dtype)
            continue
        out[name], out[name.removesuffix("weight") + WEIGHT_SCALE] = quantize_weight(tensor, quant)
        if quant.activation_dtype is not None:
            amax = stats.amax[name] / smooth[name] if name in smooth else stats.amax[name]
            out[companion(role, layer, INPUT_SCALE)] = scale_from_amax(amax.amax(),
                                                                      quant.activation_dtype)
    out.update(extra)
    if quant.kv_cache_dtype is not None:
        for kind in KV_SCALES:
            amax = stats.amax[f"layers.{layer}.attn.{kind[0]}"]
            out[companion(Role.QKV, layer, kind)] = scale_from_amax(
                amax, KV_DTYPES[quant.kv_cache_dtype])
    return {name: t.detach().to("cpu").contiguous() for name, t in out.items()}
