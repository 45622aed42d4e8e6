"""Random weights for a torch engine's rank, made where they run: performance work on model
shapes whose checkpoints are not at hand or do not fit the disk (a 70B model on a machine whose
disk holds less than its 141 GB), as vLLM's ``load_format="dummy"``.

:func:`random_rank_weights` returns what :func:`kiln.runtime.torch_executor.read_rank` returns
for an engine built from a checkpoint of the manifest's model, format and layout: the same
tensor names, shapes, dtypes, layout (transposed, int4 repacked) and companions, so the
executor runs it unchanged. Every rank makes each whole tensor from a seed of its own (the
seed and the name) and keeps its shard (:func:`kiln.sharding.shard`: vocab padding is zero, as
a build's), so an engine of any layout holds one model: tp 2 of a seed is tp 1 of that seed.
Values: matrices ``N(0, 0.02)`` (the usual initializer), norm weights ``1 + N(0, 0.02)``,
biases ``N(0, 0.02)``; a quantized weight is the quantization of its random float weight by
kiln's own formula (:func:`kiln.quantization.formats.quantize_weight`, whole tensor first, then
sharded with its scales as a quantized checkpoint is); static activation and KV-cache scales map
an amax of :data:`RANDOM_AMAX` onto their type, smoothing factors are 1.

Non-goals: meaningful outputs (the text is noise); calibration.
"""

from __future__ import annotations

import zlib

import torch

from kiln.config import DecoderConfig, Mapping
from kiln.engine.manifest import BuildLimits, EngineManifest
from kiln.engine.torch_files import TRANSPOSED_ROLES, pack_tensor
from kiln.quantization.config import (
    INPUT_SCALE,
    KV_SCALES,
    PRE_QUANT_SCALE,
    WEIGHT_SCALE,
    QuantConfig,
)
from kiln.quantization.formats import KV_DTYPES, quantize_weight, scale_from_amax
from kiln.roles import (
    Role,
    expected_shape,
    parse_tensor,
    quantized_roles,
    tensor_names,
    tensor_sharding,
)
from kiln.sharding import shard

RANDOM_AMAX = 8.0  # activations and KV values a random model's static scales are sized for
STD = 0.02


def random_engine_manifest(decoder: DecoderConfig, mapping: Mapping, dtype: str,
                           limits: BuildLimits, quant: QuantConfig | None = None,
                           ) -> EngineManifest:
    """The manifest of a torch engine that has no files: what :func:`random_rank_weights` and
    ``kiln.runtime.torch_executor.load_executor(..., random_seed=...)`` take (a model's
    DecoderConfig: ``kiln.converters``' ``config_from_hf`` of its config.json)."""
    import kiln
    from kiln.checkpoint import CheckpointConfig
    from kiln.quantization.quantize import check_group_size

    source = CheckpointConfig(decoder=decoder, mapping=mapping, dtype=dtype)  # validates both
    if quant is not None:
        check_group_size(quant.group_size, source)  # as kiln quantize refuses it
    return EngineManifest(backend="torch", backend_version={"torch": torch.__version__},
                          targets=("cuda", "cpu"), decoder=decoder, mapping=mapping,
                          dtype=dtype, limits=limits, rank_files={}, checksums={}, sizes={},
                          quantization=quant, kiln_version=kiln.__version__,
                          source={"random_weights": True})


def random_rank_weights(manifest: EngineManifest, rank: int, device: torch.device,
                        seed: int = 0) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Rank ``rank``'s packed tensors of ``manifest``'s engine with random values, made on
    ``device`` (see the module docstring): (tensors, names stored transposed)."""
    config, mapping, quant = manifest.decoder, manifest.mapping, manifest.quantization
    tp_rank, stage = mapping.coords(rank)
    names = tensor_names(config, mapping.stage_layers(stage, config.num_layers),
                         first_stage=stage == 0, last_stage=stage == mapping.pp_size - 1,
                         quant=quant)
    quantized = quantized_roles(quant) if quant is not None else ()
    dtype = getattr(torch, manifest.dtype)
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, part: torch.Tensor) -> None:
        """Pack a shard at once; a view of a whole tensor would keep all of it alive."""
        packed = pack_tensor(name, part, dtype, quant=quant)
        out[name] = packed.clone() if packed.untyped_storage().nbytes() > packed.nbytes else \
            packed

    for name in names:
        role, layer, kind = parse_tensor(name)
        if kind is not None:
            if kind == WEIGHT_SCALE:
                continue  # made with its weight
            if kind == PRE_QUANT_SCALE:
                _, k = expected_shape(role, config)
                keep(name, shard(torch.ones(k, device=device), role, config, mapping, tp_rank,
                                 tensor_sharding(role, kind, 1)))
            else:  # a static activation or KV-cache scale
                act = quant.activation_dtype if kind == INPUT_SCALE else \
                    KV_DTYPES[quant.kv_cache_dtype]
                assert kind == INPUT_SCALE or kind in KV_SCALES, kind
                keep(name, scale_from_amax(torch.tensor(RANDOM_AMAX, device=device), act))
            continue
        tied = role is Role.LM_HEAD and config.tie_word_embeddings  # a build writes the embedding
        full = _random(Role.EMBED.name() if tied else name, expected_shape(role, config),
                       device, seed)
        if role in quantized:
            stored, scale = quantize_weight(full, quant)
            del full
            keep(name, shard(stored, role, config, mapping, tp_rank,
                             tensor_sharding(role, None, stored.ndim)))
            keep(name.removesuffix("weight") + WEIGHT_SCALE,
                 shard(scale, role, config, mapping, tp_rank,
                       tensor_sharding(role, WEIGHT_SCALE, scale.ndim)))
            del stored, scale
        else:
            keep(name, shard(full, role, config, mapping, tp_rank))
            del full
    transposed = frozenset(n for n in out if parse_tensor(n)[0] in TRANSPOSED_ROLES
                           and out[n].dtype == dtype)  # as pack_weights says
    return out, transposed


def _random(name: str, shape: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    """The whole float32 tensor ``name`` of the model of ``seed`` (the same on every rank)."""
    # 32 bits: the CPU generator (mt19937) keeps only the low 32 bits of a seed
    g = torch.Generator(device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    t = torch.randn(shape, generator=g, device=device).mul_(STD)
    return t.add_(1.0) if name.endswith("norm.weight") else t
