"""Shared fixtures: tiny kiln checkpoints per variant and split, made once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.engine import read_manifest
from kiln.reference import ReferenceDecoder
from tests.builder.onnx_steps import StepRunner
from tests.builder.quantized import quantize_checkpoint
from tests.builder.reference_steps import SCHEDULE, ReferenceSteps
from tests.helpers import one_torch_thread  # noqa: F401 (fixture)
from tests.models import hf_model, kiln_checkpoint

# Limits every test build uses (small: tiny models, short schedules).
LIMITS = dict(max_batch_size=4, max_input_len=16, max_seq_len=32)


@pytest.fixture(scope="session", autouse=True)
def tensorrt_in_process():
    """TensorRT parts build in this process here: a spawned worker per build (the production
    path, so that Ctrl-C stops a build at once) costs seconds each. That path is tested by
    test_tensorrt.py::test_isolated_build and tests/test_interrupts.py."""
    from kiln.builder.tensorrt_backend import TensorRTBackend

    TensorRTBackend.isolated = False
    yield
    TensorRTBackend.isolated = True


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(variant, tp=1, pp=1, dtype="auto") -> kiln checkpoint dir (cached)."""
    made: dict[tuple, Path] = {}

    def get(name: str, tp: int = 1, pp: int = 1, dtype: str = "auto") -> Path:
        if (name,) not in made:
            made[(name,)] = hf_model(name, tmp_path_factory.mktemp(f"hf-{name}"))
        key = (name, tp, pp, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"ckpt-{name}-tp{tp}-pp{pp}-{dtype}") / "ckpt"
            made[key] = kiln_checkpoint(made[(name,)], out, tp=tp, pp=pp, dtype=dtype)
        return made[key]
    return get


@pytest.fixture(scope="session")
def quantized(checkpoint, tmp_path_factory):
    """quantized(qformat, tp=1, variant="llama-gqa", kv_cache_dtype=None, lm_head=False) ->
    checkpoint (cached)."""
    made = {}

    def get(qformat: str, tp: int = 1, variant: str = "llama-gqa", kv_cache_dtype=None,
            lm_head: bool = False):
        key = (qformat, tp, variant, kv_cache_dtype, lm_head)
        if key not in made:
            out = tmp_path_factory.mktemp(f"q-{variant}-{qformat}-tp{tp}") / "ckpt"
            made[key] = quantize_checkpoint(checkpoint(variant), out, qformat, tp=tp,
                                            kv_cache_dtype=kv_cache_dtype, lm_head=lm_head)
        return made[key]
    return get


@pytest.fixture(scope="session")
def reference_logits(checkpoint):
    """reference_logits(variant) -> the oracle's logits for SCHEDULE (float32, cached)."""
    made: dict[str, list[np.ndarray]] = {}

    def get(name: str) -> list[np.ndarray]:
        if name not in made:
            steps = ReferenceSteps(ReferenceDecoder.from_checkpoint(checkpoint(name)))
            made[name] = [steps.step(chunks) for chunks in SCHEDULE]
        return made[name]
    return get


def engine_runner(engine_dir: Path) -> StepRunner:
    """A StepRunner over an onnx engine dir's graphs (tp 1: ranks are pipeline stages)."""
    manifest = read_manifest(engine_dir)
    assert manifest.mapping.tp_size == 1
    chain = [[engine_dir / name] for rank in sorted(manifest.rank_files)
             for name in manifest.rank_files[rank] if name.endswith(".onnx")]
    return StepRunner(chain, manifest.decoder, manifest.mapping, manifest.dtype,
                      manifest.limits.max_batch_size, manifest.limits.max_seq_len,
                      gqa=manifest.plugins.get("gqa", False))
