"""TensorRT engines build without a GPU (TensorRT-RTX) for every variant and for tp 2; the
parsed networks hold the fused layers the plugins promise."""

from __future__ import annotations

import importlib.util

import pytest

from kiln.builder import build
from kiln.builder.api import check_rank_files
from kiln.builder.plan import plan_rank
from kiln.builder.tensorrt_backend import TensorRTBackend, check_precision
from kiln.checkpoint import load_config
from kiln.config import PositionType, ResidualType
from kiln.engine import EngineError, read_manifest, verify_files
from kiln.errors import ConfigError
from kiln.plugins import PLUGINS
from kiln.plugins.attention.spec import TRT_HEAD_DIMS, TRT_MIN_HEADS
from kiln.quantization.config import FORMATS, QuantConfig
from tests.builder.conftest import LIMITS
from tests.helpers import save_hf_model
from tests.models import VARIANTS, kiln_checkpoint

if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
    pytest.skip("needs TensorRT: pip install tensorrt-rtx-cu13==1.7.1.116",
                allow_module_level=True)

TRT = dict(backend="tensorrt", dtype="float16", targets=["sm86"], **LIMITS)


def layer_counts(result) -> list[dict[str, int]]:
    return [p.info["layers"] for p in sorted(result.parts, key=lambda p: p.part.rank)]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_builds_every_variant(checkpoint, tmp_path, name):
    result = build(checkpoint(name), tmp_path / "engine", **TRT)
    manifest = read_manifest(tmp_path / "engine")
    assert manifest.backend == "tensorrt" and manifest.targets == ("sm86",)
    assert set(manifest.backend_version) <= {"tensorrt", "tensorrt_rtx"}
    assert manifest.rank_files == {0: ("rank0.engine",)}
    verify_files(tmp_path / "engine", manifest, 0)
    (layers,) = layer_counts(result)
    decoder, n = manifest.decoder, manifest.decoder.num_layers
    assert layers.get("KV_CACHE_UPDATE") == 2 * n
    rope = decoder.position_type is PositionType.ROPE
    assert layers.get("ROTARY_EMBEDDING", 0) == (2 * n if rope else 0)
    fused_attention = decoder.head_dim in TRT_HEAD_DIMS and decoder.num_heads >= TRT_MIN_HEADS
    assert manifest.plugins["attention"] is fused_attention
    assert layers.get("ATTENTION_OUTPUT", 0) == (n if fused_attention else 0)


def test_isolated_build(checkpoint, tmp_path, monkeypatch):
    """The production path: parts build in a spawned worker (so Ctrl-C stops them at once),
    with the same engine and layer report as in-process."""
    monkeypatch.setattr(TensorRTBackend, "isolated", True)
    monkeypatch.setattr(TensorRTBackend, "build_part", None)  # this process must not build
    result = build(checkpoint("llama-gqa"), tmp_path / "engine", **TRT)
    (layers,) = layer_counts(result)
    assert layers.get("KV_CACHE_UPDATE") == 2 * read_manifest(tmp_path / "engine").decoder.num_layers
    verify_files(tmp_path / "engine", read_manifest(tmp_path / "engine"), 0)


def test_plugins_disabled_leave_no_fused_layers(checkpoint, tmp_path):
    result = build(checkpoint("llama-gqa"), tmp_path / "engine",
                   plugins=dict.fromkeys(PLUGINS, "disable"), **TRT)
    (layers,) = layer_counts(result)
    for spec in PLUGINS.values():
        for layer_type in spec.trt_layers:
            assert layer_type not in layers


