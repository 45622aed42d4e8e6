"""The TensorRT executor's calls, against a fake ``tensorrt`` module (tests/runtime/
fake_tensorrt.py) injected through ``sys.modules``, with host buffers: the shapes and addresses
it sets, the optimization profile it selects for prefill and decode runs, a False return value
of TensorRT turned into one clear error, the NCCL communicator of a multi-rank engine (given to
every context, bootstrapped through a store, its bytes through NCCL's C API), and the guard
that keeps the driver from waiting forever on a rank that died while the ranks connect.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from kiln.config import DecoderConfig, Mapping
from kiln.engine import BuildLimits, EngineError, EngineManifest
from kiln.runtime.distributed import nccl
from kiln.runtime.errors import WorkerError
from kiln.runtime.executor import SequenceChunk
from tests.runtime.fake_tensorrt import FAKE, engine_file

VOCAB, HIDDEN, KV_HEADS, HEAD_DIM = 32, 8, 2, 4
LIMITS = BuildLimits(max_batch_size=4, max_input_len=16, max_seq_len=24, max_num_tokens=16)
CPU = torch.device("cpu")


@pytest.fixture
def trt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FAKE)
    FAKE.engines.clear()
    return FAKE


def manifest(files: list[str], tp: int = 1) -> EngineManifest:
    decoder = DecoderConfig(architecture="Toy", vocab_size=VOCAB, hidden_size=HIDDEN,
                            num_layers=2, num_heads=4, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                            intermediate_size=HIDDEN, max_position_embeddings=LIMITS.max_seq_len)
    return EngineManifest(backend="tensorrt", backend_version={"tensorrt": FAKE.__version__},
                          targets=("sm90",), decoder=decoder, mapping=Mapping(tp_size=tp),
                          dtype="float32", limits=LIMITS,
                          rank_files={r: tuple(files) for r in range(tp)}, checksums={})


def executor(tmp_path, parts: int = 1, profiles: int = 2, tp: int = 1, communicator=None):
    from kiln.runtime.tensorrt_executor import TensorRTExecutor

    layer_sets = [[0, 1]] if parts == 1 else [[0], [1]]
    paths = [engine_file(tmp_path / f"rank0.part{p}.engine", layers=layers, first=p == 0,
                         last=p == parts - 1, vocab=VOCAB, hidden=HIDDEN, kv_heads=KV_HEADS,
                         head_dim=HEAD_DIM, max_seq_len=LIMITS.max_seq_len,
                         max_batch=LIMITS.max_batch_size,
                         max_seq=min(LIMITS.max_input_len, LIMITS.max_num_tokens),
                         profiles=profiles)
             for p, layers in enumerate(layer_sets)]
    return TensorRTExecutor(paths, manifest([p.name for p in paths], tp), 0, communicator, CPU)


def calls(context, *kinds: str) -> list[tuple]:
    seen = [c for c in context.calls if c[0] in kinds]
    context.calls.clear()
    return seen


def greedy(logits: torch.Tensor) -> list[int]:
    return logits.argmax(-1).tolist()


def test_prefill_and_decode_runs_select_their_profiles_and_set_their_shapes(trt, tmp_path):
    ex = executor(tmp_path)
    context = trt.engines[0].contexts[0]
    context.calls.clear()
    prefill = [SequenceChunk(0, [3, 4, 5], 0), SequenceChunk(1, [7, 8, 9, 10, 11], 0)]
    assert greedy(ex.step(prefill)) == [6, 12]
    cache = (2, KV_HEADS, LIMITS.max_seq_len, HEAD_DIM)
    assert calls(context, "profile", "shape", "execute") == [  # profile 0 is a new context's
        ("shape", "input_ids", (2, 5)), ("shape", "position_ids", (2, 5)),
        ("shape", "past_len", (2,)), ("shape", "last_index", (2,)),
        ("shape", "past_key_0", cache), ("shape", "past_value_0", cache),
        ("shape", "past_key_1", cache), ("shape", "past_value_1", cache), ("execute",)]
    assert context.addresses["present_key_1"] == context.addresses["past_key_1"] == \
        ex._caches["past_key_1"].data_ptr()  # slots [0, 2): the buffer's first row

    decode = [SequenceChunk(0, [6], 3), SequenceChunk(1, [12], 5)]
    assert greedy(ex.step(decode)) == [7, 13]
    seen = calls(context, "profile", "shape", "execute")
    assert seen[0] == ("profile", 1)  # the decode profile, before any shape
    assert seen[1:3] == [("shape", "input_ids", (2, 1)), ("shape", "position_ids", (2, 1))]
    assert greedy(ex.step([SequenceChunk(1, [13], 6)])) == [14]
    seen = calls(context, "profile", "shape")
    assert ("profile", 1) not in seen and seen[0] == ("shape", "input_ids", (1, 1))
    assert context.addresses["past_key_0"] == ex._caches["past_key_0"][1].data_ptr()

    mixed = [SequenceChunk(0, [7], 4), SequenceChunk(2, [1, 2, 3, 4], 0)]
    assert greedy(ex.step(mixed)) == [8, 5]
    seen = calls(context, "profile", "shape", "execute")
    runs = [i for i, c in enumerate(seen) if c == ("execute",)]
    assert seen[:2] == [("shape", "input_ids", (1, 1)), ("shape", "position_ids", (1, 1))]
    assert seen[runs[0] + 1:runs[0] + 3] == [("profile", 0), ("shape", "input_ids", (1, 4))]


def test_every_part_selects_the_profile_and_parts_chain_hidden_states(trt, tmp_path):
    ex = executor(tmp_path, parts=2)
    first, second = (engine.contexts[0] for engine in trt.engines)
    assert greedy(ex.step([SequenceChunk(0, [3, 4], 0), SequenceChunk(3, [9, 8], 0)])) == [5, 9]
    assert greedy(ex.step([SequenceChunk(0, [5], 2), SequenceChunk(3, [9], 2)])) == [6, 10]
    for context in (first, second):
        assert [c for c in context.calls if c[0] == "profile"] == [("profile", 1)]
    assert second.addresses["hidden_in"] == first.addresses["hidden_out"]
    assert ("shape", "hidden_in", (4, 1, HIDDEN)) in second.calls  # slots [0, 4): 4 rows


def test_an_engine_of_one_profile_runs_decode_steps_on_it(trt, tmp_path):
    ex = executor(tmp_path, profiles=1)
    context = trt.engines[0].contexts[0]
    ex.step([SequenceChunk(0, [1, 2], 0)])
    assert greedy(ex.step([SequenceChunk(0, [3], 2)])) == [4]
    assert not [c for c in context.calls if c[0] == "profile"]


@pytest.mark.parametrize("refuse,message", [
    (("shape", "input_ids"),
     "engine part 0: TensorRT refused shape (1, 3) for input 'input_ids' under optimization "
     "profile 0 (it takes (1, 1) to (4, 16)); the engine was built for other limits than its "
     "manifest's: rebuild it"),
    (("address", "present_value_0"),
     "engine part 0: TensorRT refused the address of tensor 'present_value_0' "
     "(set_tensor_address returned False: a name the engine does not have, or a misaligned "
     "buffer); rebuild the engine with this kiln"),
    (("address", "logits"),
     "engine part 0: TensorRT refused the address of tensor 'logits' (set_tensor_address "
     "returned False: a name the engine does not have, or a misaligned buffer); rebuild the "
     "engine with this kiln"),
])
def test_a_false_return_value_is_one_clear_error(trt, tmp_path, refuse, message):
    ex = executor(tmp_path)
    trt.engines[0].refuse.add(refuse)
    with pytest.raises(EngineError) as info:
        ex.step([SequenceChunk(0, [1, 2, 3], 0)])
    assert str(info.value) == message


def test_a_refused_decode_profile_and_a_failed_execution_are_clear_errors(trt, tmp_path):
    ex = executor(tmp_path)
    ex.step([SequenceChunk(0, [1, 2], 0)])
    trt.engines[0].refuse.add(("profile", ""))
    with pytest.raises(EngineError) as info:
        ex.step([SequenceChunk(0, [3], 2)])
    assert str(info.value) == ("engine part 0: TensorRT refused optimization profile 1 of 2 "
                               "(set_optimization_profile_async returned False)")
    trt.engines[0].refuse = {("execute", "")}
    with pytest.raises(RuntimeError, match="execute_async_v3 failed on engine part 0 "
                                           r"\(profile 0\)"):
        ex.step([SequenceChunk(1, [1, 2], 0)])


def test_a_shape_outside_the_active_profile_is_refused_not_run(trt, tmp_path):
    """What the fake refuses by itself, as TensorRT does: a prefill run on the decode profile
    would fail, so the executor must switch back to profile 0 after a decode run."""
    ex = executor(tmp_path)
    ex.step([SequenceChunk(0, [1, 2], 0)])
    ex.step([SequenceChunk(0, [3], 2)])
    context = trt.engines[0].contexts[0]
    assert context.profile == 1
    assert greedy(ex.step([SequenceChunk(1, [5, 6, 7], 0)])) == [8]
    assert context.profile == 0
    assert context.set_optimization_profile_async(1, 0)  # the fake itself: S = 1 only
    assert not context.set_input_shape("input_ids", (1, 3))


class FakeCommunicator:
    def __init__(self):
        self.capsule = object()
        self.destroyed = False

    def destroy(self):
        self.destroyed = True


def test_a_multi_rank_engine_gives_every_context_its_communicator(trt, tmp_path):
    with pytest.raises(EngineError) as info:
        executor(tmp_path, tp=2)
    assert str(info.value).startswith("rank 0 of a tensorrt engine of tp_size 2 needs the NCCL "
                                      "communicator of its ranks")
    comm = FakeCommunicator()
    ex = executor(tmp_path, parts=2, tp=2, communicator=comm)
    for engine in trt.engines[-2:]:
        context = engine.contexts[0]
        assert [c for c in context.calls if c[0] == "communicator"] == [("communicator",
                                                                          comm.capsule)]
    ex.close()
    assert comm.destroyed and not ex.contexts  # the contexts went first
    trt.engines.clear()
    comm = FakeCommunicator()
    ex = executor(tmp_path, tp=1)
    trt.engines[0].refuse.add(("communicator", ""))
    with pytest.raises(EngineError, match="rank 0, engine part 0: TensorRT refused the NCCL "
                                          "communicator"):
        ex.set_communicator(comm)


class FakeNccl:
    """NCCL's C API as ctypes calls it: out-parameters through byref."""

    def __init__(self):
        self.comms: dict[int, tuple[bytes, int, int]] = {}
        self.aborted, self.destroyed = [], []
        self.ncclGetUniqueId = self._unique_id
        self.ncclCommInitRank = lambda *args: self._init_rank(*args)  # a function: argtypes
        self.ncclCommAbort = lambda handle: self.aborted.append(handle) or 0
        self.ncclCommDestroy = lambda handle: self.destroyed.append(handle) or 0
        self.ncclGetErrorString = lambda result: b"invalid argument"

    @staticmethod
    def _unique_id(uid):  # NUL bytes too: all 128 must travel (a c_char array stops at one)
        ctypes.memmove(ctypes.addressof(uid._obj), bytes([0, 7, 0, 9] * 32), 128)
        return 0

    def _init_rank(self, comm, world_size, uid, rank):
        if world_size < 1:
            return 4
        comm._obj.value = 0x1000 + rank
        self.comms[comm._obj.value] = (bytes(uid), rank, world_size)
        return 0


