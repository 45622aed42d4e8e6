"""Quantized checkpoints build: the onnx engines and the graph TensorRT parses reproduce the
oracle on the quantized checkpoint (ReferenceDecoder runs its format's numerics), tp 2 rank
graphs too; a quantized KV cache is refused by both (the torch backend runs it).

Tolerances. The reference computes in float32. float32 builds: 1e-4 absolute, as unquantized
graphs (weights are dequantized exactly; W8A8 activations are quantized from values that agree
to ~1e-7, so a rounding flip, possible in principle, did not occur on this schedule: a flip
would move a logit by about one activation step times a weight row). float16 builds: relative
to the logits' range, 2e-2 for weight-only formats (as unquantized float16 builds) and 5e-2
for W8A8: float16 activations (~1e-3 relative) and the float16 input_scale move values across
int8 / fp8 rounding boundaries, each flip one quantization step (fp8: 1/16 of the value).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import pytest

from kiln.builder import build
from kiln.builder.api import make_plan
from kiln.builder.graph.context import RankWeights
from kiln.builder.graph.decoder import write_part
from kiln.builder.graph.head import CONTEXT_HEAD_PIECES
from kiln.builder.options import BuildOptions
from kiln.builder.plan import plan_rank
from kiln.checkpoint import load_config, rank_file
from kiln.engine import EngineError, read_manifest
from kiln.errors import CheckpointError, ConfigError
from kiln.quantization.config import FORMATS
from kiln.reference import ReferenceDecoder
from kiln.runtime import ExecutorOptions, onnx_executor
from tests.builder.conftest import LIMITS, engine_runner
from tests.builder.onnx_steps import StepRunner
from tests.builder.reference_steps import SCHEDULE, ReferenceSteps

TOL = 1e-4
FP16_REL_TOL = {False: 2e-2, True: 5e-2}  # by W8A8
VARIANT = "llama-gqa"
QFORMATS = sorted(FORMATS)


@dataclass(frozen=True)
class NamedBackend:
    """make_plan needs only the backend's name (the graph's form depends on nothing else)."""

    name: str


@pytest.fixture(scope="session")
def oracle(quantized):
    """oracle(checkpoint) -> the reference's float32 logits over SCHEDULE (cached)."""
    made = {}

    def get(ckpt) -> list[np.ndarray]:
        if ckpt not in made:
            steps = ReferenceSteps(ReferenceDecoder.from_checkpoint(ckpt))
            made[ckpt] = [steps.step(chunks) for chunks in SCHEDULE]
        return made[ckpt]
    return get


def run_schedule(runner: StepRunner) -> list[np.ndarray]:
    return [runner.step(chunks) for chunks in SCHEDULE]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert all(np.isfinite(x).all() for x in a + b), "non-finite logits"
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def assert_close(got, want, dtype: str, w8a8: bool) -> None:
    if dtype == "float32":
        assert max_diff(got, want) <= TOL
    else:
        scale = max(float(np.abs(w).max()) for w in want)
        assert max_diff(got, want) <= FP16_REL_TOL[w8a8] * scale


