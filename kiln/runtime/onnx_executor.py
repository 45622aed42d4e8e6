"""The ``onnx`` backend: ONNX Runtime sessions over the per-rank graph of docs/engine.md.

Contract: :mod:`kiln.runtime.executor`. The graph takes right-padded rows [B, S] and per-layer
caches [B, Hkv, max_seq_len, D]; this executor maps slots to rows and keeps the caches.

KV cache layout: one buffer per layer and kind, ``[max_batch_size, Hkv, max_seq_len, D]`` in
the model dtype; slot s is row s; cache position j holds the key/value of token position j.
A slot's valid length is tracked here (``start + len(tokens)`` after a step, 0 on release).

How a step runs: :mod:`kiln.runtime.rows` plans it into runs over consecutive slots, each
binding the cache block ``buffer[lo:hi]`` as both ``past_*`` and ``present_*`` (ONNX Runtime's
cache scatter then writes in place: no cache is copied per step). Parts of a rank (an engine
split into consecutive layers) and pipeline stages chain ``hidden_out`` -> ``hidden_in``.

The caches are ONNX Runtime OrtValues on the executor's device (CPU, or CUDA with
onnxruntime-gpu: untested here, no GPU on the development machine); a run's window is bound by
pointer (``base + lo * row_bytes``), so views cost nothing on either device.

Engines built with ``--gather_context_logits`` have a second output, ``context_logits``
[B, S, V]: bound to a buffer ONNX Runtime allocates per run (S changes), read back only for
the chunks that ask (:meth:`OnnxExecutor.step_logits`).

Non-goals: tensor parallelism (ONNX Runtime has no all-reduce; the manifest check refuses it).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.engine import EngineError, EngineManifest
from kiln.errors import build_smaller, option
from kiln.interrupts import interruptible
from kiln.quantization.config import slow_on_onnx_cpu
from kiln.runtime.compat import MachineInfo, check_onnx
from kiln.runtime.errors import StepInterrupted
from kiln.runtime.executor import Executor, SequenceChunk, StepLogits
from kiln.runtime.host_memory import available_memory
from kiln.runtime.loader import ExecutorOptions, warn_once
from kiln.runtime.rows import Run, SlotRows
from kiln.sizes import need_and_available

logger = logging.getLogger(__name__)

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}  # the cache inputs'
MAX_WINDOWS = 256  # kept I/O bindings, one per (part, slot window); dropped all at once when full


def check_machine(manifest: EngineManifest, machine: MachineInfo) -> None:
    check_onnx(manifest, machine)
    if manifest.dtype not in _NP_DTYPES:
        raise EngineError(f"onnx engine dtype {manifest.dtype} is not supported by the onnx "
                          f"runtime here (float32, float16): rebuild with --dtype float16")


def check_options(manifest: EngineManifest, machine: MachineInfo,
                  options: ExecutorOptions) -> None:
    """Before the load, and before a ``--model_dir`` engine is built: its KV cache fits in the
    host memory (the load checks again on the graphs' own cache shapes)."""
    _check_cache_memory(manifest, manifest.full_kv_cache_bytes(),
                        run_device(manifest, machine, options))
    parts = len(graph_files(manifest))
    if parts > 1 and options.cpu_spin_wait:  # said by a --dp front for all its replicas
        warn_once(f"cpu_spin_wait with an engine of {parts} parts: each part's idle threads "
                  f"spin on the cores the running part needs (decode 3-5x slower in our "
                  f"runs); leave it out, or pass --no_cpu_spin_wait", logger)
    cores = len(os.sched_getaffinity(0))
    if options.num_threads is not None and options.num_threads > cores:
        # a trial's 64 on 2 cores: the threads contend for them (first token 1 ms -> 103 ms)
        warn_once(f"num_threads {options.num_threads} is more than the {cores} cores this "
                  f"process may use: its threads will wait for each other; leave it out "
                  f"(all cores) or give at most {cores}", logger)


def run_device(manifest: EngineManifest, machine: MachineInfo, options: ExecutorOptions) -> str:
    return _pick_device(options.device, machine.onnxruntime_providers)


def graph_files(manifest: EngineManifest) -> list[str]:
    """The engine's graphs in load order: one session each (pipeline stages and the parts of
    a split rank chained in one process)."""
    return [f for rank in sorted(manifest.rank_files) for f in manifest.rank_files[rank]
            if f.endswith(".onnx")]


def load_executor(engine_dir: Path, manifest: EngineManifest,
                  options: ExecutorOptions) -> OnnxExecutor:
    files = [engine_dir / f for f in graph_files(manifest)]
    if not files:
        raise EngineError(f"{engine_dir}: the manifest lists no .onnx file; rebuild with kiln build")
    return OnnxExecutor(files, manifest, options)


def session_options(num_threads: int | None, spin_wait: bool = False):
    """CPU session options: all optimizations, sequential, ``num_threads`` intra-op threads.

    An int8_sq engine's quantized activations: ONNX Runtime fuses each projection's Q/DQ nodes
    into MatMulIntegerToFloat, and on x86 rewrites the int8 activations to uint8 for its
    u8 x s8 kernels. Those sum pairs of products in 16 bits, which saturate on CPUs without
    VNNI: there the activations stay int8 (:func:`int8_must_stay_int8`), whose kernels are
    exact and much slower (benchmarks/ort_int8_kernels.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    spin = "1" if spin_wait else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if int8_must_stay_int8():
        so.add_session_config_entry("session.qdqisint8allowed", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = num_threads or len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    return so


# x86 CPU flags of instructions that sum u8 x s8 products into 32 bits (no 16-bit saturation)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def int8_must_stay_int8() -> bool:
    """Whether ONNX Runtime must keep int8 activations int8 on this CPU: an x86 CPU without
    VNNI (or one whose flags cannot be read: Linux's /proc/cpuinfo is where they are read),
    where its uint8 kernels saturate. On an H200 machine's Xeon (AVX-512 VNNI, AMX), a
    4096 x 4096 projection took 221 us in the uint8 kernels and 4,377 in the int8 ones, both
    exact; on a 2-core AVX2 machine 698 us off by up to 20% of the values, and 24,929 exact."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False  # ONNX Runtime keeps int8 there itself
    return VNNI_FLAGS.isdisjoint(cpu_flags())


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them in /proc/cpuinfo (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f
                                   if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def _say_slow_kernels(manifest: EngineManifest, device: str) -> None:
    """The build's warning of a slow quantized form, said again where the engine runs (a user
    of someone else's engine never saw the build's), and int8_sq's exact kernels."""
    quant = manifest.quantization
    slow = slow_on_onnx_cpu(quant, manifest.weight_only_int8_compute)
    if device == "cpu" and slow is not None:
        logger.warning("this engine's %s", slow)
    if device == "cpu" and quant is not None and quant.qformat == "int8_sq" \
            and int8_must_stay_int8():
        logger.warning("int8_sq on a CPU without VNNI: ONNX Runtime's fast uint8 kernels "
                       "would saturate here, so its exact int8 kernels run (35x slower per "
                       "projection on a 2-core AVX2 machine: benchmarks/ort_int8_kernels.py); "
                       "a float or int4 engine runs faster on this CPU")


@dataclass
class _Window:
    """A kept I/O binding of one part over slots [lo, hi): caches bound once, and for the last
    part the logits [hi - lo, vocab] in a buffer of their own (no output lookup per step)."""

    binding: Any  # onnxruntime.IOBinding
    logits: Any | None  # onnxruntime.OrtValue


def _check_cache_memory(manifest: EngineManifest, cache_bytes: int, device: str) -> None:
    """Refuse, before allocating, a CPU KV cache that does not fit in the host memory
    available: the OOM killer, or numpy's refusal of a huge array, would otherwise end the load
    with a traceback."""
    available = available_memory() if device == "cpu" else None
    if available is None or cache_bytes <= available:
        return
    limits, (need, have) = manifest.limits, need_and_available(cache_bytes, available)
    raise EngineError(f"this onnx engine's limits (max_seq_len {limits.max_seq_len}, "
                      f"max_batch_size {limits.max_batch_size}) need a KV cache of "
                      f"{need} of host memory, and {have} is available; "
                      f"{build_smaller('max_seq_len', 'max_batch_size')}")


def spin_wait(asked: bool | None, parts: int) -> bool:
    """Whether idle session threads spin (ExecutorOptions.cpu_spin_wait): as asked, else ONNX
    Runtime's default for one part only; with several, each part's session has its own pool,
    and the idle pools spun on the cores the running part needed (3.4-5.6x slower decode in a
    trial)."""
    return parts == 1 if asked is None else asked


def _say_spin_wait(asked: bool | None, parts: int) -> None:
    if parts > 1 and asked is None:  # (asked: warned of by check_options)
        logger.info("onnx executor: %d parts, so idle CPU threads sleep (no spin-wait)", parts)


class OnnxExecutor(Executor):
    """ONNX Runtime executor (see the module docstring)."""

    def __init__(self, graphs: Sequence[Path], manifest: EngineManifest,
                 options: ExecutorOptions | None = None):
        import onnxruntime as ort

        options = options or ExecutorOptions()
        self.limits = manifest.limits
        self.vocab_size = manifest.decoder.vocab_size
        self.gathers_context_logits = manifest.gather_context_logits
        self.device = _pick_device(options.device, ort.get_available_providers())
        self.needs_warm_up = self.device == "cuda"  # the CUDA provider sets up at first use
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
            if self.device == "cuda" else ["CPUExecutionProvider"]
        _say_slow_kernels(manifest, self.device)
        _say_spin_wait(options.cpu_spin_wait, len(graphs))
        so = session_options(options.num_threads, spin_wait(options.cpu_spin_wait, len(graphs)))
        self.sessions = [_session(ort, p, so, providers) for p in graphs]
        # interrupt(): the run under way (its RunOptions) and whether the step is to end
        self._run_lock = threading.Lock()
        self._running: Any = None
        self._interrupted = False
        self._inputs = [{i.name for i in s.get_inputs()} for s in self.sessions]
        self._layers = [sorted(int(n[len("past_key_"):]) for n in names
                               if n.startswith("past_key_")) for names in self._inputs]
        self._dtype = _NP_DTYPES[manifest.dtype]
        shape = self._cache_shape(manifest)
        self.max_seq_len, self._cache_row = shape[2], list(shape[1:])
        self._row_bytes = int(np.prod(shape[1:])) * np.dtype(self._dtype).itemsize
        _check_cache_memory(manifest, 2 * sum(map(len, self._layers)) * shape[0]
                            * self._row_bytes, self.device)
        # Zero-filled (masked positions must hold finite values: 0 * NaN would leak into outputs).
        self._caches = {(kind, i): ort.OrtValue.ortvalue_from_numpy(
                            np.zeros(shape, self._dtype), self.device, 0)
                        for layers in self._layers for i in layers for kind in ("key", "value")}
        self._windows: dict[tuple[int, int, int], _Window] = {}
        self.rows = SlotRows(self.limits.max_batch_size, self.max_seq_len,
                             fresh_prompt_batches=manifest.plugins.get("gqa", False))
        logger.info("onnx executor: %d part(s), %s, %d threads, cache %s x %d layers",
                    len(self.sessions), self.device, so.intra_op_num_threads, shape,
                    len(self._caches) // 2)

    def _cache_shape(self, manifest: EngineManifest) -> tuple[int, int, int, int]:
        """The KV cache's shape, from the graphs' cache inputs, once they are checked against
        the manifest (cache length and dtype, the logits' vocabulary)."""
        first = next(i for i in self.sessions[0].get_inputs() if i.name.startswith("past_key_"))
        hkv, smax, head_dim = first.shape[1:]
        if not all(isinstance(d, int) for d in (hkv, smax, head_dim)):
            raise EngineError(f"graph input {first.name} has shape {first.shape}; the cache "
                              f"dims after the batch must be static (rebuild with kiln build)")
        logits = self.sessions[-1].get_outputs()[0]
        vocab = logits.shape[-1] if logits.name == "logits" else None
        for what, graph, key, value in (
                ("KV cache length", smax, "limits.max_seq_len", self.limits.max_seq_len),
                ("KV cache dtype", _ORT_DTYPES.get(first.type, first.type), "dtype",
                 manifest.dtype),
                ("vocabulary (logits)", vocab, "decoder.vocab_size", self.vocab_size)):
            if graph is not None and graph != value:  # a retest's edits had given tracebacks
                raise EngineError(f"the engine's graphs have a {what} of {graph}, and its "
                                  f"config.json says {key} {value}: the engine dir is "
                                  f"inconsistent; restore the build's config.json if it was "
                                  f"edited, or rebuild with kiln build")
        return (self.limits.max_batch_size, hkv, smax, head_dim)

    # -- the step ----------------------------------------------------------------------------
    def step(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        return self.step_logits(chunks).last

    def step_logits(self, chunks: Sequence[SequenceChunk]) -> StepLogits:
        if not self.gathers_context_logits and any(c.context_logits for c in chunks):
            return super().step_logits(chunks)  # refuses
        out = np.empty((len(chunks), self.vocab_size), np.float32)
        context: dict[int, torch.Tensor] = {}
        try:
            for run in self.rows.plan(chunks):
                logits, window = self._execute(run, self.rows.feeds(run, chunks))
                for slot, index in run.chunks.items():
                    out[index] = logits[slot - run.lo]
                wanted = {s: i for s, i in run.chunks.items() if chunks[i].context_logits}
                if wanted:
                    every = window.binding.get_outputs()[1].numpy()  # context_logits [B, S, V]
                    for slot, index in wanted.items():
                        context[index] = torch.from_numpy(
                            every[slot - run.lo, :len(chunks[index].tokens)].copy())
                self.rows.commit(run, chunks)
        finally:
            self._interrupted = False  # (an interrupt reaches one step: this one, or the next)
        return StepLogits(torch.from_numpy(out), context)

    def interrupt(self) -> None:
        with self._run_lock:
            self._interrupted = True
            if self._running is not None:
                self._running.terminate = True  # checked between the graph's nodes

    def release(self, slot: int) -> None:
        self.rows.release(slot)

    def _execute(self, run: Run, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, _Window]:
        """Logits [rows, V] of the run, and the last part's window (its other outputs)."""
        hidden = None
        for part, session in enumerate(self.sessions):
            window = self._window(part, run)
            for name, value in feeds.items():
                if name in self._inputs[part]:
                    window.binding.bind_cpu_input(name, value)
            if hidden is not None:
                window.binding.bind_ortvalue_input("hidden_in", hidden)
            if window.logits is None:  # a part's hidden_out [B, S, H] changes shape with S
                window.binding.bind_output("hidden_out", self.device, 0)
            elif self.gathers_context_logits:  # so do context_logits [B, S, V]
                window.binding.bind_output("context_logits", self.device, 0)
            self._run(session, window.binding)
            hidden = window.logits if window.logits is not None else \
                window.binding.get_outputs()[0]  # hidden_out, bound first
        return hidden.numpy(), window

    def _run(self, session, binding) -> None:
        """One graph run, which :meth:`interrupt` and Ctrl-C end early: a long window is one
        native call of seconds (:func:`kiln.interrupts.interruptible`). Its rows of the cache
        are then half written, and written again when the step runs again."""
        import onnxruntime as ort

        options = ort.RunOptions()
        # (a run's errors come back as its exception; its log would add "Exiting due to
        # terminate flag" in red to an interrupted one)
        options.log_severity_level = 4
        with self._run_lock:
            if self._interrupted:
                raise StepInterrupted("the step was interrupted before its run began")
            self._running = options
        try:
            interruptible(functools.partial(session.run_with_iobinding, binding, options),
                          self.interrupt)
        except Exception:
            if options.terminate:  # what ONNX Runtime raises says "terminate flag"
                raise StepInterrupted("the step was interrupted during its run") from None
            raise
        finally:
            with self._run_lock:
                self._running = None

    def _window(self, part: int, run: Run) -> _Window:
        """The part's I/O binding for the window [lo, hi), kept: a decode step of the same
        slots reuses it (binding 2 x layers caches costs ~1.5 ms per step)."""
        key = (part, run.lo, run.hi)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= MAX_WINDOWS:
                self._windows.clear()
            binding, logits = self.sessions[part].io_binding(), None
            if part == len(self.sessions) - 1:
                import onnxruntime as ort

                logits = ort.OrtValue.ortvalue_from_shape_and_type(
                    [run.rows, self.vocab_size], np.float32, self.device, 0)
                binding.bind_ortvalue_output("logits", logits)
                if self.gathers_context_logits:  # output 1, rebound per run
                    binding.bind_output("context_logits", self.device, 0)
            else:
                binding.bind_output("hidden_out", self.device, 0)
            self._bind_caches(binding, part, run)
            window = self._windows[key] = _Window(binding, logits)
        return window

    def _bind_caches(self, binding, part: int, run: Run) -> None:
        """Bind rows [lo, hi) of each cache as both past (input) and present (output)."""
        shape = [run.hi - run.lo, *self._cache_row]
        offset = run.lo * self._row_bytes
        for layer in self._layers[part]:
            for kind in ("key", "value"):
                ptr = self._caches[(kind, layer)].data_ptr() + offset
                binding.bind_input(f"past_{kind}_{layer}", self.device, 0, self._dtype, shape, ptr)
                binding.bind_output(f"present_{kind}_{layer}", self.device, 0, self._dtype, shape,
                                    ptr)

    def close(self) -> None:
        self._windows.clear()
        self.sessions.clear()
        self._caches.clear()


def _session(ort, path, options, providers):
    """An ONNX Runtime session of one graph file; a file it cannot read (corrupt, though its
    size matched the manifest's: check_files only compares sizes) is one line naming it, as is
    a weights file cut short (an older engine's manifest has no sizes to check)."""
    state = ort.capi.onnxruntime_pybind11_state
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except (state.InvalidProtobuf, state.InvalidGraph) as e:
        raise EngineError(_unloadable(path, e, "the file is corrupt or modified")) from None
    except state.Fail as e:
        if "Deserialize tensor" not in str(e):  # (a retest's had been a 59-line traceback)
            raise
        raise EngineError(_unloadable(path, e, "its weights file is cut short, corrupt or "
                                               "modified")) from None


def _unloadable(path: Path, error: Exception, why: str) -> str:
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"{path}: ONNX Runtime cannot load it ({first}); {why}: check it with kiln verify "
            f"{Path(path).parent}, and rebuild the engine with kiln build")


def _pick_device(device: str, providers: Sequence[str]) -> str:
    has_cuda = "CUDAExecutionProvider" in providers
    if device == "cuda" and not has_cuda:
        raise EngineError(f"device cuda asked, but ONNX Runtime has no CUDAExecutionProvider "
                          f"here: pip install onnxruntime-gpu, or use {option('device', 'cpu')}")
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
        logger.debug("onnx executor: device auto -> %s", device)  # the load logs it too
    return device