def test_the_communicator_is_bootstrapped_through_the_store(monkeypatch):
    fake = FakeNccl()
    library = nccl.NcclLibrary(fake)
    store = dist.HashStore()
    made = {}
    ranks = [threading.Thread(target=lambda r=r: made.update(
        {r: nccl.communicator(store, "tensorrt/nccl", r, 2, library)})) for r in (1, 0)]
    for thread in ranks:  # rank 1 first: it waits in the store for rank 0's id
        thread.start()
    for thread in ranks:
        thread.join(10)
    assert {c.handle for c in made.values()} == {0x1000, 0x1001}
    ids = {fake.comms[c.handle][0] for c in made.values()}
    assert ids == {bytes([0, 7, 0, 9] * 32)}
    assert [fake.comms[made[r].handle][1:] for r in (0, 1)] == [(0, 2), (1, 2)]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object,
                                                                  ctypes.c_char_p]
    assert get_pointer(made[1].capsule, b"ncclComm_t") == 0x1001
    made[1].abort()
    made[1].destroy()  # already gone with the abort
    made[0].destroy()
    assert fake.aborted == [0x1001] and fake.destroyed == [0x1000]
    with pytest.raises(EngineError, match=r"ncclCommInitRank \(rank 0 of 0\) failed: NCCL "
                                          r"error 4 \(invalid argument\)"):
        library.init_rank(bytes(128), 0, 0)


