"""The ``tensorrt`` backend: TensorRT (or TensorRT-RTX) engines over the graph of docs/engine.md.

Contract: :mod:`kiln.runtime.executor`; one executor per rank (one process, one GPU each).

- Loading: the manifest is checked first (:func:`check_machine`: GPU present, compute
  capability targeted, TensorRT-RTX not on Hopper/data-centre Blackwell, one GPU per rank, the
  exact library version). Then each of the rank's ``.engine`` files (parts of consecutive
  layers, in manifest order) is deserialized with the library that built it (``tensorrt_rtx``
  or ``tensorrt``, from ``backend_version``) and gets an execution context.
- Optimization profiles (kiln/builder/tensorrt_backend.py builds two): 0 for prefill and mixed
  runs, 1 for decode runs (S = 1, every row one token). Before a run binds its shapes, every
  part's context selects the run's profile (``set_optimization_profile_async`` on the
  executor's stream, called only when the profile changes); an engine with one profile runs
  everything on profile 0.
- Buffers: CUDA tensors allocated through torch. KV caches are one buffer per layer and kind,
  ``[max_batch_size, Hkv, max_seq_len, D]``; a run over slots ``[lo, hi)`` (planned by
  :mod:`kiln.runtime.rows`) binds ``buffer[lo:hi]`` (contiguous) as both ``past_*`` and
  ``present_*``: TensorRT's KV_CACHE_UPDATE layer writes in place. Parts chain
  ``hidden_out`` -> ``hidden_in`` on the device. Every output gets an address (TensorRT needs
  all of them): an engine built with ``--gather_context_logits`` also writes
  ``context_logits`` [B, S, V] into a buffer of its own per run, read back only for the chunks
  that ask (:meth:`TensorRTExecutor.step_logits`).
- Checked calls: TensorRT says that it refused a profile, an input shape, a tensor address, a
  communicator or an execution by returning False (and logging). Every such return value is
  checked; a refusal raises :class:`~kiln.engine.EngineError` naming the call, the tensor and
  shape, the engine part and the profile.
- Tensor parallelism (tp > 1): the DistCollective layers all-reduce (and all-gather the
  vocab-parallel logits) inside the engine, through the NCCL communicator that every context
  gets before the first step (``IExecutionContext.set_communicator``); every rank runs the
  same steps, so every rank holds the whole logits. The communicator is a PyCapsule of an
  ``ncclComm_t`` (what ``set_communicator`` takes: a ``void*``; pybind11 converts a capsule to
  one), made for the engine's ranks by :func:`kiln.runtime.distributed.nccl.communicator`,
  bootstrapped through the torch.distributed store of their process group: torch has no public
  way to hand out the communicator of a ``ProcessGroupNCCL`` (docs/engine.md, "The TensorRT
  executor's communicator", gives the sources). The ranks are processes of a
  :class:`~kiln.runtime.distributed.pool.WorkerPool`, started by
  :class:`~kiln.runtime.distributed.tensorrt_ranks.TensorRTRanks` (:func:`load_executor`).

Not executed on the development machine (no GPU, no full TensorRT): the API use follows the
TensorRT 10 Python API (``deserialize_cuda_engine``, ``set_optimization_profile_async``,
``set_input_shape``, ``set_tensor_address``, ``set_communicator``, ``execute_async_v3``);
tests/runtime/test_tensorrt_executor.py checks the calls against a fake ``tensorrt`` module,
with host buffers (``device="cpu"``: a test seam, TensorRT itself needs CUDA).

Non-goals: pipeline stages across processes (rebuild with pp_size 1), CUDA graphs.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator, Sequence
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

PREFILL_PROFILE, DECODE_PROFILE = 0, 1  # kiln/builder/tensorrt_backend.py profile_ranges
CACHE_INPUTS = ("past_key_", "past_value_")


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


def loaded_ranks(manifest: EngineManifest, rank: int) -> tuple[int, ...]:
    """Every rank: this process starts them all (a single-rank engine: rank 0)."""
    return tuple(range(manifest.mapping.world_size))


def rank_engines(engine_dir: Path, manifest: EngineManifest, rank: int) -> list[Path]:
    """A rank's ``.engine`` files, in chain order."""
    files = [Path(engine_dir) / f for f in manifest.rank_files.get(rank, ())
             if f.endswith(".engine")]
    if not files:
        raise EngineError(f"{engine_dir}: the manifest lists no .engine file for rank "
                          f"{rank}; rebuild with kiln build --backend tensorrt")
    return files