@pytest.fixture(scope="module")
def wide_tp2(tmp_path_factory):
    """A Llama with 8 query heads (head_dim 16), so each of 2 ranks keeps 4: enough for
    TensorRT's fused attention kernels."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("wide")
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=64)
    hf = save_hf_model(LlamaForCausalLM, config, root / "hf")
    return kiln_checkpoint(hf, root / "ckpt", tp=2)


def assert_tp2_layers(result, fused_attention: bool) -> None:
    manifest = result.manifest
    assert manifest.rank_files == {0: ("rank0.engine",), 1: ("rank1.engine",)}
    assert manifest.plugins["attention"] is fused_attention
    n = manifest.decoder.num_layers
    per_layer = 1 if manifest.decoder.residual is ResidualType.PARALLEL else 2
    for layers in layer_counts(result):
        assert layers["DIST_COLLECTIVE"] == per_layer * n + 1  # + the logits all-gather
        assert layers["KV_CACHE_UPDATE"] == 2 * n
        assert layers["ROTARY_EMBEDDING"] == 2 * n
        assert layers.get("ATTENTION_OUTPUT", 0) == (n if fused_attention else 0)


def test_tensor_parallel_fused_layers(wide_tp2, tmp_path):
    assert_tp2_layers(build(wide_tp2, tmp_path / "engine", **TRT), fused_attention=True)


@pytest.mark.parametrize("name", ["llama-gqa", "falcon-7b-mqa"])
def test_tensor_parallel_few_heads(checkpoint, tmp_path, name):
    # 2 query heads per rank: auto picks the decomposed attention (no TensorRT kernel).
    assert_tp2_layers(build(checkpoint(name, tp=2), tmp_path / "engine", **TRT),
                      fused_attention=False)


def test_memory_budget_splits_into_engines(checkpoint, tmp_path):
    ckpt = checkpoint("llama-gqa")
    weights = check_rank_files(ckpt, load_config(ckpt))[0]
    half = weights.nbytes(list(weights.infos)) // 2  # float32 bytes / 2 = the float16 whole
    budget = int(TensorRTBackend.base_memory + TensorRTBackend.memory_factor * half * 0.6)
    build(ckpt, tmp_path / "engine", max_build_memory=budget, **TRT)
    manifest = read_manifest(tmp_path / "engine")
    assert manifest.rank_files == {0: ("rank0.part0.engine", "rank0.part1.engine")}
    assert len(plan_rank(load_config(ckpt), 0, type(weights)(weights.path, "float16"), budget,
                         TensorRTBackend.memory_factor, TensorRTBackend.base_memory)) == 2


def test_refused_targets(checkpoint, tmp_path):
    ckpt = checkpoint("llama-gqa")
    with pytest.raises(EngineError, match="cannot build for sm90: Hopper"):
        build(ckpt, tmp_path / "a", **{**TRT, "targets": ["sm90"]})
    with pytest.raises(EngineError, match="its targets are"):
        build(ckpt, tmp_path / "b", **{**TRT, "targets": ["sm61"]})
    with pytest.raises(EngineError, match="sm75 has no bfloat16"):
        build(ckpt, tmp_path / "c", **{**TRT, "dtype": "bfloat16", "targets": ["sm75"]})
    # retest 45d: TensorRT-RTX's own refusal came seconds into the build, each GEMM's
    with pytest.raises(EngineError, match=r"TensorRT-RTX has no float32 matrix multiply for "
                                          r"sm75 \(Turing\); build with dtype='float16'"):
        build(ckpt, tmp_path / "d", **{**TRT, "dtype": "float32", "targets": ["sm86", "sm75"]})
    assert not any(tmp_path.iterdir())


def test_fp8_refused_before_ada_and_int4_on_turing():
    """Each names the target among those built for (the defaults, where none was given) and
    what to pass; an int4 checkpoint for sm75 had failed seconds into the build with
    TensorRT-RTX's own error ("HW-specific datatypes: int4", retest 48), and the float32
    advice given before it led there."""
    check_precision(("sm89", "sm120"), "float16", QuantConfig("fp8"))
    check_precision(("sm80", "sm86"), "float16", QuantConfig("int4_awq"))
    check_precision(("sm75", "sm86"), "float16", QuantConfig("int8_wo"))
    with pytest.raises(EngineError, match=r"^target sm86 \(of sm89, sm86\) cannot run the "
                                          r"checkpoint's fp8 quantization \(needs sm89\+: FP8 "
                                          r"tensor cores\); build with targets sm89, sm120 or "
                                          r"sm121, or quantize to an int8/int4 format$"):
        check_precision(("sm89", "sm86"), "float16", QuantConfig("fp8"))
    for qformat in ("int4_wo", "int4_awq"):
        with pytest.raises(EngineError, match=rf"^target sm75 cannot run the checkpoint's "
                                              rf"{qformat} quantization \(needs sm80\+: TensorRT "
                                              rf"compiles no int4 weights for Turing\); build "
                                              rf"with targets sm80 or later, or quantize to "
                                              rf"int8_wo or int8_sq$"):
            check_precision(("sm75",), "float32", QuantConfig(qformat, group_size=64))


def test_fused_attention_refused_in_float32(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"plugins\['attention'\]='enable': TensorRT has no fused "
                                          "attention kernel for float32"):
        build(checkpoint("llama-gqa"), tmp_path / "engine",
              **{**TRT, "dtype": "float32", "plugins": {"attention": "enable"}})
    result = build(checkpoint("llama-gqa"), tmp_path / "engine", **{**TRT, "dtype": "float32"})
    assert result.manifest.plugins["attention"] is False  # auto chose the decomposed form


def test_missing_library(monkeypatch):
    from kiln.builder import tensorrt_backend

    def no_tensorrt(name):
        raise ImportError(name)
    monkeypatch.setattr(tensorrt_backend.importlib, "import_module", no_tensorrt)
    with pytest.raises(EngineError, match="pip install tensorrt-rtx-cu13==1.7.1.116"):
        TensorRTBackend()


def test_full_tensorrt_builds_for_the_local_gpu_only():
    from kiln.builder.tensorrt_backend import check_targets
    check_targets(("sm90",), full=True, gpu="sm90")
    with pytest.raises(EngineError, match=r"full TensorRT builds for the GPU it runs on \(sm90\)"):
        check_targets(("sm86",), full=True, gpu="sm90")


@pytest.mark.parametrize("qformat", sorted(FORMATS))
def test_quantized_builds(quantized, tmp_path, qformat):
    """Every format builds for sm86 and sm89 in one engine (fp8: sm89 only, sm86 refused
    with the reason); the parsed network's Q/DQ layers carry the format's types. (The engine
    inspector, which would name the kernels' precision, needs a GPU to load the engine.)"""
    ckpt = quantized(qformat)
    info = FORMATS[qformat]
    targets = ["sm89"] if qformat == "fp8" else ["sm86", "sm89"]
    if qformat == "fp8":
        with pytest.raises(EngineError, match="sm86 .*cannot run the checkpoint's fp8"):
            build(ckpt, tmp_path / "refused", **{**TRT, "targets": ["sm86", "sm89"]})
    result = build(ckpt, tmp_path / "engine", **{**TRT, "targets": targets})
    assert result.manifest.quantization == load_config(ckpt).quantization
    (layers,) = layer_counts(result)
    weight = {"int4": "int4", "int8": "int8", "float8_e4m3fn": "fp8"}[info.weight_dtype]
    n = 4 * result.manifest.decoder.num_layers  # qkv, o, gate_up, down
    if info.activation_dtype is None:
        assert layers["quantized"] == {f"DEQUANTIZE {weight}": n}
    else:
        assert layers["quantized"] == {f"DEQUANTIZE {weight}": 2 * n, f"QUANTIZE {weight}": n}
    assert layers["MATRIX_MULTIPLY"] == n + 1  # + lm_head
    verify_files(tmp_path / "engine", result.manifest, 0)


def test_quantized_tensor_parallel_build(quantized, tmp_path):
    result = build(quantized("int4_wo", tp=2, variant="mpt"), tmp_path / "engine", **TRT)
    quantized_layers = [layers["quantized"] for layers in layer_counts(result)]
    assert quantized_layers == [{"DEQUANTIZE int4": 8}] * 2  # qkv, o, up, down x 2
    assert result.manifest.rank_files == {0: ("rank0.engine",), 1: ("rank1.engine",)}
