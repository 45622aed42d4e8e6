"""The oracle: a plain PyTorch forward of the canonical decoder, read from a kiln checkpoint.

Every backend is tested against this module, and this module is tested against HF
transformers. It favours being obviously right over being fast: whole-model tensors (all ranks
and stages merged), float32 math by default, a KV cache of concatenated keys and values, and
masks built from explicit positions (so prefill, decode and chunked prefill share one path).

Quantized checkpoints run through the definition of their format (kiln.quantization.formats):
weights dequantized once, activations of W8A8 formats and a quantized KV cache fake-quantized
(quantize then dequantize) where the engines quantize them. ``observer`` (calibration) sees
each linear's input, before any pre_quant_scale or quantization, and each layer's keys and values.

Non-goals: speed, padding within a batch (sequences of one batch share their positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kiln.checkpoint import load_config, load_merged
from kiln.config import DecoderConfig, NormType, PositionType, ResidualType, RopeScalingType
from kiln.errors import described, outside_vocabulary
from kiln.quantization.config import INPUT_SCALE, PRE_QUANT_SCALE, WEIGHT_SCALE, QuantConfig
from kiln.quantization.formats import KV_DTYPES, dequantize_weight, fake_quant
from kiln.roles import Role, companion, parse_tensor, quantized_roles

# observer(name, tensor): a linear's input under its weight's name, or "layers.{i}.attn.k" / ".v"
Observer = Callable[[str, torch.Tensor], None]


def rope_inv_freq(config: DecoderConfig, seq_len: int) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (float32, as HF computes them) for a sequence this long.

    ``seq_len`` matters only for dynamic NTK scaling, which rescales the base once positions
    pass the original context (HF recomputes it from the largest position of each call).
    """
    dim, base, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    if scaling is not None and scaling.type is RopeScalingType.DYNAMIC:
        original = scaling.original_max_position_embeddings or config.max_position_embeddings
        if seq_len > original:
            base = base * ((scaling.factor * seq_len / original) - (scaling.factor - 1)) ** (
                dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None or scaling.type is RopeScalingType.DYNAMIC:
        return inv_freq
    if scaling.type is RopeScalingType.LINEAR:
        return inv_freq / scaling.factor
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """Llama 3.1 smoothing: long wavelengths scaled by 1/factor, short kept, a ramp between."""
    factor, original = scaling.factor, scaling.original_max_position_embeddings
    low_wavelen = original / scaling.low_freq_factor
    high_wavelen = original / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [B, H, S, D], positions [B, S]."""
    freqs = positions[:, None, :, None].float() * inv_freq  # [B, 1, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         config: DecoderConfig) -> torch.Tensor:
    if config.norm_type is NormType.RMSNORM:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + config.norm_eps)).to(x.dtype) * weight
    return F.layer_norm(x, (x.shape[-1],), weight, bias, config.norm_eps)


@dataclass
class KVCache:
    """Per-layer keys/values [B, Hkv, T, D] (post-rotary) and their positions [B, T]."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    positions: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]


def check_token_ids(label: str, ids: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless ``ids`` (a prompt [S], or input_ids [B, S]) has tokens, all in
    ``[0, vocab_size)``, naming the first one outside as the runtime's refusals do: an id of -2
    had read the embedding's second-last row, an empty prompt failed on an empty max()."""
    if ids.numel() == 0:
        raise ValueError(f"{label} is empty; give at least one token")
    if ((ids < 0) | (ids >= vocab_size)).any():  # (named by its path, as the runtime's are)
        raise ValueError(str(outside_vocabulary(ids.tolist(), vocab_size, label)))


def prompt_ids(prompt: Any) -> torch.Tensor:
    """``prompt``'s token ids as a 1-D int64 tensor; ValueError unless they are integers (a
    list of floats had failed in the embedding, "tensors used as indices must be long")."""
    ids = None
    if isinstance(prompt, torch.Tensor):
        ids = prompt.detach()
    elif isinstance(prompt, (list, tuple)):
        try:
            ids = torch.tensor(prompt, dtype=None if prompt else torch.long)  # ([]: empty)
        except (TypeError, ValueError, RuntimeError):  # (strings, ragged lists)
            pass
    if ids is None or ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex \
            or ids.dtype == torch.bool or ids.is_meta or ids.is_sparse:
        found = described(prompt) if ids is None or not isinstance(prompt, torch.Tensor) \
            else f"a {ids.dim()}-D {ids.dtype} tensor" + \
            (" on meta" if ids.is_meta else " (sparse)" if ids.is_sparse else "")
        raise ValueError(f"prompt must be token ids, a list of ints or a 1-D integer tensor, "
                         f"found {found}")
    return ids.to(torch.long)


class ReferenceDecoder:
    """Whole-model forward of the canonical decoder (see module docstring)."""

    def __init__(self, config: DecoderConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32, quant: QuantConfig | None = None,
                 observer: Observer | None = None):
        self.config = config
        self.dtype = dtype
        self.quant = quant
        self.observer = observer
        self.scales: dict[str, torch.Tensor] = {}  # float32 companions kept as they are
        self.w = {}
        quantized = quantized_roles(quant)
        for name, tensor in weights.items():
            role, _, kind = parse_tensor(name)
            if kind is not None:
                if kind != WEIGHT_SCALE:
                    self.scales[name] = tensor.float()
            elif role in quantized:
                scale = weights[name.removesuffix("weight") + WEIGHT_SCALE]
                self.w[name] = dequantize_weight(tensor, scale, quant).to(dtype)
            else:
                self.w[name] = tensor.to(dtype)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32,
                        observer: Observer | None = None) -> ReferenceDecoder:
        ckpt = load_config(checkpoint_dir)
        return cls(ckpt.decoder, load_merged(checkpoint_dir, ckpt), dtype, ckpt.quantization,
                   observer)

    def _get(self, role: Role, layer: int | None = None) -> torch.Tensor | None:
        return self.w.get(role.name(layer))

    def linear(self, x: torch.Tensor, role: Role, layer: int,
               bias: Role | None = None) -> torch.Tensor:
        """``x @ W.T + b`` for a layer's projection, through its format's numerics."""
        if self.observer is not None:
            self.observer(role.name(layer), x)
        pre = self.scales.get(companion(role, layer, PRE_QUANT_SCALE))
        if pre is not None:
            x = (x.float() * pre).to(x.dtype)
        input_scale = self.scales.get(companion(role, layer, INPUT_SCALE))
        if input_scale is not None:
            x = fake_quant(x, input_scale, self.quant.activation_dtype)
        return F.linear(x, self._get(role, layer), None if bias is None else self._get(bias, layer))

    def _cache_entry(self, i: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """Keys or values as the KV cache holds them (fake-quantized for a quantized cache)."""
        if self.observer is not None:
            self.observer(f"layers.{i}.attn.{kind}", x)
        scale = self.scales.get(f"layers.{i}.attn.{kind}_scale")
        if scale is None:
            return x
        return fake_quant(x, scale, KV_DTYPES[self.quant.kv_cache_dtype])

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, vocab] (float32) for input_ids [B, S]; appends to ``cache``."""
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        cache = cache if cache is not None else KVCache()
        b, s = input_ids.shape
        if positions is None:
            positions = (torch.arange(s) + cache.length).expand(b, s)
        kpos = positions if cache.positions is None else torch.cat([cache.positions, positions], 1)
        mask = self._mask(positions, kpos)
        inv_freq = rope_inv_freq(self.config, int(kpos.max()) + 1) \
            if self.config.position_type is PositionType.ROPE else None
        x = self._get(Role.EMBED)[input_ids]
        for i in range(self.config.num_layers):
            x = self._layer(i, x, positions, mask, inv_freq, cache)
        cache.positions = kpos
        x = norm(x, self._get(Role.FINAL_NORM), self._get(Role.FINAL_NORM_BIAS), self.config)
        return (x @ self._get(Role.LM_HEAD).T).float()

    @torch.no_grad()
    def forward_layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``i`` alone on hidden states x [B, S, hidden] at positions 0..S-1, no
        cache, on x's device: layer-by-layer calibration holds only layer ``i``'s tensors."""
        b, s, _ = x.shape
        positions = torch.arange(s).expand(b, s)
        mask = self._mask(positions, positions).to(x.device)
        inv_freq = rope_inv_freq(self.config, s).to(x.device) \
            if self.config.position_type is PositionType.ROPE else None
        return self._layer(i, x, positions.to(x.device), mask, inv_freq, KVCache())

    def _mask(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Additive mask [B, H or 1, S, T]: causal, sliding window, ALiBi."""
        q, k = qpos[:, None, :, None], kpos[:, None, None, :]
        allowed = k <= q
        if self.config.sliding_window is not None:
            allowed &= k > q - self.config.sliding_window
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, -math.inf)
        if self.config.alibi_slopes is not None:
            slopes = torch.tensor(self.config.alibi_slopes, dtype=torch.float32)
            mask = mask + slopes[None, :, None, None] * k.float()
        return mask

    def _layer(self, i: int, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               inv_freq: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        cfg, g = self.config, lambda role: self._get(role, i)
        h = norm(x, g(Role.ATTN_NORM), g(Role.ATTN_NORM_BIAS), cfg)
        attn = self._attention(i, h, positions, mask, inv_freq, cache)
        if cfg.residual is ResidualType.PARALLEL:
            h2 = norm(x, g(Role.MLP_NORM), g(Role.MLP_NORM_BIAS), cfg) if cfg.parallel_norms == 2 \
                else h
            return x + attn + self._mlp(i, h2)
        x = x + attn
        return x + self._mlp(i, norm(x, g(Role.MLP_NORM), g(Role.MLP_NORM_BIAS), cfg))

    def _attention(self, i: int, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                   inv_freq: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        cfg, g = self.config, lambda role: self._get(role, i)
        b, s, _ = h.shape
        qkv = self.linear(h, Role.QKV, i, Role.QKV_BIAS)
        if cfg.clip_qkv is not None:
            qkv = qkv.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        if cfg.qk_norm:
            q = norm(q, g(Role.Q_NORM), g(Role.Q_NORM_BIAS), cfg)
            k = norm(k, g(Role.K_NORM), g(Role.K_NORM_BIAS), cfg)
        # [B, S, H*D] -> [B, H, S, D]
        q = q.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, s, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if inv_freq is not None:
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k, v = self._cache_entry(i, "k", k), self._cache_entry(i, "v", v)
        if i in cache.keys:
            k = torch.cat([cache.keys[i], k], dim=2)
            v = torch.cat([cache.values[i], v], dim=2)
        cache.keys[i], cache.values[i] = k, v
        group = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * cfg.softmax_scale + mask
        out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(b, s, cfg.q_size)
        return self.linear(out, Role.OUT, i, Role.OUT_BIAS)

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.config.gated_mlp:
            gate, up = self.linear(h, Role.GATE_UP, i, Role.GATE_UP_BIAS).chunk(2, dim=-1)
            act = F.silu(gate) * up
        else:
            act = F.gelu(self.linear(h, Role.UP, i, Role.UP_BIAS))
        return self.linear(act, Role.DOWN, i, Role.DOWN_BIAS)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int,
                 eos_token_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding of one prompt (token ids: a list or a 1-D integer tensor); returns
        the new tokens (stops after an EOS)."""
        ids = prompt_ids(prompt)
        check_token_ids("prompt", ids, self.config.vocab_size)
        cache = KVCache()
        logits = self.forward(ids[None], cache)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in eos_token_ids:
                break
            logits = self.forward(torch.tensor([[token]]), cache)
        return out
