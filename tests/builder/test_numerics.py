"""ONNX Runtime running built graphs reproduces the oracle, for every architecture variant,
over prefill, decode and mixed steps, with plugins (fused forms) on and off."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.builder import build
from kiln.checkpoint import load_config
from kiln.config import PositionType, RopeScalingType
from kiln.plugins import PLUGINS
from tests.builder.conftest import LIMITS, engine_runner
from tests.builder.reference_steps import SCHEDULE
from tests.models import VARIANTS

TOL = 1e-4


def run_schedule(runner) -> list[np.ndarray]:
    return [runner.step(chunks) for chunks in SCHEDULE]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def results(request, checkpoint, reference_logits, tmp_path_factory):
    """(decoder, reference logits, {plugins: (manifest, logits)}) for one variant."""
    ckpt = checkpoint(request.param)
    want = reference_logits(request.param)
    out = {}
    for mode in ("auto", "disable"):
        engine = tmp_path_factory.mktemp(f"{request.param}-{mode}") / "engine"
        plugins = dict.fromkeys(PLUGINS, mode)
        result = build(ckpt, engine, backend="onnx", plugins=plugins, **LIMITS)
        out[mode] = (result.manifest, run_schedule(engine_runner(engine)))
    return load_config(ckpt).decoder, want, out


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert all(np.isfinite(x).all() for x in a + b)
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_plugins_resolved(results):
    decoder, _, out = results
    assert out["disable"][0].plugins == dict.fromkeys(PLUGINS, False)
    rope = decoder.position_type is PositionType.ROPE
    static_rope = rope and (decoder.rope_scaling is None
                            or decoder.rope_scaling.type is not RopeScalingType.DYNAMIC)
    assert out["auto"][0].plugins == {
        "attention": True, "kv_cache": True, "norm": True, "gated_mlp": decoder.gated_mlp,
        "rotary": rope, "residual_norm": True,
        "gqa": static_rope and decoder.head_dim % 16 == 0 and not decoder.qk_norm}


@pytest.mark.parametrize("mode", ["auto", "disable"])
def test_matches_reference(results, mode):
    _, want, out = results
    assert max_diff(out[mode][1], want) <= TOL


def test_plugins_on_and_off_agree(results):
    _, _, out = results
    assert max_diff(out["auto"][1], out["disable"][1]) <= TOL


FP16_VARIANTS = ["llama-gqa", "llama-rope-dynamic", "mistral-window", "mpt-clip-scale",
                 "falcon-7b-mqa", "falcon-rw-alibi"]
FP16_REL_TOL = 2e-2


@pytest.mark.parametrize("mode", ["auto", "disable"])
@pytest.mark.parametrize("name", FP16_VARIANTS)
def test_float16_build(checkpoint, reference_logits, tmp_path, name, mode):
    """A float16 build of a float32 checkpoint stays within 2e-2 (relative to the logits'
    range) of the float32 oracle."""
    build(checkpoint(name), tmp_path / "engine", dtype="float16",
          plugins=dict.fromkeys(PLUGINS, mode), **LIMITS)
    got = run_schedule(engine_runner(tmp_path / "engine"))
    want = reference_logits(name)
    scale = max(float(np.abs(w).max()) for w in want)
    assert max_diff(got, want) <= FP16_REL_TOL * scale
