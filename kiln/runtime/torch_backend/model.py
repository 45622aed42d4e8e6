"""The torch backend's forward: one step of packed (ragged) tokens over the paged KV cache.

A step's tokens from every sequence are packed into rows ``[T, hidden]``; matrix products run
once over all rows (cuBLAS through ``torch``), and the plugin kernels do the rest. Per layer
(sequential residual)::

    h ──qkv──▶ rope+cache write ──▶ paged attention ──o──▶ add+norm ──gate_up──▶ silu*up
      ──down──▶ add+norm (next layer's attn norm, or the final norm) ──▶ h

The rope+cache write and silu*up are their projections' epilogues
(:mod:`kiln.plugins.gemv.epilogue`): a one-row GEMV runs them in its own kernel (batch-1
decode: two kernels a layer fewer); other steps run them after the projection. A step that is
one prompt from position 0 may take cuDNN's fused attention instead of the paged kernel
(:mod:`kiln.plugins.attention.cudnn`; the executor's ``prefill_attention`` option).

Quantized engines (:mod:`kiln.engine.torch_files`): each quantized projection is a
:class:`QuantLinear` calling its format's kernel (:mod:`kiln.plugins.quant_linear`), after the
``pre_quant_scale`` smoothing where the checkpoint has one; a quantized KV cache passes each
layer's ``k_scale``/``v_scale`` to the rotary and attention kernels.

The residual stream lives in ``residual`` and is updated in place by the fused add+norm, so a
layer reads and writes it once. Parallel-residual models (Falcon) add attention and MLP outputs
first. Logits are computed for the last row of each sequence only (:meth:`PagedDecoder.forward`),
or for every row when a step asks for context logits (:meth:`PagedDecoder.forward_every_row`).

Tensor and pipeline parallel ranks (:class:`~kiln.runtime.torch_backend.parallel.RankShard`):
a rank holds its heads, MLP columns and vocab rows (the checkpoint's shards) and its stage's
layers. Row-parallel projections (``o``, ``down``) give partial sums, all-reduced over the
stage's ranks before the residual add (once per layer for a parallel block: attention and MLP
partials are added first); their replicated biases are added by tensor-parallel rank 0 only,
so the sum holds them once. The lm_head's logits are gathered over the vocab and cut to
``vocab_size``. A stage after the first starts from the residual stream the previous one sent;
a stage before the last sends its stream (the residual plus the last layer's output, before
the next layer's norm) and returns None instead of logits.

Contract: :class:`StepInputs` holds the device-side metadata of one step (built by the
executor); :meth:`PagedDecoder.forward` writes each row's keys/values into the cache and
returns ``[num_seqs, vocab]`` logits in the model dtype (None on a stage before the last).
Nothing here touches the host, so a single-rank decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.config import DecoderConfig, NormType, PositionType, ResidualType
from kiln.errors import ConfigError, a_or_an
from kiln.plugins.attention import cudnn as cudnn_attention
from kiln.plugins.gemv.epilogue import Epilogue, RopeToCache, SiluMul
from kiln.plugins.gemv.triton_reference import wide_linear
from kiln.quantization.config import INPUT_SCALE, PRE_QUANT_SCALE, WEIGHT_SCALE, QuantConfig
from kiln.roles import Role, companion, quantized_roles
from kiln.runtime.errors import StepInterrupted
from kiln.runtime.torch_backend.kernels import KernelSet
from kiln.runtime.torch_backend.paged_cache import PagedKVCache
from kiln.runtime.torch_backend.parallel import RankShard

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """Device tensors of one step. Decode rows are single-token chunks; prefill rows the rest."""

    tokens: torch.Tensor  # [T] int32
    rope_index: torch.Tensor  # [T] int32: row of ``rope_table`` per token
    rope_table: torch.Tensor | None  # [P, head_dim] float32 (cos | sin), None without RoPE
    slot_mapping: torch.Tensor  # [T] int32: block * page_size + row, where each token's k/v go
    # [num_seqs] int64: the row whose logits each sequence returns; None: every row is its
    # sequence's last (a CUDA graph's decode step), so no gather runs
    last_rows: torch.Tensor | None
    dec_rows: torch.Tensor | None = None  # [Bd] int32
    dec_tables: torch.Tensor | None = None  # [Bd, max_blocks] int32
    dec_ctx: torch.Tensor | None = None  # [Bd] int32 (tokens cached, this one included)
    dec_max_ctx: int = 0
    dec_splits: int | None = None
    pre_starts: torch.Tensor | None = None  # [Bp] int32: first row of each prefill chunk
    pre_lens: torch.Tensor | None = None  # [Bp] int32
    pre_tables: torch.Tensor | None = None  # [Bp, max_blocks] int32
    pre_ctx: torch.Tensor | None = None  # [Bp] int32
    pre_max_q: int = 0
    pre_max_ctx: int = 0
    pre_fresh: bool = False  # the step is one prefill chunk from position 0 (no decode rows)


class Linear:
    """A packed weight: ``[out, in]`` (``F.linear``) or pre-transposed ``[in, out]``.

    With ``gemv`` (the plugin kernel), single-row inputs of an ``[out, in]`` weight use it
    instead of cuBLAS (batch-1 decode streams the weight faster that way).

    With ``out_dtype`` (float32 for a 16-bit model's row-parallel projection at tp > 1), the
    result is the float32 accumulator, unrounded: each rank's partial sum goes through the
    all-reduce as such and is rounded once, as tp 1 rounds its whole sum.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool,
                 gemv: Callable | None = None, out_dtype: torch.dtype | None = None):
        self.weight, self.bias, self.transposed = weight, bias, transposed
        self.gemv = None if transposed else gemv
        self.out_dtype = out_dtype

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None,
                 epilogue: Epilogue | None = None) -> torch.Tensor:
        """``epilogue``: the op that reads the output, run on it (fused by the GEMV)."""
        if self.out_dtype is not None:  # a partial sum: nothing reads it before the all-reduce
            if out is not None or epilogue is not None:
                raise ValueError("a partial-sum projection takes no out= or epilogue")
            if self.gemv is not None and x.shape[0] == 1:
                return self.gemv(x, self.weight, self.bias, out_dtype=self.out_dtype)
            weight = self.weight.t() if self.transposed else self.weight
            return wide_linear(x, weight, self.bias, self.out_dtype)
        if self.gemv is not None and x.shape[0] == 1 and out is None:
            return self.gemv(x, self.weight, self.bias, epilogue=epilogue)
        if out is not None or self.transposed:
            w = self.weight if self.transposed else self.weight.t()
            y = torch.matmul(x, w, out=out)
            y = y if self.bias is None else y.add_(self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if epilogue is None else epilogue.apply(y)


class QuantLinear:
    """A quantized projection: its format's kernel over the packed weight and scales.

    An FP8 projection with a static input scale may take its input quantized already (FP8),
    by the kernel that makes it, where it would quantize it in a pass of its own
    (:meth:`quantized_input`; the kernels' ``fp8_takes_quantized``): the norm (not with a
    ``pre_quant_scale``), the attention and the gated MLP's activation (which also apply the
    projection's ``pre_quant_scale`` first).
    """

    gemv = None  # no fused silu*up GEMV: the gated MLP's activation runs first

    def __init__(self, kernel: Callable, weight: torch.Tensor, scales: tuple, bias: torch.Tensor | None,
                 pre_quant_scale: torch.Tensor | None, dtype: torch.dtype,
                 takes_quantized: Callable | None = None):
        self.kernel, self.weight, self.scales = kernel, weight, scales
        self.bias, self.pre_quant_scale, self.dtype = bias, pre_quant_scale, dtype
        self.takes_quantized = takes_quantized

    def quantized_input(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(input scale, pre_quant_scale or None) to quantize an input of ``rows`` rows with
        before this projection (which then skips its own pass: multiply by the
        pre_quant_scale, round to the model dtype, quantize to FP8), or None: give it the
        input in the model dtype."""
        if self.takes_quantized is None:
            return None
        weight_scale, input_scale = self.scales
        n, k = self.weight.shape
        if self.takes_quantized(rows, n, k, weight_scale, input_scale, self.dtype):
            return input_scale, self.pre_quant_scale
        return None

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None,
                 epilogue: Epilogue | None = None) -> torch.Tensor:
        """``epilogue``: the op that reads the output, run on it (fused by the one-row GEMVs);
        not with ``out``."""
        if x.dtype == torch.float8_e4m3fn:  # quantized by its producer (quantized_input)
            y = self.kernel(x, self.weight, *self.scales, bias=self.bias, out_dtype=self.dtype,
                            epilogue=epilogue)
            return y if out is None else out.copy_(y)
        if self.pre_quant_scale is not None:  # as the reference decoder: in float32, rounded
            x = (x.float() * self.pre_quant_scale).to(x.dtype)
        y = self.kernel(x, self.weight, *self.scales, bias=self.bias, epilogue=epilogue)
        return y if out is None else out.copy_(y)


def quant_linear(quant: QuantConfig, kernels: KernelSet, tensors: dict[str, torch.Tensor],
                 role: Role, layer: int | None, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> QuantLinear:
    """The :class:`QuantLinear` of ``role``'s weight in layer ``layer`` of a ``quant`` engine
    whose activations are ``dtype``."""
    get = tensors.get
    weight = tensors[role.name(layer)]
    weight_scale = tensors[companion(role, layer, WEIGHT_SCALE)]
    input_scale = get(companion(role, layer, INPUT_SCALE))
    pre_quant_scale = get(companion(role, layer, PRE_QUANT_SCALE))
    if quant.qformat == "fp8":
        return QuantLinear(kernels.fp8_linear, weight, (weight_scale, input_scale), bias,
                           pre_quant_scale, dtype, kernels.fp8_takes_quantized)
    if quant.qformat == "int8_sq":
        kernel, scales = kernels.int8_w8a8_linear, (weight_scale, input_scale)
    elif quant.info.weight_dtype == "int8":
        kernel, scales = kernels.int8_weight_only_linear, (weight_scale,)
    else:
        if weight.dtype == torch.int32 and kernels.name == "triton":
            _check_fragment_kernel()
        kernel, scales = kernels.int4_weight_only_linear, (weight_scale, quant.group_size)
    return QuantLinear(kernel, weight, scales, bias, pre_quant_scale, dtype)


def _check_fragment_kernel() -> None:
    """INT4 weights in the MMA fragment layout run on a Gluon kernel (experimental in Triton):
    refuse the engine here, in one line, where it cannot load."""
    from kiln.plugins.quant_linear.triton_kernels import gluon_missing
    if (why := gluon_missing()) is not None:
        raise ConfigError(f"this engine's INT4 weights are in the tensor-core fragment layout, "
                          f"whose kernel cannot run here: {why}; pip install triton==3.6.0, or "
                          f"run with kernels='reference'")


@dataclass
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class Layer:
    attn_norm: Norm
    qkv: Linear
    o: Linear
    mlp_norm: Norm | None
    gate_up: Linear | None  # SwiGLU
    up: Linear | None  # GELU
    down: Linear
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    kv_scales: dict[str, torch.Tensor] | None = None  # k_scale, v_scale of a quantized cache


class PagedDecoder:
    """Weights and forward of the canonical decoder for one rank (``shard``: its part of a
    tensor/pipeline-parallel model; the whole model by default)."""

    def __init__(self, config: DecoderConfig, tensors: dict[str, torch.Tensor],
                 transposed: frozenset[str], kernels: KernelSet,
                 quant: QuantConfig | None = None, shard: RankShard | None = None,
                 prefill_attention: str = "auto"):
        self.config = config
        self.kernels = kernels
        self.quant = quant
        # set: the step under way ends before its next layer (TorchExecutor.interrupt)
        self.interrupted: threading.Event | None = None
        self.shard = shard = shard or RankShard()
        mapping = shard.mapping
        self.num_heads = mapping.local_heads(config)
        self.num_kv_heads = mapping.local_kv_heads(config)
        self.rms = config.norm_type is NormType.RMSNORM
        get = tensors.get
        quantized = quantized_roles(quant)
        # the model (and activation) dtype: the norms' (a quantized engine's norms stay unquantized)
        dtype = tensors[Role.ATTN_NORM.name(next(iter(shard.layers(config))))].dtype
        # Row-parallel biases are replicated: added by one rank, the all-reduce sums them once.
        drop_bias = {Role.OUT, Role.DOWN} if shard.tp_rank > 0 else set()
        # A 16-bit model's row-parallel partial sums stay float32 through the all-reduce and are
        # rounded once, as tp 1 rounds its sum: each rank's rounded partial had made bfloat16
        # tp 2's greedy tokens leave tp 1's (GPU_NOTES "Issue 15, first run on two H200s").
        # Twice the all-reduce's bytes. Quantized projections keep their kernels' output.
        partial = torch.float32 if shard.tp_size > 1 and dtype.itemsize == 2 else None

        def linear(role: Role, bias: Role | None, i: int | None = None) -> Linear | QuantLinear:
            name = role.name(i)
            b = None if bias is None or role in drop_bias else get(bias.name(i))
            if role in quantized:
                return quant_linear(quant, kernels, tensors, role, i, b, dtype)
            return Linear(tensors[name], b, name in transposed,
                          None if role is Role.LM_HEAD else kernels.gemv,
                          partial if role in (Role.OUT, Role.DOWN) else None)

        def kv_scales(i: int) -> dict[str, torch.Tensor] | None:
            if quant is None or quant.kv_cache_dtype is None:
                return None
            return {kind: tensors[companion(Role.QKV, i, kind)] for kind in ("k_scale", "v_scale")}

        def norm(role: Role, bias: Role, i: int | None = None) -> Norm | None:
            w = get(role.name(i))
            return None if w is None else Norm(w, get(bias.name(i)))

        self.embed = tensors[Role.EMBED.name()] if shard.first_stage else None
        self.layers = []
        for i in shard.layers(config):  # global layer indices; the cache counts them from 0
            gated = config.gated_mlp
            self.layers.append(Layer(
                attn_norm=norm(Role.ATTN_NORM, Role.ATTN_NORM_BIAS, i),
                qkv=linear(Role.QKV, Role.QKV_BIAS, i), o=linear(Role.OUT, Role.OUT_BIAS, i),
                mlp_norm=norm(Role.MLP_NORM, Role.MLP_NORM_BIAS, i),
                gate_up=linear(Role.GATE_UP, Role.GATE_UP_BIAS, i) if gated else None,
                up=None if gated else linear(Role.UP, Role.UP_BIAS, i),
                down=linear(Role.DOWN, Role.DOWN_BIAS, i),
                q_norm=norm(Role.Q_NORM, Role.Q_NORM_BIAS, i),
                k_norm=norm(Role.K_NORM, Role.K_NORM_BIAS, i), kv_scales=kv_scales(i)))
        last = shard.last_stage
        self.final_norm = norm(Role.FINAL_NORM, Role.FINAL_NORM_BIAS) if last else None
        self.lm_head = linear(Role.LM_HEAD, None) if last else None
        first_norm = self.layers[0].attn_norm.weight
        self.dtype, device = first_norm.dtype, first_norm.device  # the model (and cache) dtype
        self.alibi = None
        if config.position_type is PositionType.ALIBI:  # this rank's heads' slopes
            heads = slice(shard.tp_rank * self.num_heads, (shard.tp_rank + 1) * self.num_heads)
            self.alibi = torch.tensor(config.alibi_slopes[heads], dtype=torch.float32,
                                      device=device)
        self.fresh_prefill = self._fresh_prefill(prefill_attention, device)

    def _fresh_prefill(self, choice: str, device: torch.device) -> Callable | None:
        """cuDNN's attention for fresh prompts where it applies and runs (kiln.plugins.attention
        .cudnn), else None: kiln's paged prefill kernel (Triton, or the reference) takes every
        chunk. ``choice``: "auto", "kiln" (never cuDNN) or "cudnn" (an error where it
        cannot run)."""
        if choice == "kiln" or (choice == "auto" and self.kernels.name != "triton"):
            return None
        cfg = self.config
        if self.kernels.name != "triton":
            why = f"kiln's {self.kernels.name} kernels run here, not on a CUDA device"
        elif self.alibi is not None or cfg.sliding_window is not None:
            why = "the model has ALiBi or a sliding window"
        elif self.quant is not None and self.quant.kv_cache_dtype is not None:
            why = f"the engine has {a_or_an(self.quant.kv_cache_dtype)} KV cache"
        elif (why := cudnn_attention.dtype_refusal(self.dtype)) is not None:
            pass  # a float32 engine: by design, not a refusal
        else:  # where it should run: a refusal is a slower path the user is told of
            why = cudnn_attention.refusal(device, self.num_heads, self.num_kv_heads,
                                          cfg.head_dim, self.dtype)
            if why is not None and choice == "auto":
                logger.warning("prefill attention: kiln's Triton kernel, since cuDNN's "
                               "attention refused this model here (%s)", why)
                return None
        if why is None:
            logger.info("prefill attention: cuDNN for fresh prompts of %d tokens or more, "
                        "kiln's Triton kernel for the rest", cudnn_attention.MIN_TOKENS)
            return cudnn_attention.fresh_prefill_attention
        if choice == "cudnn":
            raise ConfigError(f"prefill_attention='cudnn': cuDNN's attention cannot run this "
                              f"model here: {why}; use 'auto' or 'kiln'")
        logger.info("prefill attention: kiln's Triton kernel (not cuDNN: %s)", why)
        return None

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: Norm,
              out: torch.Tensor | None = None, into: Linear | QuantLinear | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add and norm; ``into``: the one projection that reads the result, which may take
        it quantized to FP8 by the norm (:meth:`QuantLinear.quantized_input`; not with a
        pre_quant_scale, which the norm kernel does not apply)."""
        fused = into.quantized_input(x.shape[0]) if isinstance(into, QuantLinear) else None
        scale = fused[0] if fused is not None and fused[1] is None else None
        # the residual stream is written by the norm two or more kernels back, never the one
        # just before: the norm may load it before waiting for that kernel
        return self.kernels.add_norm(x, residual, norm.weight, norm.bias, self.config.norm_eps,
                                     rms=self.rms, out=out, quant_scale=scale,
                                     residual_early=residual is not None)

    @torch.no_grad()
    def forward(self, inp: StepInputs, cache: PagedKVCache,
                logits_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [num_seqs, vocab] (model dtype; None on a stage before the last); writes
        every row's k/v into ``cache``."""
        h = self._final_hidden(inp, cache)
        if h is None:
            return None
        return self._logits(h if inp.last_rows is None else h.index_select(0, inp.last_rows),
                            logits_out)

    @torch.no_grad()
    def forward_every_row(self, inp: StepInputs, cache: PagedKVCache) -> torch.Tensor | None:
        """Logits [T, vocab] of every row of the step (model dtype); k/v as :meth:`forward`."""
        h = self._final_hidden(inp, cache)
        return None if h is None else self._logits(h)

    def _logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.shard.tp_size == 1:
            return self.lm_head(h, out=out)
        full = self.shard.comm.gather_vocab(self.lm_head(h))  # [n, padded vocab]
        logits = full[:, :self.config.vocab_size]
        return logits if out is None else out.copy_(logits)  # (a CUDA graph's static buffer)

    def _final_hidden(self, inp: StepInputs, cache: PagedKVCache) -> torch.Tensor | None:
        """[T, hidden] after the final norm; None on a stage before the last (it sent its
        residual stream to the next stage)."""
        shard, comm = self.shard, self.shard.comm
        first = self.layers[0].attn_norm
        if self.embed is not None:
            x = F.embedding(inp.tokens, self.embed)
        else:
            x = comm.recv_hidden(inp.tokens.shape[0], first.weight)
        parallel = self.config.residual is ResidualType.PARALLEL
        # a parallel block's attention and MLP may both read the attention norm: never FP8
        def qkv(i: int) -> QuantLinear | Linear | None:
            return None if parallel else self.layers[i].qkv

        h, residual = self._norm(x, None, first, into=qkv(0))
        # (a float32 partial sum is rounded to the model dtype once summed; see Linear)
        reduce = (lambda t: comm.all_reduce(t).to(self.dtype)) if shard.tp_size > 1 \
            else (lambda t: t)
        for i, layer in enumerate(self.layers):
            if self.interrupted is not None and self.interrupted.is_set():
                raise StepInterrupted(f"the step was interrupted before layer {i}")
            attn = self._attention(i, layer, h, inp, cache)
            if parallel:  # one all-reduce of both partial sums
                h_mlp = self._norm(residual, None, layer.mlp_norm)[0] if layer.mlp_norm else h
                mlp = self._mlp(layer, h_mlp)
                if attn.dtype == self.dtype:
                    delta = reduce(attn.add_(mlp))
                else:  # float32 partials: each sum rounded, then added, as tp 1 adds them
                    both = comm.all_reduce(torch.cat((attn, mlp), dim=1)).to(self.dtype)
                    delta = both[:, :attn.shape[1]].add_(both[:, attn.shape[1]:])
            else:
                h, residual = self._norm(reduce(attn), residual, layer.mlp_norm,
                                         into=layer.gate_up or layer.up)
                delta = reduce(self._mlp(layer, h))
            if i + 1 < len(self.layers):
                h, residual = self._norm(delta, residual, self.layers[i + 1].attn_norm,
                                         into=qkv(i + 1))
            elif shard.last_stage:
                h, residual = self._norm(delta, residual, self.final_norm)
            else:  # the next stage's first norm adds nothing: hand it the summed stream
                comm.send_hidden(residual.add_(delta))
                return None
        return h

    def _attention(self, i: int, layer: Layer, h: torch.Tensor, inp: StepInputs,
                   cache: PagedKVCache) -> torch.Tensor:
        cfg, k = self.config, self.kernels
        hq, hkv, d = self.num_heads, self.num_kv_heads, cfg.head_dim  # this rank's heads
        k_cache, v_cache = cache.layer(i)
        scales = layer.kv_scales or {}
        clip = cfg.clip_qkv
        if layer.q_norm is None:  # the projection's epilogue (fused by a one-row GEMV)
            q = layer.qkv(h, epilogue=RopeToCache(
                k.rope_qkv_to_cache, inp.rope_table, inp.rope_index, k_cache, v_cache,
                inp.slot_mapping, hq, hkv, d, clip, **scales))
        else:  # clamp, then q/k norms over whole projections, then rope
            qkv = layer.qkv(h)
            if clip is not None:
                qkv.clamp_(-clip, clip)
                clip = None
            q_part, k_part = qkv[:, : hq * d], qkv[:, hq * d: (hq + hkv) * d]
            self._norm(q_part, None, layer.q_norm, out=q_part)
            self._norm(k_part, None, layer.k_norm, out=k_part)
            q = k.rope_qkv_to_cache(qkv, inp.rope_table, inp.rope_index, k_cache, v_cache,
                                    inp.slot_mapping, num_heads=hq, num_kv_heads=hkv,
                                    head_dim=d, clip=clip, **scales)
        if (self.fresh_prefill is not None and inp.pre_fresh
                and q.shape[0] >= cudnn_attention.MIN_TOKENS):  # one prompt, from position 0
            out = self.fresh_prefill(q, k_cache, v_cache, inp.pre_tables[0],
                                     scale=cfg.softmax_scale)
            return layer.o(out.view(q.shape[0], hq * d))  # o quantizes a 16-bit input itself
        common = dict(scale=cfg.softmax_scale, alibi_slopes=self.alibi,
                      sliding_window=cfg.sliding_window, **scales)
        fused = layer.o.quantized_input(q.shape[0]) if isinstance(layer.o, QuantLinear) else None
        if fused is not None:  # ``o`` takes its input quantized to FP8 by the attention
            common.update(quant_scale=fused[0], pre_quant_scale=fused[1])
        out = torch.empty_like(q, dtype=q.dtype if fused is None else torch.float8_e4m3fn)
        if inp.dec_rows is not None:
            k.paged_decode_attention(q, k_cache, v_cache, inp.dec_tables, inp.dec_ctx,
                                     inp.dec_rows, out, max_ctx_len=inp.dec_max_ctx,
                                     num_splits=inp.dec_splits, **common)
        if inp.pre_starts is not None:
            k.paged_prefill_attention(q, k_cache, v_cache, inp.pre_tables, inp.pre_ctx,
                                      inp.pre_starts, inp.pre_lens, out, max_q_len=inp.pre_max_q,
                                      max_ctx_len=inp.pre_max_ctx, **common)
        return layer.o(out.view(q.shape[0], hq * d))  # [T, Hq, D] -> [T, Hq*D]

    def _mlp(self, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        if layer.gate_up is not None:
            if h.shape[0] == 1 and layer.down.gemv is not None:  # silu*up fused into down
                return layer.down.gemv(layer.gate_up(h), layer.down.weight, layer.down.bias,
                                       silu_input=True, out_dtype=layer.down.out_dtype)
            fused = layer.down.quantized_input(h.shape[0]) \
                if isinstance(layer.down, QuantLinear) else None
            if fused is None:  # silu*up as the projection's epilogue (fused by a one-row GEMV)
                return layer.down(layer.gate_up(h, epilogue=SiluMul(self.kernels.silu_and_mul)))
            scale, smoothing = fused
            return layer.down(self.kernels.silu_and_mul(layer.gate_up(h), quant_scale=scale,
                                                        pre_quant_scale=smoothing))
        return layer.down(F.gelu(layer.up(h)))
