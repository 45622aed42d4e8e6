"""Each Triton op inside the model, alone among PyTorch references, on the GPU.

The executor runs once with every plugin op from the references and once with a single op
swapped for its Triton kernel; their logits over a chunked prefill and decode steps must agree.
A failure names the op, so a kernel that is right on random inputs but wrong in the model (a
layout, a stride, a dtype path) is found directly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln.checkpoint import load_config, load_rank
from kiln.engine import BuildLimits
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.torch_backend.executor import TorchExecutor, TorchExecutorOptions
from kiln.runtime.torch_backend.kernels import _OPS, load_kernels
from tests.models import PROMPT, hf_model, kiln_checkpoint

pytestmark = pytest.mark.gpu
LIMITS = BuildLimits(max_batch_size=2, max_input_len=32, max_seq_len=64, max_num_tokens=32)


@pytest.fixture(scope="module", params=["llama-gqa", "mpt-heads6", "falcon-rw-alibi"])
def ckpt(request, tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    root = tmp_path_factory.mktemp(request.param)
    return kiln_checkpoint(hf_model(request.param, root / "hf"), root / "ckpt")


def run(ckpt, dtype: torch.dtype, op: str | None) -> list[torch.Tensor]:
    config = load_config(ckpt)
    tensors = {k: v.to("cuda", dtype) for k, v in load_rank(ckpt, 0, config).items()}
    ex = TorchExecutor(config.decoder, tensors, LIMITS, device="cuda",
                       options=TorchExecutorOptions(kernels="reference", kv_cache_blocks=8,
                                                    cuda_graphs=False))
    if op is not None:
        triton_op = getattr(load_kernels("triton", ex.device), op)
        ex.model.kernels = dataclasses.replace(ex.model.kernels, **{op: triton_op})
    ex.reserve(0, 30)
    ex.reserve(1, 30)
    out = [ex.step([SequenceChunk(0, PROMPT[:6], 0), SequenceChunk(1, PROMPT, 0)])]
    out.append(ex.step([SequenceChunk(0, PROMPT[6:], 6), SequenceChunk(1, [7], len(PROMPT))]))
    out.append(ex.step([SequenceChunk(1, [9], len(PROMPT) + 1)]))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", sorted(_OPS))
def test_one_triton_op_in_the_model(ckpt, dtype, op):
    want, got = run(ckpt, dtype, None), run(ckpt, dtype, op)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    errors = [float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True)]
    assert max(errors) <= tol, f"{op} ({dtype}): relative error per step {errors}"
