"""Quantized rows of benchmarks/gpu.py: the Llama-3.1-8B-shaped random model in each qformat,
quantized in memory by kiln's own numerics (kiln.quantization.formats), and the torchao peer.

Weights: the bf16 random weights of gpu.py. Each quantized projection is quantized by
``formats.quantize_weight`` (int4: group 128). W8A8 input scales and KV-cache scales come from a
calibration prefill of the bf16 model (512 random tokens): every projection's input amax, and
the keys'/values' amax read from the qkv projection's output (keys x sqrt(2): a rotation can
raise a coordinate to the norm of its pair). On random weights the accuracy says nothing; the
numerics are the real ones, so the speed is.

Peers (``peer`` section): an HF ``LlamaForCausalLM`` over the same bf16 weights, decoded batch 1
with a static KV cache and its one-token forward compiled once (:func:`compiled_decode`), as is
and in torchao's int4 weight-only (group 128), int8 weight-only and float8 (dynamic activation,
per-row weights) recipes (carry the torchao wheel: GPU_NOTES.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.config import DecoderConfig
from kiln.engine.torch_files import pack_weights
from kiln.quantization.config import INPUT_SCALE, WEIGHT_SCALE, QuantConfig
from kiln.quantization.formats import KV_DTYPES, quantize_weight, scale_from_amax
from kiln.roles import Role, companion, parse_tensor, quantized_roles
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.torch_backend.executor import TorchExecutor

log = logging.getLogger("benchmarks.gpu")


@dataclass(frozen=True)
class Variant:
    """A benchmarked form: ``qformat`` None is the bf16 engine."""

    label: str
    qformat: str | None
    kv_cache_dtype: str | None = None
    lm_head: bool = False  # --quantize_lm_head (torchao's recipes quantize every Linear)

    def quant(self) -> QuantConfig | None:
        if self.qformat is None:
            return None
        group = 128 if self.qformat.startswith("int4") else None
        return QuantConfig(self.qformat, group_size=group, kv_cache_dtype=self.kv_cache_dtype,
                           quantize_lm_head=self.lm_head)


VARIANTS = {v.label: v for v in (
    Variant("bf16", None), Variant("fp8", "fp8"), Variant("int8_wo", "int8_wo"),
    Variant("int4_wo", "int4_wo"), Variant("int8_sq", "int8_sq"),
    Variant("fp8_kv_fp8", "fp8", "fp8"), Variant("int8_wo_kv_int8", "int8_wo", "int8"),
    Variant("int4_wo_head", "int4_wo", lm_head=True))}


class _Observed:
    """Wraps a projection; records its input's amax (and, for qkv, the k/v output amax)."""

    def __init__(self, inner, name: str, amax: dict[str, float], kv_split=None):
        self.inner, self.name, self.amax, self.kv_split = inner, name, amax, kv_split
        self.gemv = None  # no fused silu*up: the observed input must be the real one

    def __call__(self, x, out=None, epilogue=None):
        """The projection, then its epilogue (unfused: the k/v amax is read off the output)."""
        self.amax[self.name] = max(self.amax.get(self.name, 0.0), float(x.abs().amax()))
        y = self.inner(x, out=out)
        if self.kv_split is not None:
            q, kv = self.kv_split
            layer = self.name.split(".")[1]
            for kind, part in (("k", y[:, q:q + kv]), ("v", y[:, q + kv:])):
                key = f"layers.{layer}.attn.{kind}"
                self.amax[key] = max(self.amax.get(key, 0.0), float(part.abs().amax()))
        return y if epilogue is None else epilogue.apply(y)


@torch.no_grad()
def calibrate(ex: TorchExecutor, tokens: int = 512, seed: int = 7) -> dict[str, float]:
    """Input amax of every projection (``layers.3.mlp.down.weight``) and k/v amax per layer."""
    cfg, amax = ex.config, {}
    model = ex.model
    saved = [(layer, dict(vars(layer))) for layer in model.layers]
    split = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
    for i, layer in enumerate(model.layers):
        for attr, role in (("qkv", Role.QKV), ("o", Role.OUT), ("gate_up", Role.GATE_UP),
                           ("up", Role.UP), ("down", Role.DOWN)):
            if getattr(layer, attr) is not None:
                setattr(layer, attr, _Observed(getattr(layer, attr), role.name(i), amax,
                                               split if role is Role.QKV else None))
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (tokens,), generator=g).tolist()
    try:
        assert ex.reserve(0, tokens)
        ex._eager([SequenceChunk(0, prompt, 0)])  # the amax reads synchronize
    finally:
        ex.release(0)
        for layer, attrs in saved:
            vars(layer).update(attrs)
    return amax


