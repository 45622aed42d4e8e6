"""The ``torch`` backend: per-rank weights packed in the layouts the torch executor's kernels use.

Files per part: ``<stem>.safetensors`` (``<stem>`` is ``rank{N}`` or ``rank{N}.part{k}``) with
canonical tensor names, the engine dtype, contiguous, and the safetensors metadata
``{"kiln_torch_format": "1", "transposed": "<json list of names stored [in, out]>"}``.

Layouts:
- QKV and gate/up stay fused (the checkpoint already stores ``[q | k | v]`` and ``[gate |
  up]`` rows), so each is one matrix product per layer.
- Projections stay ``[out, in]`` unless listed in :data:`TRANSPOSED_ROLES`. cuBLAS consumes
  ``[out, in]`` row-major as its native "TN" product, and for single-token decode each output
  is a contiguous dot product, so transposing pays nothing for these shapes (measured on an
  H100: benchmarks/GPU_NOTES.md). The executor reads the metadata, so a build that transposes
  runs unchanged.
- Targets: ``cuda`` (Triton kernels, CUDA graphs) and ``cpu`` (PyTorch reference kernels);
  both read the same files.

Non-goals: quantized weights, tensor/pipeline-parallel engines (the torch executor runs
tp_size = pp_size = 1; building them is refused here so nobody ships one that cannot run).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from kiln.builder.backends import Backend, BuildPlan, PartJob, PartResult, register_backend
from kiln.checkpoint import rank_file
from kiln.config import DecoderConfig
from kiln.engine import EngineError
from kiln.roles import Role, parse_name, tensor_names
from kiln.tensorio import StreamingWriter, read_header, read_tensor

FORMAT = "1"
TARGETS = ("cuda", "cpu")
# Roles stored pre-transposed ([in, out]); see the module docstring for why none is.
TRANSPOSED_ROLES: frozenset[Role] = frozenset()


def pack_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype,
                transposed: frozenset[Role] = TRANSPOSED_ROLES) -> torch.Tensor:
    """One canonical tensor in the packed layout: cast, transposed if its role says so."""
    role, _ = parse_name(name)
    out = tensor.to(dtype)
    if role in transposed:
        out = out.t()
    return out.contiguous()


def pack_weights(tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 transposed: frozenset[Role] = TRANSPOSED_ROLES,
                 ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Pack a whole rank in memory (benchmarks, tests): (tensors, names stored transposed)."""
    packed = {name: pack_tensor(name, t, dtype, transposed) for name, t in tensors.items()}
    names = frozenset(n for n in packed if parse_name(n)[0] in transposed)
    return packed, names


def read_packed(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Load one packed file onto ``device``: (tensors, names stored transposed)."""
    infos, metadata = read_header(path)
    if metadata.get("kiln_torch_format") != FORMAT:
        raise EngineError(f"{path}: not a kiln torch engine file of format {FORMAT} (found "
                          f"{metadata.get('kiln_torch_format')!r}); rebuild with kiln build "
                          f"--backend torch")
    tensors = {name: read_tensor(info).to(device) for name, info in infos.items()}
    return tensors, frozenset(json.loads(metadata.get("transposed", "[]")))


def check_packed(config: DecoderConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor a tp_size 1 model needs is there, nothing else."""
    expected = set(tensor_names(config))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise EngineError(f"{where}: packed tensors do not match the manifest's model: missing "
                          f"{missing}, unexpected {unexpected}; rebuild with kiln build")


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
        mapping = plan.checkpoint.mapping
        if mapping.tp_size != 1 or mapping.pp_size != 1:
            raise EngineError(f"the torch executor runs tp_size=1, pp_size=1 engines, found "
                              f"tp_size={mapping.tp_size}, pp_size={mapping.pp_size}; convert "
                              f"with --tp_size 1 --pp_size 1")
        if plan.checkpoint.quantization.get("scheme") is not None:
            raise EngineError("the torch backend packs unquantized weights only; convert "
                              "without quantization")

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
        metadata = {"kiln_torch_format": FORMAT, "transposed": json.dumps(transposed)}
        out = f"{part.stem}.safetensors"
        writer = StreamingWriter(job.out_dir / out, entries, metadata)
        for name in names:  # on an error the build removes its whole temporary dir
            writer.write(name, pack_tensor(name, read_tensor(infos[name]), dtype))
        writer.close()
        return PartResult(part=part, files=(out,),
                          seconds={"pack": time.perf_counter() - started},
                          peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
