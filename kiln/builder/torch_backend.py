"""The ``torch`` backend: packs each rank's checkpoint tensors into the torch engine files.

The file format (packed layouts, metadata, reading and checking) is the build/run contract
and lives in :mod:`kiln.engine.torch_files`; this module streams a checkpoint rank into it.
Targets: ``cuda`` (Triton kernels, CUDA graphs) and ``cpu`` (PyTorch reference kernels); both
read the same files.

Quantized checkpoints of every qformat build (weights keep their stored dtype, int4 is
repacked for the kernels: :mod:`kiln.engine.torch_files`); whether a GPU can run a format
(FP8 needs sm89+) is decided at load, where the GPU is known.

Tensor/pipeline-parallel checkpoints build one file per rank (its shards, its stage's
layers); the runtime runs them with one process per rank (:mod:`kiln.runtime.distributed`).
"""

from __future__ import annotations

import resource
import time

import torch

from kiln.builder.backends import Backend, BuildPlan, PartJob, PartResult, register_backend
from kiln.checkpoint import REWRITE, cast_checked, rank_file, read_checked
from kiln.engine import EngineError
from kiln.engine.torch_files import (
    TRANSPOSED_ROLES,
    file_metadata,
    file_name,
    pack_tensor,
    packed_dtype,
    packed_entry,
)
from kiln.errors import option
from kiln.plugins.quant_linear.layout import INT4_GROUP_SIZES
from kiln.roles import parse_tensor, tensor_names
from kiln.tensorio import StreamingWriter, read_header

TARGETS = ("cuda", "cpu")


@register_backend("torch")
class TorchBackend(Backend):
    # Tensors stream through one at a time: the largest as read, its cast and its transposed
    # (or packed) copy; the libraries. SmolLM2 float32 (a 113 MB embedding): 366 MB peak RSS,
    # 226 MB of it the imports; the model says 759 MB.
    memory_factor = 0.0
    tensor_copies = 2
    base_memory = 400 << 20

    def versions(self) -> dict[str, str]:
        versions = {"torch": torch.__version__}
        try:
            import triton
            versions["triton"] = triton.__version__
        except ImportError:
            pass
        return versions

    def default_targets(self, dtype: str) -> tuple[str, ...]:
        return TARGETS

    def check(self, plan: BuildPlan) -> None:
        unknown = sorted(set(plan.targets) - set(TARGETS))
        if unknown:
            raise EngineError(f"the torch backend builds for targets {', '.join(TARGETS)}; "
                              f"found {', '.join(unknown)}")
        quant = plan.checkpoint.quantization
        if quant is not None and quant.info.weight_dtype == "int4" \
                and quant.group_size not in INT4_GROUP_SIZES:
            sizes = sorted(INT4_GROUP_SIZES, reverse=True)
            raise EngineError(f"the torch backend's int4 kernels read group sizes "
                              f"{', '.join(map(str, INT4_GROUP_SIZES))}, this checkpoint has "
                              f"group_size {quant.group_size}; quantize again with "
                              f"{option('group_size', sizes[0])}"
                              + (f" (or {', '.join(map(str, sizes[1:]))})" if sizes[1:] else ""))

    def build_part(self, job: PartJob) -> PartResult:
        started = time.perf_counter()
        part, plan = job.part, job.plan
        dtype = getattr(torch, plan.dtype)
        quant = plan.checkpoint.quantization
        infos, _ = read_header(plan.checkpoint_dir / rank_file(part.rank), REWRITE)
        names = tensor_names(plan.checkpoint.decoder, part.layers, first_stage=part.first,
                             last_stage=part.last, quant=quant)
        entries, transposed = [], []
        for name in names:
            info = infos[name]
            packed, shape = packed_entry(name, info.dtype, info.shape, dtype, quant)
            if packed == dtype and parse_tensor(name)[0] in TRANSPOSED_ROLES:
                transposed.append(name)
                entries.append((name, packed, shape[::-1]))
            else:  # an int4 weight: [out, in / 2] bytes or [out / 16, in / 64, 32, 4] words
                entries.append((name, packed, shape))
        out = file_name(part.stem)
        metadata = file_metadata(transposed, quant, part.rank, plan.checkpoint.mapping)
        writer = StreamingWriter(job.out_dir / out, entries, metadata)
        for name in names:  # on an error the build removes its whole temporary dir
            info = infos[name]
            tensor = cast_checked(name, info, read_checked(name, info),
                                  packed_dtype(name, info.dtype, dtype, quant))
            writer.write(name, pack_tensor(name, tensor, dtype, quant=quant))
        writer.close()
        return PartResult(part=part, files=(out,),
                          seconds={"pack": time.perf_counter() - started},
                          peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
