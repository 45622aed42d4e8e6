"""Data-parallel replicas and the TensorRT communicator's NCCL path on CUDA GPUs (opt-in:
``pytest -m gpu``). Written without a GPU run (no device time was left when they were written).

- ``--dp`` on a machine with fewer GPUs than replicas is refused in one line, before anything
  starts; with enough GPUs, each replica (one per GPU) gives one engine's greedy tokens.
- kiln's NCCL communicator (kiln/runtime/distributed/nccl.py, what a tensor-parallel tensorrt
  engine's contexts get) is made through ``libnccl.so.2`` via ctypes: it must be the NCCL torch
  loaded, and a world of one must all-reduce through it.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kiln.builder.api import build
from kiln.runtime import LLM, ExecutorOptions, SamplingParams
from kiln.runtime.distributed import nccl
from tests.models import hf_model, kiln_checkpoint
from tests.runtime.test_distributed_faults import write_char_tokenizer

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    ckpt = kiln_checkpoint(hf_model("llama-gqa", root / "hf"), root / "ckpt")
    build(ckpt, root / "engine", backend="torch", dtype="float32", max_batch_size=2,
          max_input_len=16, max_seq_len=32, max_num_tokens=32)
    write_char_tokenizer(root / "engine")
    return root / "engine"


def test_more_replicas_than_gpus_is_one_line(engine):
    gpus = torch.cuda.device_count()
    result = subprocess.run([sys.executable, "-m", "kiln.cli.main", "run", "--engine_dir",
                             str(engine), "--dp", str(gpus + 1), "--input_text", "Hi"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == (f"error: --dp {gpus + 1} needs {gpus + 1} GPUs (one replica per "
                             f"GPU), and this machine has {gpus} visible; run with --dp {gpus}, "
                             f"or where {gpus + 1} GPUs are visible\n")


def test_one_replica_per_gpu_gives_one_engines_tokens(engine):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    prompts = ["Hi", "The quick", "a", "0123456789"]
    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)
    with LLM(engine, ExecutorOptions(device="cuda")) as one:
        want = [r.token_ids for r in one.generate(prompts, greedy)]
    with LLM(engine, ExecutorOptions(device="cuda", dp=2)) as replicas:
        assert [r.token_ids for r in replicas.generate(prompts, greedy)] == want
        assert min(replicas.core.served) >= 1


def test_the_nccl_communicator_is_torchs_nccl_and_all_reduces():
    library = nccl.NcclLibrary.load()
    version = ctypes.c_int()
    assert library.lib.ncclGetVersion(ctypes.byref(version)) == 0
    major, minor, patch = torch.cuda.nccl.version()[:3]
    assert version.value in (major * 1000 + minor * 100 + patch,
                             major * 10000 + minor * 100 + patch)  # NCCL_VERSION's two forms
    torch.cuda.set_device(0)
    comm = nccl.communicator(dist.HashStore(), "tensorrt/nccl", 0, 1, library)
    x = torch.arange(4, dtype=torch.float32, device="cuda")
    all_reduce = library.lib.ncclAllReduce
    all_reduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                           ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    # ncclFloat32 = 7, ncclSum = 0 (nccl.h)
    assert all_reduce(x.data_ptr(), x.data_ptr(), 4, 7, 0, comm.handle,
                      torch.cuda.current_stream().cuda_stream) == 0
    torch.cuda.synchronize()
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    comm.destroy()
