"""How this process was launched: by itself (the ranks of a multi-process engine are then
spawned by kiln, on this machine), or as one rank of torchrun's processes (on this machine or
several: :mod:`kiln.runtime.distributed.torchrun`).

Contract:
- :func:`torchrun_env`: this process runs under torchrun when ``WORLD_SIZE`` is set and above 1
  (a torchrun of one process, or no torchrun: None, and kiln spawns the ranks itself). Then
  ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` must be
  set too (torchrun sets them all); a missing or malformed one is an
  :class:`~kiln.engine.EngineError` naming it.
- :func:`check_launch` (the loader runs it on every rank, before anything is loaded): under
  torchrun, an engine whose process count differs from ``WORLD_SIZE`` is refused in one line
  naming both numbers and the torchrun node and process counts that fit; so is ``--dp``
  (replicas are processes kiln spawns on one machine, not torchrun's).
- :func:`is_worker_rank`: a torchrun rank other than 0, which serves the driver's engine once
  it opens it, then ends (:func:`kiln.runtime.distributed.pool.start_ranks`).

Torch-free: the loader imports it for every engine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping as EnvMapping
from dataclasses import dataclass

from kiln.config import Mapping
from kiln.engine import EngineError
from kiln.errors import option

REQUIRED = ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TorchrunEnv:
    """The torchrun variables of this process (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def nodes(self) -> int:
        """Nodes of the launch (torchrun starts the same number of processes on each)."""
        return max(1, self.world_size // self.local_world_size)


def torchrun_env(environ: EnvMapping[str, str] | None = None) -> TorchrunEnv | None:
    """This process's :class:`TorchrunEnv`, or None when ``WORLD_SIZE`` is unset or 1."""
    environ = os.environ if environ is None else environ
    if int(_variable(environ, "WORLD_SIZE", "1")) <= 1:
        return None
    values = {name: _variable(environ, name) for name in REQUIRED}
    env = TorchrunEnv(rank=int(values["RANK"]), world_size=int(environ["WORLD_SIZE"]),
                      local_rank=int(values["LOCAL_RANK"]),
                      local_world_size=int(values["LOCAL_WORLD_SIZE"]),
                      master_addr=values["MASTER_ADDR"], master_port=int(values["MASTER_PORT"]))
    if not (0 <= env.rank < env.world_size and 0 <= env.local_rank < env.local_world_size
            and 0 < env.master_port < 2**16):
        raise EngineError(f"torchrun's environment is inconsistent (RANK {env.rank}, WORLD_SIZE "
                          f"{env.world_size}, LOCAL_RANK {env.local_rank}, LOCAL_WORLD_SIZE "
                          f"{env.local_world_size}, MASTER_PORT {env.master_port}); start kiln "
                          f"with torchrun, which sets them")
    return env


def _variable(environ: EnvMapping[str, str], name: str, default: str | None = None) -> str:
    value = environ.get(name, default)
    if value is None or value == "":
        raise EngineError(f"WORLD_SIZE is {environ.get('WORLD_SIZE')}, so kiln runs as one rank "
                          f"of torchrun's processes, and {name} is not set; start kiln with "
                          f"torchrun, which sets it (or unset WORLD_SIZE to start the ranks from "
                          f"this process)")
    if name != "MASTER_ADDR" and not value.isdigit():
        raise EngineError(f"environment variable {name} must be a number >= 0, found {value!r}")
    return value


def check_launch(mapping: Mapping, backend: str, starts_ranks: bool, dp: int) -> None:
    """Under torchrun: the engine runs in ``WORLD_SIZE`` processes (its ranks, one process each,
    when its backend ``starts_ranks``; else one), and ``dp`` is 1. Nothing to check without
    torchrun."""
    env = torchrun_env()
    if env is None:
        return
    if dp > 1:
        raise EngineError(f"{option('dp', dp)} starts its replicas from this process, on this "
                          f"machine, and this process is rank {env.rank} of torchrun's "
                          f"{env.world_size} (WORLD_SIZE); run {option('dp')} without torchrun "
                          f"(one kiln per machine)")
    need = mapping.world_size if starts_ranks else 1
    if need == env.world_size:
        return
    what = (f"{need} processes (tp {mapping.tp_size} x pp {mapping.pp_size}, one per rank)"
            if need > 1 else "1 process")
    nodes = env.nodes if need % env.nodes == 0 else 1
    raise EngineError(f"this {backend} engine runs in {what}, and torchrun started "
                      f"{env.world_size} (WORLD_SIZE {env.world_size}); launch {need}: torchrun "
                      f"--nnodes {nodes} --nproc_per_node {need // nodes} (its other options "
                      f"as before)" + ("" if need > 1 else ", or run it without torchrun"))


def is_worker_rank() -> bool:
    """This process is a torchrun rank other than 0, which serves the driver's engine as a
    worker once it opens it, then exits: a command binds nothing it would never serve there
    (``kiln serve``)."""
    env = torchrun_env()
    return env is not None and env.rank != 0
