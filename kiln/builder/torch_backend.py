"""The ``torch`` backend: packs each rank's checkpoint tensors into the torch engine files.

The file format (packed layouts, metadata, reading and checking) is the build/run contract
and lives in :mod:`kiln.engine.torch_files`; this module streams a checkpoint rank into it.
Targets: ``cuda`` (Triton kernels, CUDA graphs) and ``cpu`` (PyTorch reference kernels); both
read the same files.

Non-goals: quantized weights, tensor/pipeline-parallel engines (the torch executor runs
tp_size = pp_size = 1; building them is refused here so nobody ships one that cannot run).
"""

from __future__ import annotations

import resource
import time

import torch

from kiln.builder.backends import Backend, BuildPlan, PartJob, PartResult, register_backend
from kiln.checkpoint import rank_file
from kiln.engine import EngineError
from kiln.engine.torch_files import (
    TRANSPOSED_ROLES,
    check_mapping,
    file_metadata,
    file_name,
    pack_tensor,
)
from kiln.roles import parse_name, tensor_names
from kiln.tensorio import StreamingWriter, read_header, read_tensor

TARGETS = ("cuda", "cpu")


@register_backend("torch")
class TorchBackend(Backend):
    memory_factor = 0.0  # tensors stream through one at a time (see base_memory)
    base_memory = 3 << 30  # the largest tensor (an 8B model's embedding is 1 GB), cast copy

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
        check_mapping(plan.checkpoint.mapping, "convert with --tp_size 1 --pp_size 1")
        if plan.checkpoint.quantization is not None:
            raise EngineError(f"the torch backend packs unquantized weights only, found a "
                              f"{plan.checkpoint.quantization.qformat} checkpoint; build it with "
                              f"--backend onnx or tensorrt, or build the unquantized checkpoint")

    def build_part(self, job: PartJob) -> PartResult:
        started = time.perf_counter()
        part, plan = job.part, job.plan
        dtype = getattr(torch, plan.dtype)
        infos, _ = read_header(plan.checkpoint_dir / rank_file(part.rank))
        names = tensor_names(plan.checkpoint.decoder, part.layers, first_stage=part.first,
                             last_stage=part.last)
        transposed = sorted(n for n in names if parse_name(n)[0] in TRANSPOSED_ROLES)
        entries = []
        for name in names:
            shape = infos[name].shape
            entries.append((name, dtype, shape[::-1] if name in transposed else shape))
        out = file_name(part.stem)
        writer = StreamingWriter(job.out_dir / out, entries, file_metadata(transposed))
        for name in names:  # on an error the build removes its whole temporary dir
            writer.write(name, pack_tensor(name, read_tensor(infos[name]), dtype))
        writer.close()
        return PartResult(part=part, files=(out,),
                          seconds={"pack": time.perf_counter() - started},
                          peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
