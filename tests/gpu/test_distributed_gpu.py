"""Multi-process torch engines on GPUs (NCCL; one GPU per rank): the CPU tests' claims where
the collectives are NCCL's and the kernels Triton's (tests/runtime/test_distributed.py).

Float32 engines against the tp 1 engine on the same GPU (tensor-parallel ones replaying CUDA
graphs that hold their collectives, as tp 1 replays its own): the same greedy tokens, last-token
logits within 1e-3 (split GEMMs sum in another order than whole ones, and Triton's float32 dots
may round differently from cuBLAS's); a killed worker ends the run within 10 s, even though a
dead NCCL peer does not fail its peers' collectives by itself (the pool aborts them).

With one GPU: the NCCL path with a world of one rank. A tp 1 x pp 1 engine opened on the
multi-rank driver (DistributedExecutor over a pool without workers: an NCCL process group of
one rank, the step plans, the KV-cache size all-reduce, the all-reduce and vocab all-gather of
the tensor-parallel collectives called directly) gives the plain TorchExecutor's greedy tokens
and logits within 1e-5 (float32, the same kernels, CUDA graphs and options on the same GPU).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kiln.builder.api import build
from kiln.runtime.errors import WorkerError
from kiln.runtime.loader import ExecutorOptions, open_engine
from kiln.runtime.torch_backend.executor import TorchExecutorOptions
from tests.models import hf_model, kiln_checkpoint
from tests.runtime.test_distributed import LIMITS, assert_same_outputs, one_rank_twins, run_on_host

pytestmark = pytest.mark.gpu


def _need_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPUs, found {torch.cuda.device_count()}")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    def get(name: str, tp: int, pp: int, dtype: str = "float32"):
        root = tmp_path_factory.mktemp(f"{name}-tp{tp}-pp{pp}-{dtype}")
        ckpt = kiln_checkpoint(hf_model(name, root / "hf"), root / "ckpt", tp=tp, pp=pp)
        build(ckpt, root / "engine", backend="torch", dtype=dtype, **LIMITS)
        return root / "engine"
    return get


@pytest.mark.parametrize("name", ["llama-gqa", "falcon-7b-mqa", "mpt"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_nccl_engines_give_the_tokens_of_tp1(engines, name, tp, pp):
    _need_gpus(tp * pp)
    outs = []
    for layout in ((1, 1), (tp, pp)):
        _, executor = open_engine(engines(name, *layout), ExecutorOptions(device="cuda"))
        try:
            if layout != (1, 1):  # decode steps replay graphs holding the collectives (pp 1)
                assert (executor.local.graphs is not None) == (pp == 1)
            outs.append(run_on_host(executor))
        finally:
            executor.close()
    assert_same_outputs(outs[1], outs[0], 1e-3)


@pytest.mark.parametrize("name", ["llama-mha-headdim-bias", "falcon-40b-gqa"])
def test_a_bfloat16_tp2_engine_gives_the_tokens_of_tp1(engines, name):
    """bfloat16 partial sums summed in float32 and rounded once (as tp 1 rounds): tp 1's
    greedy tokens, logits within 1e-2 (a float32 accumulation order apart; each rank's
    rounded partial had made an 8B-shaped tp 2 leave tp 1's tokens)."""
    _need_gpus(2)
    outs = []
    for tp in (1, 2):
        _, executor = open_engine(engines(name, tp, 1, "bfloat16"), ExecutorOptions(device="cuda"))
        try:
            outs.append(run_on_host(executor))
        finally:
            executor.close()
    assert_same_outputs(outs[1], outs[0], 1e-2)


def test_the_nccl_path_with_one_rank_gives_the_plain_executors_tokens_and_logits(engines):
    _need_gpus(1)
    options = TorchExecutorOptions(collective_timeout_s=60)
    want, got = one_rank_twins(engines("llama-gqa", 1, 1), torch.device("cuda"), options)
    assert_same_outputs(got, want, 1e-5)


def test_a_killed_nccl_worker_ends_the_run_within_seconds(engines):
    _need_gpus(2)
    from kiln.runtime.core import EngineCore
    from kiln.runtime.params import SamplingParams

    _, executor = open_engine(engines("llama-gqa", 2, 1), ExecutorOptions(device="cuda"))
    worker = executor.pool.processes[1]
    core, at = EngineCore(executor), []
    timer = threading.Timer(0.5, lambda: (at.append(time.monotonic()), worker.kill()))
    timer.start()
    try:
        with pytest.raises(WorkerError, match=r"rank 1 \(tp 1, stage 0\) died: killed by SIGKILL"):
            for _ in range(1_000_000):
                if not core.has_work():
                    core.add_request([1, 2, 3], SamplingParams(temperature=0, ignore_eos=True,
                                                               max_tokens=30))
                core.step()
        assert time.monotonic() - at[0] < 10
        assert not worker.is_alive()
    finally:
        timer.cancel()
        executor.close()