def op_counts(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_quantization_is_visible(checkpoint, quantized, oracle):
    """The oracle on each quantized checkpoint differs from the float model (so matching it
    checks the quantized form), though not by much."""
    want = oracle(checkpoint(VARIANT))
    for qformat in QFORMATS:
        diff = max_diff(oracle(quantized(qformat)), want)
        assert 10 * TOL < diff < 0.2, qformat


# The optimized onnx graph's kernels per format, float32 (2 layers x qkv, o, gate_up, down).
# int8_sq keeps its Q/DQ nodes: the session that runs it fuses them into the integer kernel
# that is exact on its CPU (kiln.runtime.onnx_executor.session_options).
ONNX_KERNELS = {"int4_wo": {"MatMulNBits": 8}, "int4_awq": {"MatMulNBits": 8},
                "int8_wo": {"MatMulNBits": 8},
                "int8_sq": {"MatMulIntegerToFloat": 0, "QuantizeLinear": 8,
                            "DequantizeLinear": 16},
                "fp8": {"QuantizeLinear": 8, "DequantizeLinear": 16}}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("qformat", QFORMATS)
def test_onnx_engine_matches_reference(quantized, oracle, tmp_path, qformat, dtype):
    ckpt = quantized(qformat)
    result = build(ckpt, tmp_path / "engine", backend="onnx", dtype=dtype, **LIMITS)
    manifest = result.manifest
    assert manifest.quantization == load_config(ckpt).quantization
    assert manifest.plugins["gated_mlp"] is False  # the fused form takes float weights
    if dtype == "float32":
        counts = op_counts(tmp_path / "engine" / "rank0.onnx")
        assert {op: counts.get(op, 0) for op in ONNX_KERNELS[qformat]} == ONNX_KERNELS[qformat]
    got = run_schedule(engine_runner(tmp_path / "engine"))
    assert_close(got, oracle(ckpt), dtype, FORMATS[qformat].activation_dtype is not None)


def tensorrt_graphs(ckpt, directory, dtype: str, targets: tuple[str, ...]) -> StepRunner:
    """The rank graphs exactly as the tensorrt backend emits them, run by ONNX Runtime (tp > 1:
    emulated NCCL, tests/builder/onnx_steps.py)."""
    return _graphs(ckpt, directory, dict(backend="tensorrt", targets=targets, dtype=dtype))


def _graphs(ckpt, directory, options: dict) -> StepRunner:
    config = load_config(ckpt)
    opts = BuildOptions(checkpoint_dir=ckpt, output_dir=directory / "unused", **LIMITS, **options)
    plan = make_plan(opts, config, NamedBackend(opts.backend))
    chain = [[]]
    for rank in range(config.mapping.world_size):
        weights = RankWeights(ckpt / rank_file(rank), plan.dtype)
        (part,) = plan_rank(config, rank, weights, None, 1.0, 0)
        chain[0].append(write_part(plan.graph, part, ckpt / rank_file(rank), directory))
    return StepRunner(chain, config.decoder, config.mapping, plan.dtype,
                      LIMITS["max_batch_size"], LIMITS["max_seq_len"],
                      gqa=plan.graph.plugins.get("gqa", False))


@pytest.mark.parametrize("qformat,dtype", [(q, "float32") for q in QFORMATS]
                         + [("int4_wo", "float16"), ("int8_sq", "float16")])
def test_tensorrt_graph_matches_reference(quantized, oracle, tmp_path, qformat, dtype):
    ckpt = quantized(qformat)
    targets = ("sm89",) if qformat == "fp8" else ("sm86",)
    runner = tensorrt_graphs(ckpt, tmp_path, dtype, targets)
    model = onnx.load(str(tmp_path / "rank0.onnx"), load_external_data=False)
    assert "MatMulNBits" not in {n.op_type for n in model.graph.node}
    assert_close(run_schedule(runner), oracle(ckpt), dtype,
                 FORMATS[qformat].activation_dtype is not None)


@pytest.mark.parametrize("qformat", ["int4_wo", "int8_wo"])
def test_quantized_lm_head(quantized, oracle, tmp_path, qformat):
    """quantize_lm_head: the head's projection in the weight format too (onnx: one more
    MatMulNBits; the graph TensorRT parses: one more DequantizeLinear), matching the oracle,
    whose logits move with the head's rounding."""
    ckpt, plain = quantized(qformat, lm_head=True), quantized(qformat)
    assert 10 * TOL < max_diff(oracle(ckpt), oracle(plain))
    build(ckpt, tmp_path / "engine", backend="onnx", dtype="float32", gather_context_logits=True,
          **LIMITS)
    # the layers' 8, and the head's once per piece of the window (its weight stored once)
    assert op_counts(tmp_path / "engine" / "rank0.onnx")["MatMulNBits"] == 8 + CONTEXT_HEAD_PIECES
    heads = {n.input[1] for n in onnx.load(str(tmp_path / "engine" / "rank0.onnx"),
                                           load_external_data=False).graph.node
             if n.op_type == "MatMulNBits" and "lm_head" in n.name}
    assert len(heads) == 1
    assert_close(run_schedule(engine_runner(tmp_path / "engine")), oracle(ckpt), "float32", False)
    runner = tensorrt_graphs(ckpt, tmp_path, "float32", ("sm86",))
    assert_close(run_schedule(runner), oracle(ckpt), "float32", False)
    tp2 = quantized(qformat, tp=2, variant="mpt", lm_head=True)
    (tmp_path / "tp2").mkdir()
    assert_close(run_schedule(_graphs(tp2, tmp_path / "tp2", dict(backend="tensorrt",
                                                                    targets=("sm86",)))),
                 oracle(tp2), "float32", False)


def test_weight_only_int8_compute(checkpoint, quantized, oracle, tmp_path):
    """--weight_only_int8_compute: MatMulNBits with accuracy_level 4 (int8 activation blocks),
    recorded in the manifest; its logits move off the oracle by about an int8 activation
    step (5e-2 of the logits' range) and no further; refused where it means nothing."""
    ckpt = quantized("int4_wo")
    result = build(ckpt, tmp_path / "engine", backend="onnx", dtype="float32",
                   weight_only_int8_compute=True, **LIMITS)
    assert result.manifest.weight_only_int8_compute
    model = onnx.load(str(tmp_path / "engine" / "rank0.onnx"), load_external_data=False)
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    got, want = run_schedule(engine_runner(tmp_path / "engine")), oracle(ckpt)
    scale = max(float(np.abs(w).max()) for w in want)
    assert TOL < max_diff(got, want) <= 5e-2 * scale
    for source, backend in ((checkpoint(VARIANT), "onnx"), (quantized("int8_sq"), "onnx"),
                            (ckpt, "tensorrt")):
        with pytest.raises(ConfigError, match="weight_only_int8_compute=True applies to onnx"):
            build(source, tmp_path / "refused", backend=backend, weight_only_int8_compute=True,
                  **LIMITS)
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("qformat", ["int4_wo", "int8_sq"])
@pytest.mark.parametrize("backend", ["onnx", "tensorrt"])
def test_tensor_parallel_graphs(quantized, oracle, tmp_path, qformat, backend):
    """tp 2 rank graphs (scales sharded with their weights) reproduce the oracle when run
    with emulated NCCL; the onnx backend itself refuses tp > 1 (no collective op)."""
    ckpt = quantized(qformat, tp=2, variant="mpt")  # 4x GELU MLP: 128 per rank, 4 groups
    options = dict(backend=backend, targets=("sm86",) if backend == "tensorrt" else ("cpu",))
    runner = _graphs(ckpt, tmp_path, options)
    for path in (tmp_path / "rank0.onnx", tmp_path / "rank1.onnx"):
        onnx.checker.check_model(str(path))
    assert_close(run_schedule(runner), oracle(ckpt), "float32", qformat == "int8_sq")


@pytest.mark.parametrize("backend", ["onnx", "tensorrt"])
def test_quantized_kv_cache_refused(quantized, tmp_path, backend):
    """The graph backends refuse it; the torch backend runs it (test_quantized_torch.py)."""
    if backend == "tensorrt":
        pytest.importorskip("tensorrt_rtx")
    ckpt = quantized("int8_wo", kv_cache_dtype="fp8")
    with pytest.raises(EngineError, match="rejects FP8/INT8 caches"):
        build(ckpt, tmp_path / "engine", backend=backend, dtype="float16",
              **({"targets": ["sm89"]} if backend == "tensorrt" else {}), **LIMITS)
    assert not (tmp_path / "engine").exists()


def test_build_memory_counts_quantized_bytes(quantized):
    """The planner counts quantized weights as stored and float tensors (scales too) at the
    build dtype."""
    ckpt = quantized("int4_wo")
    weights = RankWeights(ckpt / rank_file(0), "float16")
    infos = weights.infos
    expected = sum(i.nbytes if i.dtype.itemsize == 1 else i.nbytes // i.dtype.itemsize * 2
                   for i in infos.values())
    assert weights.nbytes(list(infos)) == expected
    packed = [n for n, i in infos.items() if i.dtype.itemsize == 1]
    assert len(packed) == 8 and weights.nbytes(packed) == sum(infos[n].nbytes for n in packed)


def test_groups_split_by_tensor_parallelism_refused(quantized, tmp_path):
    """llama-gqa's intermediate size 96 in groups of 32 cannot be split over 2 ranks (48
    features each): the build names the scale and the fix before writing anything."""
    ckpt = quantized("int4_wo", tp=2)
    with pytest.raises(CheckpointError, match=r"mlp.down.weight_scale has shape .*group_size"):
        build(ckpt, tmp_path / "engine", backend="onnx", **LIMITS)
    assert not (tmp_path / "engine").exists()


def test_run_logs_quantization(quantized, tmp_path, caplog):
    """The manifest carries the checkpoint's quantization record; ``kiln run -v`` logs it
    with the accuracy it records."""
    import dataclasses
    import logging

    from kiln.cli.run import log_quantization
    from kiln.engine import read_manifest

    build(quantized("int4_wo"), tmp_path / "engine", backend="onnx", **LIMITS)
    manifest = read_manifest(tmp_path / "engine")
    assert manifest.quantization == load_config(quantized("int4_wo")).quantization
    accuracy = {"perplexity_source": 10.0, "perplexity_quantized": 10.5, "ppl_ratio": 1.05,
                "top1_agreement": 0.9, "kl_divergence": 0.01, "tokens": 100, "dataset": "x"}
    measured = dataclasses.replace(manifest, quantization=manifest.quantization.with_(
        accuracy=accuracy))
    with caplog.at_level(logging.INFO, logger="kiln.cli.run"):
        log_quantization(manifest)
        log_quantization(measured)
        log_quantization(dataclasses.replace(manifest, quantization=None))
    assert [r.getMessage() for r in caplog.records if r.name == "kiln.cli.run"] == [
        "quantization int4_wo (weights int4, activations float, group_size 32): accuracy not "
        "measured",
        "quantization int4_wo (weights int4, activations float, group_size 32): perplexity "
        "10.0000 -> 10.5000 (ratio 1.0500), top-1 agreement 90.00%, KL 0.01000 over 100 tokens "
        "of x"]


@pytest.mark.parametrize("qformat,options,slow", [("int8_wo", {}, True), ("fp8", {}, True),
                                                  ("int8_wo", {"weight_only_int8_compute": True},
                                                   False), ("int4_wo", {}, False)])
def test_slow_cpu_forms_are_said(quantized, tmp_path, caplog, qformat, options, slow):
    """ONNX Runtime runs 8-bit MatMulNBits in float32 and FP8 Q/DQ around float kernels:
    slower than a float32 engine on a CPU, which the build says at the default level, and the
    load again (trial D ran someone's int8_wo engine at 2.4 tok/s, told nothing)."""
    with caplog.at_level("WARNING", logger="kiln"):
        build(quantized(qformat), tmp_path / "engine", backend="onnx", **LIMITS, **options)
    warned = [r.message for r in caplog.records if "slower than a float32 engine" in r.message]
    assert bool(warned) == slow
    caplog.clear()
    with caplog.at_level("WARNING", logger="kiln"):
        onnx_executor.load_executor(tmp_path / "engine", read_manifest(tmp_path / "engine"),
                                    ExecutorOptions(device="cpu"))
    said = [r.getMessage() for r in caplog.records if "slower than a float32 engine" in r.message]
    assert said == ([f"this engine's {warned[0]}"] if slow else [])


def test_a_refused_build_says_nothing_of_its_speed(quantized, tmp_path, caplog):
    """Trial D's bfloat16 onnx build of int8_wo warned of the slow form, then refused bf16."""
    with caplog.at_level("WARNING", logger="kiln"), pytest.raises(EngineError, match="bfloat16"):
        build(quantized("int8_wo"), tmp_path / "engine", backend="onnx", dtype="bfloat16",
              **LIMITS)
    assert not [r for r in caplog.records if "slower than a float32 engine" in r.message]


def test_the_int8_wo_speed_warning_says_what_the_faster_form_costs(quantized, tmp_path, caplog):
    """A trial took the warning's --weight_only_int8_compute ("fast") and its README answer
    changed: the warning names the numerics it gives up."""
    with caplog.at_level(logging.WARNING, "kiln.builder.api"):
        build(quantized("int8_wo"), tmp_path / "engine", backend="onnx", **LIMITS)
    warning, = [r.message for r in caplog.records if "--weight_only_int8_compute" in r.message]
    assert "no longer the numerics the accuracy gate measured: check it with kiln eval" in warning