def test_the_driver_stops_waiting_for_ranks_to_connect_when_one_died():
    from kiln.runtime.distributed.tensorrt_ranks import joined

    class Pool:
        def __init__(self):
            self.checks = 0

        def check(self):
            self.checks += 1
            if self.checks > 3:
                raise WorkerError("rank 1 (tp 1, stage 0) died: killed by SIGKILL")

    never = threading.Event()
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1"):
        joined(Pool(), never.wait)
    assert time.monotonic() - start < 5
    assert joined(Pool(), lambda: 42) == 42


class FakePool:
    """What :class:`TensorRTRanks` asks of its pool, recorded: the messages sent to the workers,
    the faults reported, the shutdown."""

    def __init__(self):
        self.sent, self.faults, self.stopped = [], [], None
        self.failed = False

    def check(self):
        if self.failed:
            raise WorkerError("rank 1 (tp 1, stage 0) died: killed by SIGKILL")

    def send_all(self, message):
        self.check()
        self.sent.append(message)

    def fault(self, cause):
        self.faults.append(str(cause))
        self.failed = True
        return WorkerError("rank 1 (tp 1, stage 0) died: killed by SIGKILL")

    def shutdown(self, kill=False):
        self.stopped = kill


def test_the_tensorrt_driver_sends_each_step_with_the_releases_before_it(trt, tmp_path):
    """Rank 0's share runs on the driver; the workers get each step's plan with the release
    calls since the last step (their row planners must stay rank 0's); an empty step sends
    nothing."""
    from kiln.runtime.distributed.tensorrt_ranks import TensorRTRanks

    pool = FakePool()
    ranks = TensorRTRanks(pool, executor(tmp_path))
    empty = ranks.step_logits([])
    assert empty.last.shape == (0, VOCAB) and empty.last.device == CPU and not pool.sent
    assert greedy(ranks.step([SequenceChunk(0, [3, 4, 5], 0)])) == [6]
    ranks.release(0)
    ranks.release(2)
    assert greedy(ranks.step([SequenceChunk(1, [7, 8], 0), SequenceChunk(0, [1], 0)])) == [9, 2]
    assert pool.sent == [("step", [], [(0, (3, 4, 5), 0, False)]),
                         ("step", [("release", 0), ("release", 2)],
                          [(1, (7, 8), 0, False), (0, (1,), 0, False)])]
    with pytest.raises(RuntimeError, match="cannot return context logits"):
        ranks.step_logits([SequenceChunk(1, [9], 2, context_logits=True)])
    assert len(pool.sent) == 2
    ranks.close()
    assert pool.stopped is False  # asked to exit, not killed
    ranks.close()  # idempotent