@torch.no_grad()
def quantize_in_memory(config: DecoderConfig, tensors: dict[str, torch.Tensor],
                       quant: QuantConfig, amax: dict[str, float],
                       ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Canonical bf16 ``tensors`` -> the packed tensors of a ``quant`` engine (kiln's numerics)."""
    out: dict[str, torch.Tensor] = {}
    roles = quantized_roles(quant)
    for name, w in tensors.items():
        role, layer, _ = parse_tensor(name)
        if role not in roles:
            out[name] = w
            continue
        out[name], out[companion(role, layer, WEIGHT_SCALE)] = quantize_weight(w.float(), quant)
        if quant.activation_dtype is not None:
            seen = torch.tensor(amax[name], device=w.device)
            out[companion(role, layer, INPUT_SCALE)] = scale_from_amax(seen,
                                                                       quant.activation_dtype)
        if role is Role.QKV and quant.kv_cache_dtype is not None:
            for kind, margin in (("k", math.sqrt(2.0)), ("v", 1.0)):
                seen = torch.tensor(amax[f"layers.{layer}.attn.{kind}"] * margin,
                                    device=w.device)
                out[companion(role, layer, f"{kind}_scale")] = scale_from_amax(
                    seen, KV_DTYPES[quant.kv_cache_dtype])
    return pack_weights(out, torch.bfloat16, quant=quant)


def weight_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes a decode step reads: every tensor but the embedding (one row of it)."""
    return sum(t.numel() * t.element_size() for n, t in tensors.items()
               if n != Role.EMBED.name())


# -- peers: HF Llama compiled once, bf16 and torchao's recipes ---------------------------------
# (recipe, kiln's result key it is the peer of); "bf16": no quantization
PEER_RECIPES = (("bf16", "decode_tok_s"), ("int4_weight_only_g128", "int4_wo.decode_tok_s"),
                ("int8_weight_only", "int8_wo.decode_tok_s"),
                ("float8_dynamic_per_row", "fp8.decode_tok_s"))


def torchao_config(recipe: str):
    import torchao.quantization as tq

    if recipe == "int4_weight_only_g128":
        # tinygemm (torch's own _weight_int4pack_mm): torchao 0.17 dropped version 1 (it asserts
        # version 2) and names it by packing format; its default ("plain") needs fbgemm kernels
        return tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    if recipe == "int8_weight_only":
        return tq.Int8WeightOnlyConfig(version=2)  # version 1 (the default) is deprecated
    return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())


@torch.no_grad()
def compiled_decode(model, prompt: list[int], new_tokens: int, mode: str | None =
                    "reduce-overhead") -> tuple[float, list[int]]:
    """Batch-1 greedy decode of an HF causal LM as HF's and torchao's own speed recipes run it:
    a static KV cache and the one-token forward compiled once (``torch.compile``,
    ``fullgraph``; ``mode`` "reduce-overhead" replays it as a CUDA graph), the prompt's prefill
    eager. A first pass compiles and warms up; the second, from a reset cache, is timed over
    its decode steps only (the first new token comes from the prefill). Returns (decode tok/s,
    the timed pass's tokens)."""
    from transformers import StaticCache

    device = model.lm_head.weight.device
    cache = StaticCache(config=model.config, max_cache_len=len(prompt) + new_tokens)

    def forward(ids, pos):
        return model(input_ids=ids, position_ids=pos[None], cache_position=pos,
                     past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    step = torch.compile(forward, mode=mode, fullgraph=True)
    ids = torch.tensor([prompt], device=device)
    for _ in range(2):
        cache.reset()
        token = forward(ids, torch.arange(len(prompt), device=device))
        tokens = [int(token)]
        _sync(device)
        started = time.perf_counter()
        for i in range(new_tokens - 1):
            pos = torch.tensor([len(prompt) + i], device=device)
            token = step(token, pos).clone()  # a CUDA graph's output is its next replay's
            tokens.append(token)
        _sync(device)
        seconds = time.perf_counter() - started
    return (new_tokens - 1) / seconds, [int(t) for t in tokens]


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peer_section(results: dict, config: DecoderConfig, tensors: dict[str, torch.Tensor],
                 prompt: list[int], recipes: list[str] | None = None,
                 save: Callable[[], None] | None = None) -> None:
    """HF Llama over the same bf16 weights, compiled once (:func:`compiled_decode`): as is
    (bf16) and in each of torchao's recipes (``recipes``: those of PEER_RECIPES to run, all by
    default); batch-1 decode of 128 tokens. ``save`` is called after each recipe (a recipe
    compiles for minutes: what ran is kept if a time limit stops the next)."""
    from kiln.runtime.torch_backend.hf_baseline import hf_model

    try:
        import torchao
        from torchao.quantization import quantize_
        results["torchao"] = torchao.__version__
    except ImportError as e:  # the bf16 peer still runs
        log.warning("torchao is not installed (%s): only the bf16 peer runs", e)
        quantize_ = None
    for recipe, _ in PEER_RECIPES:
        if recipes is not None and recipe not in recipes:
            continue
        if recipe != "bf16" and quantize_ is None:
            continue
        model = None
        try:
            torch._dynamo.reset()
            model = hf_model(config, tensors)  # quantize_ swaps in new weights, views stay
            if recipe != "bf16":
                quantize_(model, torchao_config(recipe))
            started = time.perf_counter()
            skips = _cudagraph_skips()
            tok_s, _ = compiled_decode(model, prompt, 128)
            results[f"peer_{recipe}_tok_s"] = tok_s
            # inductor runs a graph without CUDA graphs where it cannot capture it (it logs why)
            results[f"peer_{recipe}_cudagraph_skips"] = _cudagraph_skips() - skips
            log.info("peer %s (HF, static cache, compiled): %.1f tok/s (%.0f s with compiling; "
                     "CUDA graphs skipped %d times)", recipe, tok_s,
                     time.perf_counter() - started, _cudagraph_skips() - skips)
        except Exception as e:  # noqa: BLE001 - a recipe this torchao cannot run is reported
            log.exception("peer %s failed", recipe)
            results.setdefault("errors", {})[f"peer_{recipe}"] = repr(e)
        finally:
            model = None
            torch.cuda.empty_cache()
            if save is not None:
                save()
