"""The ``torch`` backend's engine files: per-rank weights packed in the layouts the torch
executor's kernels use. The builder writes them (:mod:`kiln.builder.torch_backend`), the
runtime reads them (:mod:`kiln.runtime.torch_executor`); both take the format from here.

Files per part: ``<stem>.safetensors`` (``<stem>`` is ``rank{N}`` or ``rank{N}.part{k}``) with
canonical tensor names, the engine dtype, contiguous, and the safetensors metadata
``{"kiln_torch_format": "1", "transposed": "<json list of names stored [in, out]>",
"rank": "<N>", "tp_size": "<T>", "pp_size": "<P>"}`` (:func:`file_metadata`): the rank and the
world it was built for, checked at load (:func:`read_packed`), so files swapped between ranks or
mixed from another build are refused instead of giving wrong text. Files of engines built
before the rank fields existed have none and load unchecked.

Layouts:
- QKV and gate/up stay fused (the checkpoint already stores ``[q | k | v]`` and ``[gate |
  up]`` rows), so each is one matrix product per layer.
- Projections stay ``[out, in]`` unless listed in :data:`TRANSPOSED_ROLES`. cuBLAS consumes
  ``[out, in]`` row-major as its native "TN" product, and for single-token decode each output
  is a contiguous dot product, so transposing pays nothing for these shapes (measured on an
  H100: benchmarks/GPU_NOTES.md). The executor reads the metadata, so a build that transposes
  runs unchanged.

Quantized checkpoints (docs/engine.md, "Quantized projections"): a quantized projection's
weight keeps its stored dtype (float8_e4m3fn or int8 ``[out, in]``), int4 is repacked for the
kernels (:mod:`kiln.plugins.quant_linear.layout`): in 16-bit engines the tensor cores' fragment
order where the shape and group size allow (int32 words), else the split-group layout (uint8);
the metadata's ``int4_layout`` says the engine may hold both (``int4_mma_fragments``; files
of ``int4_split_group`` engines, built before it, hold only uint8 and still load), and every
companion (``weight_scale``, ``input_scale``, ``pre_quant_scale``, the KV-cache
``k_scale``/``v_scale``) stays float32. Other tensors take the engine dtype.

Tensor/pipeline-parallel engines: ``rank{N}`` files hold rank N's checkpoint shards (its
stage's layers, the embedding on the first stage, the final norm and lm_head on the last),
packed the same way; :func:`check_packed` checks a rank's names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from kiln.config import DecoderConfig, Mapping
from kiln.engine.manifest import EngineError
from kiln.plugins.quant_linear.layout import (
    INT4_LAYOUT,
    INT4_LAYOUTS,
    engine_int4,
    engine_int4_entry,
)
from kiln.quantization.config import QuantConfig
from kiln.roles import Role, name_mismatch, parse_tensor, quantized_roles, tensor_names
from kiln.tensorio import read_header, read_tensor

FORMAT = "1"
# Roles stored pre-transposed ([in, out]); see the module docstring for why none is.
TRANSPOSED_ROLES: frozenset[Role] = frozenset()


def file_name(stem: str) -> str:
    """The packed file of one part (``stem``: ``rank{N}`` or ``rank{N}.part{k}``)."""
    return f"{stem}.safetensors"


def file_metadata(transposed: Iterable[str], quant: QuantConfig | None = None,
                  rank: int = 0, mapping: Mapping | None = None) -> dict[str, str]:
    """The safetensors metadata of a packed file of rank ``rank`` of ``mapping`` (default: a
    single rank) whose ``transposed`` names are ``[in, out]``."""
    mapping = mapping or Mapping()
    metadata = {"kiln_torch_format": FORMAT, "transposed": json.dumps(sorted(transposed)),
                "rank": str(rank), "tp_size": str(mapping.tp_size),
                "pp_size": str(mapping.pp_size)}
    if quant is not None and quant.info.weight_dtype == "int4":
        metadata["int4_layout"] = INT4_LAYOUT
    return metadata


def check_rank(path: Path, metadata: dict[str, str], rank: int, mapping: Mapping) -> None:
    """The file was built for rank ``rank`` of ``mapping`` (unchecked without the fields)."""
    if "rank" not in metadata:
        return  # built before the rank fields (module docstring)
    built = (metadata["rank"], metadata.get("tp_size"), metadata.get("pp_size"))
    if built != (str(rank), str(mapping.tp_size), str(mapping.pp_size)):
        raise EngineError(f"{path}: built as rank {built[0]} of tp {built[1]} x pp {built[2]}, "
                          f"and the manifest lists it for rank {rank} of tp {mapping.tp_size} x "
                          f"pp {mapping.pp_size}: the engine dir's files were renamed, swapped "
                          f"or mixed from another build; rebuild with kiln build --backend torch")


def packed_dtype(name: str, stored: torch.dtype, dtype: torch.dtype,
                 quant: QuantConfig | None) -> torch.dtype:
    """The dtype ``name`` has in the engine file (``stored``: its checkpoint dtype)."""
    if quant is None:
        return dtype
    role, _, kind = parse_tensor(name)
    if kind is not None:
        return torch.float32
    return stored if role in quantized_roles(quant) else dtype


def packed_entry(name: str, stored: torch.dtype, shape: tuple[int, ...], dtype: torch.dtype,
                 quant: QuantConfig | None) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) ``name`` has in the engine file, not transposed (``stored``, ``shape``:
    its checkpoint dtype and shape): an int4 weight may become fragment words."""
    packed = packed_dtype(name, stored, dtype, quant)
    role, _, kind = parse_tensor(name)
    if quant is not None and quant.info.weight_dtype == "int4" and kind is None \
            and role in quantized_roles(quant):
        return engine_int4_entry(shape, quant.group_size, dtype)
    return packed, tuple(shape)