def test_a_tensorrt_worker_runs_the_drivers_step_messages(trt, tmp_path):
    """A worker rank serves the driver's step messages on its TensorRT executor as sent (the
    plan alone: tensorrt ranks never take async steps), replaying the releases first."""
    from kiln.runtime.distributed.tensorrt_ranks import TensorRTRanks
    from kiln.runtime.distributed.worker import Worker

    pool = FakePool()
    ranks = TensorRTRanks(pool, executor(tmp_path))
    ranks.step([SequenceChunk(0, [3, 4, 5], 0)])
    ranks.release(0)
    ranks.step([SequenceChunk(1, [7, 8], 0), SequenceChunk(0, [1], 0)])
    ranks.close()

    class End:
        steps = 0

        def stepped(self):
            self.steps += 1

    worker = Worker(End(), groups=None, rank=1)
    worker.executor, worker.delivers = executor(tmp_path), False
    released = []
    release = worker.executor.release
    worker.executor.release = lambda slot: (released.append(slot), release(slot))
    for message in [m for m in pool.sent if m[0] == "step"]:
        worker.step(*message[1:])
    assert worker.end.steps == 2 and released == [0]


def test_a_failed_step_of_rank_0_is_the_pools_error_and_the_ranks_are_killed(trt, tmp_path):
    """A rank that died aborts the engine's communicator, so rank 0's share fails with
    whatever TensorRT raises: the step raises the pool's one-line error; closing kills."""
    from kiln.runtime.distributed.tensorrt_ranks import TensorRTRanks

    pool = FakePool()
    local = executor(tmp_path)
    ranks = TensorRTRanks(pool, local)

    def aborted(chunks):
        raise RuntimeError("ncclCommAbort: the communicator was aborted")
    local.step_logits = aborted
    with pytest.raises(WorkerError, match=r"rank 1 \(tp 1, stage 0\) died"):
        ranks.step([SequenceChunk(0, [3], 0)])
    assert pool.faults == ["ncclCommAbort: the communicator was aborted"]
    with pytest.raises(WorkerError, match="rank 1"):  # every later call
        ranks.step([SequenceChunk(0, [3], 0)])
    ranks.close()
    assert pool.stopped is True