def load_executor(engine_dir: Path, manifest: EngineManifest, options: ExecutorOptions,
                  ) -> Executor:
    """A rank-0 TensorRTExecutor; for tp > 1 the driver of every rank (one process each)."""
    if manifest.mapping.world_size > 1:
        from kiln.runtime.distributed.tensorrt_ranks import TensorRTRanks

        return TensorRTRanks.open(engine_dir, manifest, options)
    return TensorRTExecutor(rank_engines(engine_dir, manifest, 0), manifest)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
             trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise EngineError(f"engine tensor dtype {dtype} is not supported by kiln's runtime")
    return table[dtype]


def cuda_device(rank: int) -> torch.device:
    """Rank ``rank``'s GPU, made current (one GPU per rank)."""
    if not torch.cuda.is_available():
        raise EngineError("the tensorrt executor allocates its buffers with torch, and this "
                          "torch has no CUDA: install a CUDA build of torch")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


class _Stream:
    """The executor's CUDA stream; a null one for host buffers (``device="cpu"``, tests)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def handle(self) -> int:
        return self.cuda.cuda_stream if self.cuda is not None else 0

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        if self.cuda is None:
            yield
            return
        with torch.cuda.stream(self.cuda):
            yield

    def synchronize(self) -> None:
        if self.cuda is not None:
            self.cuda.synchronize()


class TensorRTExecutor(Executor):
    """TensorRT engines of one rank (see the module docstring). ``communicator``: the rank's
    NCCL communicator (:class:`~kiln.runtime.distributed.nccl.Communicator`), required when
    tp > 1; ``device``: the rank's GPU by default (``cpu``: host buffers, for tests)."""

    def __init__(self, engine_files: Sequence[Path], manifest: EngineManifest, rank: int = 0,
                 communicator: Any = None, device: torch.device | None = None):
        trt = importlib.import_module(library_of(manifest))
        self.trt, self.rank = trt, rank
        self.limits = manifest.limits
        self.vocab_size = manifest.decoder.vocab_size
        self.gathers_context_logits = manifest.gather_context_logits
        self.device = device if device is not None else cuda_device(rank)
        self.stream = _Stream(self.device)
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
        self._profiles = [e.num_optimization_profiles for e in self.engines]
        self._active = [PREFILL_PROFILE] * len(self.contexts)  # a new context's profile
        self.rows = SlotRows(self.limits.max_batch_size, self.limits.max_seq_len)
        self._caches = self._allocate_caches()
        self.communicator = None
        tp = manifest.mapping.tp_size
        if tp > 1 and communicator is None:
            raise EngineError(f"rank {rank} of a tensorrt engine of tp_size {tp} needs the NCCL "
                              f"communicator of its ranks (its DistCollective layers all-reduce "
                              f"inside the engine); open the engine with kiln (LLM, kiln run), "
                              f"which starts every rank and makes it")
        if communicator is not None:
            self.set_communicator(communicator)
        logger.info("tensorrt executor: rank %d, %d engine part(s) on %s, profiles %s", rank,
                    len(self.engines), self.device, self._profiles)

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
                if is_input and name.startswith(CACHE_INPUTS):  # not past_len
                    hkv, smax, head_dim = shape[1:]
                    if smax != self.limits.max_seq_len:
                        raise EngineError(f"engine cache length {smax} != manifest max_seq_len "
                                          f"{self.limits.max_seq_len}; rebuild the engine dir")
                    caches[name] = torch.zeros((self.limits.max_batch_size, hkv, smax, head_dim),
                                               dtype=dtype, device=self.device)
        return caches

    def set_communicator(self, communicator: Any) -> None:
        """Give every context the rank's NCCL communicator (its ``capsule``: a PyCapsule of
        the ``ncclComm_t``); it must outlive the contexts, so the executor keeps it."""
        for part, context in enumerate(self.contexts):
            if not context.set_communicator(communicator.capsule):
                raise EngineError(f"rank {self.rank}, engine part {part}: TensorRT refused the "
                                  f"NCCL communicator (set_communicator returned False); check "
                                  f"that every rank runs the same engine dir and that "
                                  f"libnccl.so.2 is the one torch loaded")
        self.communicator = communicator

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
        with self.stream.current():
            for part, context in enumerate(self.contexts):
                profile = self._select_profile(part, context, run)
                keep, extra = self._bind_part(part, context, run, feeds, hidden, profile)
                if not context.execute_async_v3(self.stream.handle):
                    raise RuntimeError(f"TensorRT execute_async_v3 failed on engine part {part} "
                                       f"(profile {profile}); see TensorRT's log above")
                hidden = keep[-1]
            self.stream.synchronize()
        every = extra.get("context_logits")
        return hidden.float().cpu(), (every.float().cpu() if want_context else None)

    def _select_profile(self, part: int, context: Any, run: Run) -> int:
        """The run's profile (decode when S = 1 and the engine has one), selected if needed."""
        profile = DECODE_PROFILE if run.seq == 1 and self._profiles[part] > DECODE_PROFILE \
            else PREFILL_PROFILE
        if self._active[part] != profile:
            if not context.set_optimization_profile_async(profile, self.stream.handle):
                raise EngineError(f"engine part {part}: TensorRT refused optimization profile "
                                  f"{profile} of {self._profiles[part]} "
                                  f"(set_optimization_profile_async returned False)")
            self._active[part] = profile
        return profile

    def _bind_part(self, part: int, context: Any, run: Run, feeds: dict[str, np.ndarray],
                   hidden: torch.Tensor | None, profile: int,
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
            elif name.startswith(CACHE_INPUTS):
                tensor = self._caches[name][run.lo:run.hi]
                self._address(part, context, "present_" + name[len("past_"):], tensor)
            else:
                raise EngineError(f"engine input {name!r} is not part of the graph contract "
                                  f"(docs/engine.md); rebuild with this kiln")
            shape = tuple(tensor.shape)
            if not context.set_input_shape(name, shape):
                raise EngineError(f"engine part {part}: TensorRT refused shape {shape} for input "
                                  f"{name!r} under optimization profile {profile}"
                                  f"{self._profile_range(part, name, profile)}; the engine was "
                                  f"built for other limits than its manifest's: rebuild it")
            self._address(part, context, name, tensor)
            keep.append(tensor)
        extra = {}
        if "context_logits" in io:  # after the inputs: its shape [B, S, V] follows theirs
            extra["context_logits"] = self._output(part, context, "context_logits")
        keep.extend(extra.values())
        keep.append(self._output(part, context, "logits" if "logits" in io else "hidden_out"))
        return keep, extra

    def _profile_range(self, part: int, name: str, profile: int) -> str:
        try:
            low, _, high = self.engines[part].get_tensor_profile_shape(name, profile)
        except Exception:  # noqa: BLE001 - only for the message
            return ""
        return f" (it takes {tuple(low)} to {tuple(high)})"

    def _address(self, part: int, context: Any, name: str, tensor: torch.Tensor) -> None:
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise EngineError(f"engine part {part}: TensorRT refused the address of tensor "
                              f"{name!r} (set_tensor_address returned False: a name the engine "
                              f"does not have, or a misaligned buffer); rebuild the engine "
                              f"with this kiln")

    def _output(self, part: int, context: Any, name: str) -> torch.Tensor:
        """A buffer for output ``name`` at the shape the bound inputs give, bound to it."""
        output = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self._io[part][name][1],
                             device=self.device)
        self._address(part, context, name, output)
        return output

    def close(self) -> None:
        """Free the contexts and engines, then the communicator they used."""
        self.contexts.clear()
        self.engines.clear()
        self._caches.clear()
        if self.communicator is not None:
            self.communicator.destroy()
            self.communicator = None