def pack_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype,
                transposed: frozenset[Role] = TRANSPOSED_ROLES,
                quant: QuantConfig | None = None) -> torch.Tensor:
    """One canonical tensor in the packed layout: cast (a quantized weight keeps its dtype, an
    int4 one is repacked; scales stay float32), transposed if its role says so."""
    role, _, kind = parse_tensor(name)
    out = tensor.to(packed_dtype(name, tensor.dtype, dtype, quant))
    if quant is not None and kind is None and role in quantized_roles(quant):
        if quant.info.weight_dtype == "int4":
            out = engine_int4(out, quant.group_size, dtype)
        return out.contiguous()
    if role in transposed:
        out = out.t()
    return out.contiguous()


def pack_weights(tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 transposed: frozenset[Role] = TRANSPOSED_ROLES, quant: QuantConfig | None = None,
                 ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Pack a whole rank in memory (benchmarks, tests): (tensors, names stored transposed)."""
    packed = {name: pack_tensor(name, t, dtype, transposed, quant)
              for name, t in tensors.items()}
    names = frozenset(n for n in packed if parse_tensor(n)[0] in transposed
                      and packed[n].dtype == dtype)
    return packed, names


def read_packed(path: Path, device: torch.device, quant: QuantConfig | None = None,
                rank: int | None = None, mapping: Mapping | None = None,
                ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Load one packed file onto ``device``: (tensors, names stored transposed). With
    ``rank``: check that it was built for that rank of ``mapping`` (default: a single rank)."""
    infos, metadata = read_header(path, "rebuild the engine (kiln build), or copy it again")
    if metadata.get("kiln_torch_format") != FORMAT:
        raise EngineError(f"{path}: not a kiln torch engine file of format {FORMAT} (found "
                          f"{metadata.get('kiln_torch_format')!r}); rebuild with kiln build "
                          f"--backend torch")
    want = file_metadata((), quant).get("int4_layout")
    found = metadata.get("int4_layout")
    if (want is None) != (found is None) or (found is not None and found not in INT4_LAYOUTS):
        raise EngineError(f"{path}: int4 layout {found!r}, this kiln reads "
                          f"{' or '.join(map(repr, INT4_LAYOUTS)) if want else None}; rebuild "
                          f"with kiln build --backend torch")
    if rank is not None:
        check_rank(path, metadata, rank, mapping or Mapping())
    tensors = {name: read_tensor(info).to(device) for name, info in infos.items()}
    return tensors, frozenset(json.loads(metadata.get("transposed", "[]")))


def check_packed(config: DecoderConfig, tensors: dict[str, torch.Tensor], where: str,
                 quant: QuantConfig | None = None, mapping: Mapping | None = None,
                 rank: int = 0) -> None:
    """Every tensor rank ``rank`` of ``mapping`` (default: a single rank) needs is there (with
    its scales), nothing else."""
    mapping = mapping or Mapping()
    _, stage = mapping.coords(rank)
    names = tensor_names(config, mapping.stage_layers(stage, config.num_layers),
                         first_stage=stage == 0, last_stage=stage == mapping.pp_size - 1,
                         quant=quant)
    if problem := name_mismatch(names, tensors):
        raise EngineError(f"{where}: packed tensors do not match the manifest's model: "
                          f"{problem}; rebuild with kiln build")
