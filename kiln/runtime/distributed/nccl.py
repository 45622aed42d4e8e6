"""An NCCL communicator for the ranks of a process group, as TensorRT's ``set_communicator``
takes it.

Contract: :func:`communicator` is collective over the ``world_size`` ranks that call it with
the same store and key (each on its own GPU, made current first): rank 0 draws an
``ncclUniqueId`` (``ncclGetUniqueId``) and publishes its 128 bytes in the store; every rank
reads them (``Store.get`` waits, up to the store's timeout) and joins with
``ncclCommInitRank``, which returns once every rank has joined. The result,
:class:`Communicator`, holds the ``ncclComm_t`` (``handle``) and a PyCapsule of it
(``capsule``, named ``ncclComm_t`` as in TensorRT's own Python sample); ``abort`` (any thread:
pending operations fail) and ``destroy`` end it.

Why a communicator of its own and not the process group's: torch offers no public way to get
the ``ncclComm_t`` of a ``ProcessGroupNCCL`` (recent versions have a private ``_comm_ptr()``),
and that communicator belongs to torch's own streams and collective order; TensorRT enqueues
its collectives on the executor's stream in its own order. So the engine gets a communicator
over the same ranks, bootstrapped through the same store. docs/engine.md ("The TensorRT
executor's communicator") gives the sources.

NCCL is reached through its C API (ctypes) in ``libnccl.so.2``: the library torch's CUDA build
already loaded (``dlopen`` of the same soname returns it), which TensorRT's DistCollective
layers open too. Nothing here runs without a GPU: tests pass a fake :class:`NcclLibrary`.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from typing import Any

from kiln.engine import EngineError

logger = logging.getLogger(__name__)

UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES (nccl.h)
CAPSULE_NAME = b"ncclComm_t"  # kept alive here: a capsule keeps a pointer to its name


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]


class NcclLibrary:
    """The few NCCL calls a communicator needs, over ``libnccl.so.2`` (ctypes)."""

    def __init__(self, lib: Any):
        self.lib = lib
        lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(_UniqueId)]
        lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                         _UniqueId, ctypes.c_int]
        lib.ncclCommAbort.argtypes = [ctypes.c_void_p]
        lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
        lib.ncclGetErrorString.restype = ctypes.c_char_p

    @classmethod
    def load(cls) -> NcclLibrary:
        try:
            return cls(ctypes.CDLL("libnccl.so.2"))
        except OSError:
            raise EngineError("a tensor-parallel tensorrt engine needs NCCL (libnccl.so.2), which "
                              "is not installed: pip install nvidia-nccl-cu12 (or cu13), or use "
                              "a CUDA build of torch, which brings it") from None

    def _check(self, result: int, call: str) -> None:
        if result != 0:
            reason = self.lib.ncclGetErrorString(result) or b"unknown"
            raise EngineError(f"{call} failed: NCCL error {result} ({reason.decode()})")

    def unique_id(self) -> bytes:
        uid = _UniqueId()
        self._check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return bytes(uid)

    def init_rank(self, unique_id: bytes, rank: int, world_size: int) -> int:
        comm = ctypes.c_void_p()
        uid = _UniqueId.from_buffer_copy(unique_id)
        self._check(self.lib.ncclCommInitRank(ctypes.byref(comm), world_size, uid, rank),
                    f"ncclCommInitRank (rank {rank} of {world_size})")
        return comm.value

    def abort(self, handle: int) -> None:
        self._check(self.lib.ncclCommAbort(handle), "ncclCommAbort")

    def destroy(self, handle: int) -> None:
        self._check(self.lib.ncclCommDestroy(handle), "ncclCommDestroy")


def capsule(handle: int) -> Any:
    """A PyCapsule of the pointer ``handle``, named ``ncclComm_t``."""
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(handle, CAPSULE_NAME, None)


@dataclass
class Communicator:
    """One rank's ncclComm_t (see the module docstring)."""

    handle: int
    rank: int
    world_size: int
    library: NcclLibrary
    capsule: Any = field(init=False)

    def __post_init__(self) -> None:
        self.capsule = capsule(self.handle)

    def abort(self) -> None:
        """Make pending operations fail now (another rank died); the communicator is gone."""
        if self.handle:
            handle, self.handle = self.handle, 0
            self.library.abort(handle)

    def destroy(self) -> None:
        if self.handle:
            handle, self.handle = self.handle, 0
            self.library.destroy(handle)


def communicator(store: Any, key: str, rank: int, world_size: int,
                 library: NcclLibrary | None = None) -> Communicator:
    """This rank's communicator of ``world_size`` ranks (collective; see the module
    docstring). ``store``: a ``torch.distributed.Store`` every rank shares."""
    library = library if library is not None else NcclLibrary.load()
    if rank == 0:
        store.set(key, library.unique_id())
    unique_id = bytes(store.get(key))
    if len(unique_id) != UNIQUE_ID_BYTES:
        raise EngineError(f"store key {key!r} holds {len(unique_id)} bytes, not an ncclUniqueId "
                          f"({UNIQUE_ID_BYTES}); every rank must use a key of its own engine")
    handle = library.init_rank(unique_id, rank, world_size)
    logger.info("NCCL communicator: rank %d of %d", rank, world_size)
    return Communicator(handle, rank, world_size, library)
