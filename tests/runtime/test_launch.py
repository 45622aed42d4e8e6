"""torchrun's environment as kiln reads it (kiln/runtime/launch.py): when a process is one of
torchrun's ranks, what is refused, in one line."""

from __future__ import annotations

import pytest

from kiln.config import Mapping
from kiln.engine import EngineError
from kiln.runtime.launch import TorchrunEnv, check_launch, is_worker_rank, torchrun_env

TORCHRUN = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


def test_a_world_of_one_or_none_is_not_torchrun():
    assert torchrun_env({}) is None
    assert torchrun_env({**TORCHRUN, "WORLD_SIZE": "1"}) is None


def test_torchruns_variables_are_read():
    env = torchrun_env(TORCHRUN)
    assert env == TorchrunEnv(rank=2, world_size=4, local_rank=0, local_world_size=2,
                              master_addr="node0", master_port=29500)
    assert env.nodes == 2


def test_a_missing_or_malformed_variable_is_named():
    with pytest.raises(EngineError) as missing:
        torchrun_env({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"})
    assert str(missing.value) == (
        "WORLD_SIZE is 4, so kiln runs as one rank of torchrun's processes, and LOCAL_RANK is not "
        "set; start kiln with torchrun, which sets it (or unset WORLD_SIZE to start the ranks "
        "from this process)")
    with pytest.raises(EngineError, match="MASTER_PORT must be a number >= 0, found 'http'"):
        torchrun_env({**TORCHRUN, "MASTER_PORT": "http"})
    with pytest.raises(EngineError, match=r"inconsistent \(RANK 4, WORLD_SIZE 4"):
        torchrun_env({**TORCHRUN, "RANK": "4"})


def test_check_launch_under_torchrun(monkeypatch):
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    check_launch(Mapping(tp_size=2, pp_size=2), "torch", True, 1)  # 4 ranks, 4 processes
    assert is_worker_rank()
    with pytest.raises(EngineError) as one_process:
        check_launch(Mapping(tp_size=1, pp_size=2), "onnx", False, 1)
    assert str(one_process.value) == (
        "this onnx engine runs in 1 process, and torchrun started 4 (WORLD_SIZE 4); launch 1: "
        "torchrun --nnodes 1 --nproc_per_node 1 (its other options as before), or run it "
        "without torchrun")
    with pytest.raises(EngineError, match="launch 8: torchrun --nnodes 2 --nproc_per_node 4 "):
        check_launch(Mapping(tp_size=4, pp_size=2), "torch", True, 1)
    monkeypatch.setenv("RANK", "0")
    assert not is_worker_rank()


def test_nothing_is_checked_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_launch(Mapping(tp_size=2), "torch", True, 4)
    assert not is_worker_rank()
