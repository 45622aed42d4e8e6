"""Test helper: a quantized kiln checkpoint made from a float one, in any qformat and tp size,
before ``kiln quantize`` exists (it only needs kiln.quantization.formats).

Calibration: the float reference decoder runs :data:`CALIBRATION` prompts with an observer
that records each linear input's per-feature maxima; a W8A8 format's ``input_scale`` covers
them. ``pre_quant_scales`` (default o and down) get random smoothing vectors ``p`` in [0.5, 2]:
the stored weight is ``W / p`` (columns), so ``(x * p) @ (W / p).T`` is the float model again
up to quantization. A KV-cache dtype adds ``k_scale``/``v_scale`` from the observed keys and
values. The mapping is rewritten with :func:`kiln.sharding.shard_named` (scales shard with
their weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.checkpoint import CONFIG_NAME, CheckpointConfig, load_config, load_merged, rank_file
from kiln.config import Mapping
from kiln.output_dirs import copy_tokenizer
from kiln.quantization.config import INPUT_SCALE, PRE_QUANT_SCALE, WEIGHT_SCALE, QuantConfig
from kiln.quantization.formats import KV_DTYPES, quantize_weight, scale_from_amax
from kiln.reference import ReferenceDecoder
from kiln.roles import Role, companion, parse_tensor, quantized_roles
from kiln.sharding import shard_named
from kiln.tensorio import write_tensors

CALIBRATION = [[3, 17, 5, 99, 42, 8, 64, 1, 127, 33, 12], [7, 9, 11, 20, 21, 22, 1, 2, 3],
               [40, 41, 50, 51, 60, 61, 70, 71, 80, 81, 90, 91, 100, 101]]
PRE_QUANT_ROLES = (Role.OUT, Role.DOWN)


def observe(ckpt_dir: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-feature |x| maxima of every linear input (and of keys/values) over CALIBRATION."""
    amax: dict[str, torch.Tensor] = {}

    def observer(name: str, x: torch.Tensor) -> None:
        seen = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(dim=0)
        amax[name] = seen if name not in amax else torch.maximum(amax[name], seen)

    ckpt = load_config(ckpt_dir)
    ref = ReferenceDecoder(ckpt.decoder, weights, observer=observer)
    for prompt in CALIBRATION:
        ref.forward(torch.tensor([prompt]))
    return amax


def quantize_checkpoint(src: Path, out: Path, qformat: str, *, tp: int = 1,
                        group_size: int | None = None, kv_cache_dtype: str | None = None,
                        pre_quant: tuple[Role, ...] = PRE_QUANT_ROLES, seed: int = 0,
                        lm_head: bool = False) -> Path:
    """Write the ``qformat`` checkpoint of the tp-1 float checkpoint ``src`` into ``out``."""
    ckpt = load_config(src)
    weights = load_merged(src, ckpt)
    amax = observe(src, weights)
    int4 = qformat.startswith("int4")
    quant = QuantConfig(qformat, group_size=(group_size or 32) if int4 else None,
                        kv_cache_dtype=kv_cache_dtype,
                        pre_quant_scales=tuple(r.value for r in pre_quant),
                        quantize_lm_head=lm_head)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        role, layer, _ = parse_tensor(name)
        if role not in quantized_roles(quant):
            tensors[name] = tensor
            continue
        seen = amax.get(name, torch.zeros(tensor.shape[1]))  # the lm_head's input: unobserved
        tensors.update(_quantized(name, role, layer, tensor, seen, quant, generator))
        if role is Role.QKV and kv_cache_dtype is not None:
            for kind in ("k", "v"):
                seen = amax[f"layers.{layer}.attn.{kind}"].amax()
                tensors[f"layers.{layer}.attn.{kind}_scale"] = \
                    scale_from_amax(seen, KV_DTYPES[kv_cache_dtype])
    config = CheckpointConfig(decoder=ckpt.decoder, mapping=Mapping(tp_size=tp, pp_size=1),
                              dtype=ckpt.dtype, quantization=quant, source=ckpt.source)
    _write(config, tensors, Path(src), Path(out))
    return Path(out)


def _quantized(name: str, role: Role, layer: int, w: torch.Tensor, seen: torch.Tensor,
               quant: QuantConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The weight's stored tensor and its companions."""
    out = {}
    w = w.float()
    if role.value in quant.pre_quant_scales:
        p = torch.rand(w.shape[1], generator=generator) * 1.5 + 0.5
        w = w / p
        seen = seen * p
        out[companion(role, layer, PRE_QUANT_SCALE)] = p
    out[name], out[companion(role, layer, WEIGHT_SCALE)] = quantize_weight(w, quant)
    if quant.activation_dtype is not None:
        out[companion(role, layer, INPUT_SCALE)] = scale_from_amax(seen.amax(),
                                                                   quant.activation_dtype)
    return out


def _write(config: CheckpointConfig, tensors: dict[str, torch.Tensor], src: Path,
           out: Path) -> None:
    out.mkdir(parents=True)
    for rank in range(config.mapping.world_size):
        tp_rank, _ = config.mapping.coords(rank)
        names = config.rank_tensor_names(rank)
        shards = {n: shard_named(n, tensors[n], config.decoder, config.mapping, tp_rank)
                  .contiguous() for n in names}
        write_tensors(out / rank_file(rank), shards)
    (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    copy_tokenizer(src, out)
