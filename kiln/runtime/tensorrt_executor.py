"""The ``tensorrt`` backend: TensorRT (or TensorRT-RTX) engines over the graph of docs/engine.md.

Contract: :mod:`kiln.runtime.executor`; one executor per rank (one process, one GPU each).

- Loading: the manifest is checked first (:func:`check_machine`: GPU present, compute
  capability targeted, TensorRT-RTX not on Hopper/data-centre Blackwell, one GPU per rank, the
  exact library version). Then each of the rank's ``.engine`` files (parts of consecutive
  layers, in manifest order) is deserialized with the library that built it (``tensorrt_rtx``
  or ``tensorrt``, from ``backend_version``) and gets an execution context.
- Buffers: CUDA tensors allocated through torch. KV caches are one buffer per layer and kind,
  ``[max_batch_size, Hkv, max_seq_len, D]``; a run over slots ``[lo, hi)`` (planned by
  :mod:`kiln.runtime.rows`) binds ``buffer[lo:hi]`` (contiguous) as both ``past_*`` and
  ``present_*``: TensorRT's KV_CACHE_UPDATE layer writes in place. Parts chain
  ``hidden_out`` -> ``hidden_in`` on the device. Every output gets an address (TensorRT needs
  all of them): an engine built with ``--gather_context_logits`` also writes
  ``context_logits`` [B, S, V] into a buffer of its own per run, read back only for the chunks
  that ask (:meth:`TensorRTExecutor.step_logits`).
- Tensor parallelism: :meth:`TensorRTExecutor.set_communicator` hands an NCCL communicator to
  every context (DistCollective layers all-reduce inside the engine); every rank must run the
  same steps. :func:`nccl_communicator` makes one from a shared ``ncclUniqueId``.

Not executed on the development machine (no GPU, no full TensorRT): the API use follows the
TensorRT 10 Python API (``deserialize_cuda_engine``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); only :func:`check_machine` is tested here.

Non-goals: pipeline stages across processes (rebuild with pp_size 1), CUDA graphs.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.engine import EngineError, EngineManifest
from kiln.runtime.compat import MachineInfo, check_tensorrt
from kiln.runtime.executor import Executor, SequenceChunk, StepLogits
from kiln.runtime.loader import ExecutorOptions
from kiln.runtime.rows import Run, SlotRows

logger = logging.getLogger(__name__)


def library_of(manifest: EngineManifest) -> str:
    return "tensorrt_rtx" if "tensorrt_rtx" in manifest.backend_version else "tensorrt"


def check_machine(manifest: EngineManifest, machine: MachineInfo) -> None:
    check_tensorrt(manifest, machine)
    if manifest.mapping.pp_size != 1:
        raise EngineError(f"tensorrt engine has pp_size {manifest.mapping.pp_size}; this runtime "
                          f"runs tensor-parallel ranks only: rebuild with --pp_size 1 (large "
                          f"ranks are split into engine parts within one GPU instead)")


def run_device(manifest: EngineManifest, machine: MachineInfo, options: ExecutorOptions) -> str:
    return "cuda"


def load_executor(engine_dir: Path, manifest: EngineManifest,
                  options: ExecutorOptions) -> TensorRTExecutor:
    files = [Path(engine_dir) / f for f in manifest.rank_files.get(options.rank, ())
             if f.endswith(".engine")]
    if not files:
        raise EngineError(f"{engine_dir}: the manifest lists no .engine file for rank "
                          f"{options.rank}; rebuild with kiln build --backend tensorrt")
    return TensorRTExecutor(files, manifest, options.rank)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
             trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise EngineError(f"engine tensor dtype {dtype} is not supported by kiln's runtime")
    return table[dtype]


class TensorRTExecutor(Executor):
    """TensorRT engines of one rank (see the module docstring)."""

    def __init__(self, engine_files: Sequence[Path], manifest: EngineManifest, rank: int = 0):
        if not torch.cuda.is_available():
            raise EngineError("the tensorrt executor allocates its buffers with torch, and this "
                              "torch has no CUDA: install a CUDA build of torch")
        trt = importlib.import_module(library_of(manifest))
        self.trt = trt
        self.limits = manifest.limits
        self.vocab_size = manifest.decoder.vocab_size
        self.gathers_context_logits = manifest.gather_context_logits
        self.device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engines, self.contexts = [], []
        for path in engine_files:
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(f"{path}: {library_of(manifest)} could not deserialize the "
                                  f"engine (see its log above); rebuild it for this GPU")
            self.engines.append(engine)
            self.contexts.append(engine.create_execution_context())
        self._io = [self._tensors(e) for e in self.engines]
        self.rows = SlotRows(self.limits.max_batch_size, self.limits.max_seq_len)
        self._caches = self._allocate_caches()
        logger.info("tensorrt executor: rank %d, %d engine part(s) on %s", rank,
                    len(self.engines), self.device)

    def _tensors(self, engine: Any) -> dict[str, tuple[bool, torch.dtype, tuple[int, ...]]]:
        """name -> (is_input, dtype, shape with -1 for dynamic dims)."""
        out = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT
            out[name] = (is_input, _torch_dtype(self.trt, engine.get_tensor_dtype(name)),
                         tuple(engine.get_tensor_shape(name)))
        return out

    def _allocate_caches(self) -> dict[str, torch.Tensor]:
        caches = {}
        for io in self._io:
            for name, (is_input, dtype, shape) in io.items():
                if is_input and name.startswith("past_"):
                    hkv, smax, head_dim = shape[1:]
                    if smax != self.limits.max_seq_len:
                        raise EngineError(f"engine cache length {smax} != manifest max_seq_len "
                                          f"{self.limits.max_seq_len}; rebuild the engine dir")
                    caches[name] = torch.zeros((self.limits.max_batch_size, hkv, smax, head_dim),
                                               dtype=dtype, device=self.device)
        return caches

    def set_communicator(self, communicator: Any) -> None:
        """Give every context the rank's NCCL communicator (a capsule of ncclComm_t)."""
        for context in self.contexts:
            if not context.set_communicator(communicator):
                raise EngineError("TensorRT refused the NCCL communicator; check that every rank "
                                  "uses the same tp_size and NCCL is installed (libnccl.so.2)")

    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        return self.step_logits(chunks).last

    def step_logits(self, chunks: Sequence[SequenceChunk]) -> StepLogits:
        if not self.gathers_context_logits and any(c.context_logits for c in chunks):
            return super().step_logits(chunks)  # refuses
        out = torch.empty((len(chunks), self.vocab_size), dtype=torch.float32)
        context: dict[int, torch.Tensor] = {}
        for run in self.rows.plan(chunks):
            wanted = {s: i for s, i in run.chunks.items() if chunks[i].context_logits}
            logits, every = self._execute(run, self.rows.feeds(run, chunks), bool(wanted))
            for slot, index in run.chunks.items():
                out[index] = logits[slot - run.lo]
            for slot, index in wanted.items():  # every: [B, S, V] float32 on the host
                context[index] = every[slot - run.lo, :len(chunks[index].tokens)].clone()
            self.rows.commit(run, chunks)
        return StepLogits(out, context)

    def release(self, slot: int) -> None:
        self.rows.release(slot)

    def _execute(self, run: Run, feeds: dict[str, np.ndarray], want_context: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [rows, V] of the run (host, float32) and, if ``want_context``, its
        context_logits [rows, S, V] (host, float32)."""
        hidden: torch.Tensor | None = None
        extra: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(self.stream):
            for part, context in enumerate(self.contexts):
                keep, extra = self._bind_part(part, context, run, feeds, hidden)
                if not context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError(f"TensorRT execute_async_v3 failed on engine part {part}")
                hidden = keep[-1]
            self.stream.synchronize()
        every = extra.get("context_logits")
        return hidden.float().cpu(), (every.float().cpu() if want_context else None)

    def _bind_part(self, part: int, context: Any, run: Run, feeds: dict[str, np.ndarray],
                   hidden: torch.Tensor | None,
                   ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Set shapes and addresses of one part; returns the tensors to keep alive (its main
        output last) and its other outputs by name (context_logits)."""
        io, keep = self._io[part], []
        for name, (is_input, dtype, _) in io.items():
            if not is_input:
                continue
            if name in feeds:
                tensor = torch.from_numpy(feeds[name]).to(self.device, dtype)
            elif name == "hidden_in":
                tensor = hidden
            elif name.startswith("past_"):
                tensor = self._caches[name][run.lo:run.hi]
                context.set_tensor_address("present_" + name[len("past_"):], tensor.data_ptr())
            else:
                raise EngineError(f"engine input {name!r} is not part of the graph contract "
                                  f"(docs/engine.md); rebuild with this kiln")
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        extra = {}
        if "context_logits" in io:  # after the inputs: its shape [B, S, V] follows theirs
            extra["context_logits"] = self._output(context, io, "context_logits")
        keep.extend(extra.values())
        keep.append(self._output(context, io, "logits" if "logits" in io else "hidden_out"))
        return keep, extra

    def _output(self, context: Any, io: dict, name: str) -> torch.Tensor:
        """A buffer for output ``name`` at the shape the bound inputs give, bound to it."""
        output = torch.empty(tuple(context.get_tensor_shape(name)), dtype=io[name][1],
                             device=self.device)
        context.set_tensor_address(name, output.data_ptr())
        return output

    def close(self) -> None:
        self.contexts.clear()
        self.engines.clear()
        self._caches.clear()


class _NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]  # NCCL_UNIQUE_ID_BYTES


def _nccl() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libnccl.so.2")
    except OSError:
        raise EngineError("tensor parallelism needs NCCL (libnccl.so.2), which is not "
                          "installed: pip install nvidia-nccl-cu12 (or cu13)") from None


def nccl_communicator(unique_id: bytes, rank: int, world_size: int) -> Any:
    """An ncclComm_t for this rank, as the capsule IExecutionContext.set_communicator takes."""
    comm = ctypes.c_void_p()
    uid = _NcclUniqueId()
    uid.internal = unique_id
    if _nccl().ncclCommInitRank(ctypes.byref(comm), world_size, uid, rank) != 0:
        raise EngineError(f"ncclCommInitRank failed for rank {rank} of {world_size}")
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new_capsule(comm.value, None, None)
