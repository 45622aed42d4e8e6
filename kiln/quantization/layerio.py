"""Layer-at-a-time access to kiln checkpoints: read one layer merged, write a quantized one.

Contract:
- :class:`LayerReader` reads the whole-model (ranks merged) tensors of one decoder layer, or of
  the embedding / head, from any tp/pp checkpoint: nothing else is resident.
- :class:`QuantizedWriter` opens one streaming safetensors writer per rank of the output
  (the input's mapping), with every tensor's name, dtype and rank shape known up front
  (unchanged tensors: as the input stores them; quantized weights and their companions: from
  the format), takes a layer's whole-model tensors and writes each rank's part
  (:func:`kiln.sharding.shard_named`), and copies the embedding and head rank by rank in row
  chunks. :meth:`QuantizedWriter.close` checks every byte was written.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

import torch

from kiln.checkpoint import REWRITE, CheckpointConfig, load_merged, rank_file, read_checked
from kiln.quantization.config import QuantConfig
from kiln.roles import (
    Role,
    expected_shape,
    parse_tensor,
    quantized_roles,
    scale_shape,
    tensor_names,
    tensor_sharding,
)
from kiln.sharding import shard_named, shard_shape
from kiln.tensorio import StreamingWriter, iter_row_chunks, read_header

STORED_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}


class LayerReader:
    """Whole-model tensors of one layer at a time, as float32 on ``device``."""

    def __init__(self, checkpoint_dir: Path, config: CheckpointConfig, device: torch.device):
        self.dir, self.config, self.device = checkpoint_dir, config, device

    def layer_names(self, layer: int) -> list[str]:
        return tensor_names(self.config.decoder, range(layer, layer + 1), first_stage=False,
                            last_stage=False)

    def read(self, names: list[str], float32: bool = True) -> dict[str, torch.Tensor]:
        tensors = load_merged(self.dir, self.config, names=set(names))
        return {n: (t.float() if float32 else t).to(self.device) for n, t in tensors.items()}

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        return self.read(self.layer_names(layer))


def stored_shape(name: str, config: CheckpointConfig, quant: QuantConfig) -> tuple[int, ...]:
    """Whole-model shape of a quantized checkpoint's weight or companion tensor."""
    role, _, kind = parse_tensor(name)
    if kind is not None:
        return scale_shape(role, kind, config.decoder, quant)
    out, k = expected_shape(role, config.decoder)
    return (out, k // 2) if quant.info.weight_dtype == "int4" else (out, k)


class QuantizedWriter:
    """One StreamingWriter per output rank (module docstring)."""

    def __init__(self, out: Path, source_dir: Path, source: CheckpointConfig,
                 target: CheckpointConfig):
        self.source_dir, self.source, self.target = source_dir, source, target
        self.writers: dict[int, StreamingWriter] = {}
        quant = target.quantization
        for rank in range(target.mapping.world_size):
            infos, _ = read_header(source_dir / rank_file(rank), REWRITE)
            tp_rank, _ = target.mapping.coords(rank)
            entries = []
            for name in target.rank_tensor_names(rank):
                role, _, kind = parse_tensor(name)
                if kind is None and role not in quantized_roles(quant):
                    entries.append((name, infos[name].dtype, infos[name].shape))
                    continue
                whole = stored_shape(name, target, quant)
                dtype = torch.float32 if kind else STORED_DTYPES[quant.info.weight_dtype]
                spec = tensor_sharding(role, kind, len(whole))
                entries.append((name, dtype, shard_shape(whole, role, target.decoder,
                                                         target.mapping, tp_rank, spec)))
            meta = {"format": "pt", "kiln_format": "checkpoint", "rank": str(rank)}
            self.writers[rank] = StreamingWriter(out / rank_file(rank), entries, meta)

    def _ranks_of(self, layer: int) -> list[tuple[int, int]]:
        """(tp_rank, rank) of the ranks holding ``layer``: those of its pipeline stage."""
        mapping, layers = self.target.mapping, self.target.decoder.num_layers
        stage = next(s for s in range(mapping.pp_size) if layer in mapping.stage_layers(s, layers))
        return [(t, mapping.rank(t, stage)) for t in range(mapping.tp_size)]

    def write_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Each rank's part of a layer's whole-model tensors."""
        for name, tensor in tensors.items():
            for tp_rank, rank in self._ranks_of(layer):
                part = shard_named(name, tensor, self.target.decoder, self.target.mapping,
                                   tp_rank)
                self.writers[rank].write(name, part.contiguous())

    def write_head(self, tensors: dict[str, torch.Tensor]) -> None:
        """Each last-stage rank's part of the quantized lm_head and its scale (whole-model)."""
        mapping = self.target.mapping
        for name, tensor in tensors.items():
            for tp_rank in range(mapping.tp_size):
                part = shard_named(name, tensor, self.target.decoder, mapping, tp_rank)
                self.writers[mapping.rank(tp_rank, mapping.pp_size - 1)].write(
                    name, part.contiguous())

    def copy_unlayered(self) -> None:
        """The embedding and the head, copied rank by rank in row chunks (the lm_head only
        when it stays unquantized: :meth:`write_head` writes a quantized one)."""
        quantized = quantized_roles(self.target.quantization)
        for rank, name, first, chunk in unlayered_chunks(self.source_dir, self.writers.keys(),
                                                          skip=quantized):
            self.writers[rank].write_rows(name, chunk, first)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def unlayered_chunks(checkpoint_dir: Path, ranks: Iterable[int], skip: Collection[Role] = (),
                     ) -> Iterator[tuple[int, str, int, torch.Tensor]]:
    """(rank, name, first row, rows) of each rank file's tensors outside the layers (the
    embedding and the head; roles in ``skip`` left out), in row chunks as each is read,
    NaN/Inf refused (:func:`~kiln.checkpoint.read_checked`)."""
    for rank in ranks:
        infos, _ = read_header(checkpoint_dir / rank_file(rank), REWRITE)
        for name, info in infos.items():
            role, layer, _ = parse_tensor(name)
            if layer is not None or role in skip:
                continue
            rows = info.shape[0] if info.shape else 1
            for a, b in iter_row_chunks(rows, info.nbytes // max(rows, 1)):
                yield rank, name, a, read_checked(name, info, (a, b) if info.shape else None)
