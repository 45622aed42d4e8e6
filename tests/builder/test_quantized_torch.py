"""Quantized checkpoints build for the torch backend, and its executor (the PyTorch reference
kernels on the CPU) reproduces the oracle (ReferenceDecoder on the same quantized checkpoint)
over the mixed prefill/decode SCHEDULE, for every qformat, with an fp8 or int8 KV cache, and
with a quantized lm_head. The GPU kernels are checked against these same references
(tests/plugins/test_quant_linear_triton.py, tests/gpu/test_quantized_torch_gpu.py).

Tolerance: float32 engines 1e-4 absolute, as the unquantized torch engine. Both sides
dequantize weights exactly in float32 and quantize activations and cache entries from values
that agree to ~1e-7; a rounding flip (possible in principle, not seen on this schedule) would
move a logit by one quantization step times a weight row.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.builder import build
from kiln.checkpoint import check_tensor_names, load_config
from kiln.engine import EngineError, read_manifest
from kiln.engine.torch_files import read_packed
from kiln.errors import CheckpointError, options_as_flags
from kiln.plugins.quant_linear.layout import INT4_LAYOUT
from kiln.quantization.config import FORMATS
from kiln.reference import ReferenceDecoder
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.loader import ExecutorOptions, open_engine
from kiln.runtime.torch_backend.executor import TorchExecutor
from kiln.runtime.torch_executor import check_gpu_formats
from kiln.tensorio import read_header
from tests.builder.conftest import LIMITS
from tests.builder.quantized import quantize_checkpoint
from tests.builder.reference_steps import SCHEDULE, ReferenceSteps
from tests.models import hf_llama, kiln_checkpoint

TOL = 1e-4


def torch_engine(ckpt, out, dtype="float32"):
    build(ckpt, out, backend="torch", dtype=dtype, **LIMITS)
    _, executor = open_engine(out, ExecutorOptions(device="cpu"))
    assert isinstance(executor, TorchExecutor)
    return executor


def run_schedule(executor: TorchExecutor) -> list[np.ndarray]:
    out = []
    for chunks in SCHEDULE:
        step = [SequenceChunk(slot, tokens, start) for slot, tokens, start in chunks]
        out.append(executor.step(step).numpy())
    return out


def oracle(ckpt) -> list[np.ndarray]:
    steps = ReferenceSteps(ReferenceDecoder.from_checkpoint(ckpt))
    return [steps.step(chunks) for chunks in SCHEDULE]


def assert_matches_oracle(executor, ckpt):
    for got, want in zip(run_schedule(executor), oracle(ckpt), strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("qformat", sorted(FORMATS))
def test_every_qformat_matches_the_oracle(quantized, qformat, tmp_path):
    ckpt = quantized(qformat)
    executor = torch_engine(ckpt, tmp_path / "e")
    assert read_manifest(tmp_path / "e").quantization.qformat == qformat
    assert_matches_oracle(executor, ckpt)


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_quantized_kv_cache_matches_the_oracle(quantized, kv, tmp_path):
    ckpt = quantized("int8_wo", kv_cache_dtype=kv)
    executor = torch_engine(ckpt, tmp_path / "e")
    want = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[kv]
    assert executor.cache.data.dtype == want
    assert_matches_oracle(executor, ckpt)


def test_quantized_lm_head(quantized, tmp_path):
    ckpt = quantized("int4_wo", lm_head=True)
    assert_matches_oracle(torch_engine(ckpt, tmp_path / "e"), ckpt)


def test_engine_file_layout(quantized, tmp_path):
    """Quantized weights keep their dtype (int4 repacked), scales stay float32, the rest
    takes the engine dtype; the int4 layout is named in the metadata."""
    build(quantized("int4_awq"), tmp_path / "e", backend="torch", dtype="bfloat16", **LIMITS)
    infos, metadata = read_header(tmp_path / "e" / "rank0.safetensors")
    assert metadata["int4_layout"] == INT4_LAYOUT
    assert infos["layers.0.attn.qkv.weight"].dtype == torch.uint8
    assert infos["layers.0.attn.qkv.weight_scale"].dtype == torch.float32
    assert infos["layers.0.mlp.down.pre_quant_scale"].dtype == torch.float32
    assert infos["layers.0.attn_norm.weight"].dtype == torch.bfloat16
    build(quantized("fp8", kv_cache_dtype="fp8"), tmp_path / "f", backend="torch", **LIMITS)
    infos, metadata = read_header(tmp_path / "f" / "rank0.safetensors")
    assert "int4_layout" not in metadata
    assert infos["layers.0.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert infos["layers.0.attn.qkv.input_scale"].dtype == torch.float32
    assert infos["layers.0.attn.k_scale"].dtype == torch.float32


def test_unsupported_group_size_refused_at_build(quantized, tmp_path, monkeypatch):
    """Every group size kiln quantize writes (32, 64, 128) has kernels; were one added to the
    checkpoint format without them, the build says so (simulated: kernels for 64 and 128)."""
    monkeypatch.setattr("kiln.builder.torch_backend.INT4_GROUP_SIZES", (64, 128))
    with pytest.raises(EngineError, match="the torch backend's int4 kernels read group sizes "
                                          "64, 128, this checkpoint has group_size 32; quantize "
                                          r"again with group_size=128 \(or 64\)$"):
        build(quantized("int4_wo"), tmp_path / "e", backend="torch", **LIMITS)
    assert not (tmp_path / "e").exists()


def test_int4_layout_mismatch_refused_at_load(quantized, tmp_path):
    build(quantized("int4_wo"), tmp_path / "e", backend="torch", **LIMITS)
    quant = read_manifest(tmp_path / "e").quantization
    with pytest.raises(EngineError, match="int4 layout 'int4_mma_fragments', this kiln reads "
                                          "None"):
        read_packed(tmp_path / "e" / "rank0.safetensors", torch.device("cpu"))
    read_packed(tmp_path / "e" / "rank0.safetensors", torch.device("cpu"), quant)


@pytest.fixture(scope="module")
def int4_g64(tmp_path_factory):
    """An int4_wo group-64 checkpoint of a Llama whose input dims are multiples of 64 (the
    fragment layout's chunks): hidden 64, intermediate 128."""
    root = tmp_path_factory.mktemp("int4-g64")
    float_ckpt = kiln_checkpoint(hf_llama(root / "hf", intermediate_size=128), root / "float")
    return quantize_checkpoint(float_ckpt, root / "q", "int4_wo", group_size=64)


def test_int4_fragment_layout_changes_no_logit(int4_g64, tmp_path, monkeypatch):
    """A bfloat16 engine stores its INT4 projections as MMA fragments (int32) and gives the
    same logits, bit for bit, as the same engine in the split-group layout (the reference
    kernels dequantize either to the same values); an engine written before the fragment
    layout (metadata int4_split_group, uint8 weights) still loads and runs."""
    build(int4_g64, tmp_path / "frag", backend="torch", dtype="bfloat16", **LIMITS)
    infos, metadata = read_header(tmp_path / "frag" / "rank0.safetensors")
    assert metadata["int4_layout"] == INT4_LAYOUT == "int4_mma_fragments"
    for role in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"):
        assert infos[f"layers.0.{role}.weight"].dtype == torch.int32, role
    got = run_schedule(open_engine(tmp_path / "frag", ExecutorOptions(device="cpu"))[1])

    monkeypatch.setattr("kiln.plugins.quant_linear.layout.takes_fragments", lambda *a: False)
    build(int4_g64, tmp_path / "split", backend="torch", dtype="bfloat16", **LIMITS)
    rank = tmp_path / "split" / "rank0.safetensors"
    infos, metadata = read_header(rank)
    assert infos["layers.0.mlp.down.weight"].dtype == torch.uint8
    old = run_schedule(open_engine(tmp_path / "split", ExecutorOptions(device="cpu"))[1])
    older = tmp_path / "older.safetensors"  # as written before the fragment layout
    save_file(load_file(rank), older, metadata={**metadata, "int4_layout": "int4_split_group"})
    quant = read_manifest(tmp_path / "split").quantization
    tensors, _ = read_packed(older, torch.device("cpu"), quant)
    assert tensors["layers.0.mlp.down.weight"].dtype == torch.uint8
    for a, b in zip(got, old, strict=True):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("qformat,kv,refused", [
    ("fp8", None, "fp8 weights"), ("int8_wo", "fp8", "an fp8 KV cache"),
    ("fp8", "fp8", "fp8 weights and an fp8 KV cache"), ("int8_sq", "int8", None),
    ("int4_wo", None, None)])
def test_fp8_needs_sm89(quantized, tmp_path, qformat, kv, refused):
    build(quantized(qformat, kv_cache_dtype=kv), tmp_path / "e", backend="torch", **LIMITS)
    manifest = read_manifest(tmp_path / "e")
    check_gpu_formats(manifest, (9, 0))
    check_gpu_formats(manifest, (8, 9))
    if refused is None:
        check_gpu_formats(manifest, (8, 0))
        return
    with pytest.raises(EngineError, match=f"this torch engine has {refused}, which need a GPU "
                                          f"of compute capability 8.9 or newer .* this GPU is "
                                          f"sm80"):
        check_gpu_formats(manifest, (8, 0))


def _edited(src, tmp_path, edit):
    """A copy of checkpoint ``src`` (tensor files linked) whose config.json ``edit`` changes."""
    ckpt = tmp_path / "edited"
    ckpt.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (ckpt / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    edit(config["quantization"])
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_kv_cache_record_without_scales_is_named(quantized, tmp_path):
    ckpt = _edited(quantized("int8_wo"), tmp_path, lambda q: q.update(kv_cache_dtype="fp8"))
    with pytest.raises(CheckpointError, match=r"config.json records kv_cache_dtype fp8, but the "
                                              r"checkpoint has no KV-cache scales \(layers.0.attn."
                                              r"k_scale and 3 more\); quantize again with kiln "
                                              r"quantize --kv_cache_dtype fp8"):
        build(ckpt, tmp_path / "e", backend="torch", **LIMITS)
    ckpt = _edited(quantized("int8_wo", kv_cache_dtype="int8"), tmp_path / "b",
                   lambda q: q.update(kv_cache_dtype=None))
    with pytest.raises(CheckpointError, match="holds KV-cache scales .* that config.json does "
                                              "not record"):
        build(ckpt, tmp_path / "e", backend="torch", **LIMITS)
    assert not (tmp_path / "e").exists()


def test_long_name_lists_are_cut(quantized):
    """A rank file of the wrong checkpoint: one short line, not every name."""
    ckpt = quantized("int8_wo")
    config = load_config(ckpt)
    with pytest.raises(CheckpointError, match=r"missing \['embed.weight', [^]]*\] and \d+ "
                                              r"more, unexpected \['other'\]") as err:
        check_tensor_names(ckpt / "rank0.safetensors", config, 0, ["other"])
    assert len(str(err.value)) < 600


def test_allocation_failure_at_load_is_one_line(quantized, tmp_path, monkeypatch):
    build(quantized("int4_wo"), tmp_path / "e", backend="torch", **LIMITS)

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "3276800032768 bytes")

    monkeypatch.setattr("kiln.runtime.torch_executor.TorchExecutor", no_memory)
    with pytest.raises(EngineError, match=r"could not allocate its tables and KV cache on cpu for "
                                          r"this engine's limits \(max_seq_len 32, max_batch_size "
                                          r"4\): DefaultCPUAllocator: .*; rebuild with a smaller "
                                          r"max_seq_len or max_batch_size$"):
        open_engine(tmp_path / "e", ExecutorOptions(device="cpu"))
    flags = r"; rebuild with a smaller --max_seq_len or --max_batch_size$"
    with options_as_flags(), pytest.raises(EngineError, match=flags):
        open_engine(tmp_path / "e", ExecutorOptions(device="cpu"))


def test_cpu_warning_says_quantized_engines_are_slower(quantized, tmp_path, caplog):
    build(quantized("int8_wo"), tmp_path / "e", backend="torch", **LIMITS)
    with caplog.at_level(logging.WARNING, logger="kiln.runtime.torch_executor"):
        open_engine(tmp_path / "e", ExecutorOptions(device="cpu"))
    assert "a quantized one dequantizes every weight at every step there (SmolLM2 on 2 idle cores: " \
           "int8_wo 5.7" in caplog.text


def test_group_size_edited_in_config_is_named(quantized, tmp_path):
    ckpt = _edited(quantized("int4_wo"), tmp_path, lambda q: q.update(group_size=64))
    with pytest.raises(CheckpointError, match=r"its scales are of group_size 32: config.json's "
                                              r"quantization.group_size does not match"):
        build(ckpt, tmp_path / "e", backend="torch", **LIMITS)


def test_limits_beyond_host_memory_refused_before_allocating(quantized, tmp_path, monkeypatch):
    """The OOM killer ends an overcommitted process before any allocation fails, so the
    executor compares its rotary tables and CPU KV cache with MemAvailable first."""
    build(quantized("int8_wo", kv_cache_dtype="int8"), tmp_path / "e", backend="torch",
          **LIMITS)
    monkeypatch.setattr("kiln.runtime.torch_executor.available_memory", lambda: 1000)
    with pytest.raises(EngineError, match=r"this torch engine's limits \(max_seq_len 32, "
                                          r"max_batch_size 4\) need 46 KiB of host memory "
                                          r"\(rotary tables 6 KiB, KV cache 40 KiB\), and 1 KiB "
                                          r"is available; rebuild with a smaller max_seq_len or "
                                          r"max_batch_size$"):
        open_engine(tmp_path / "e", ExecutorOptions(device="cpu"))
    monkeypatch.setattr("kiln.runtime.torch_executor.available_memory", lambda: None)
    open_engine(tmp_path / "e", ExecutorOptions(device="cpu"))  # unknown: no check


def test_fp8_inputs_quantized_by_the_kernel_before_them(quantized, tmp_path, monkeypatch):
    """Steps of more than FP8_TRITON_MAX_M rows: the norms, the attention (prefill, and decode
    in a mixed step) and the gated MLP's activation hand the FP8 projections their inputs
    quantized already (each with its own projection's input scale; the attention and the
    activation also apply o's and down's pre_quant_scale, which this checkpoint has),
    which gives the same logits, bit for bit, as each projection quantizing its input itself,
    and the oracle's. A 4-row decode step quantizes in the projections."""
    import dataclasses

    from kiln.plugins.quant_linear.triton_reference import FP8_TRITON_MAX_M
    from kiln.runtime.torch_backend.model import QuantLinear

    ckpt = quantized("fp8")
    build(ckpt, tmp_path / "e", backend="torch", dtype="float32", max_batch_size=4,
          max_input_len=62, max_seq_len=64, max_num_tokens=128)
    gen = torch.Generator().manual_seed(3)
    vocab = load_config(ckpt).decoder.vocab_size
    prompts = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (24, 24, 24, 62)]
    assert 3 * 24 > FP8_TRITON_MAX_M and 3 + 62 > FP8_TRITON_MAX_M

    def run(fused: bool) -> tuple[list[torch.Tensor], list[list[str]]]:
        _, ex = open_engine(tmp_path / "e", ExecutorOptions(device="cpu"))
        kernels, quantized_by = ex.model.kernels, []

        def add_norm(*args, quant_scale=None, **kwargs):
            quantized_by.append("norm" if quant_scale is not None else "-")
            return kernels.add_norm(*args, quant_scale=quant_scale, **kwargs)

        def silu_and_mul(gate_up, quant_scale=None, pre_quant_scale=None):
            quantized_by.append("silu" if quant_scale is not None else "-")
            if quant_scale is not None:
                assert pre_quant_scale is not None  # down's smoothing, applied here
            return kernels.silu_and_mul(gate_up, quant_scale=quant_scale,
                                        pre_quant_scale=pre_quant_scale)

        def attention(kind: str):
            def call(*args, quant_scale=None, pre_quant_scale=None, **kwargs):
                quantized_by.append(kind if quant_scale is not None else "-")
                if quant_scale is not None:
                    assert pre_quant_scale is not None  # o's smoothing, applied here
                return getattr(kernels, f"paged_{kind}_attention")(
                    *args, quant_scale=quant_scale, pre_quant_scale=pre_quant_scale, **kwargs)
            return call

        ex.model.kernels = dataclasses.replace(
            kernels, add_norm=add_norm, silu_and_mul=silu_and_mul,
            paged_prefill_attention=attention("prefill"),
            paged_decode_attention=attention("decode"))
        if not fused:
            monkeypatch.setattr(QuantLinear, "quantized_input", lambda self, rows: None)
        for slot, p in enumerate(prompts):
            assert ex.reserve(slot, len(p) + 2)
        steps = [[SequenceChunk(s, prompts[s], 0) for s in range(3)],  # 72 prefill rows
                 [SequenceChunk(s, [5], 24) for s in range(3)]  # mixed: 3 decode rows + 62
                 + [SequenceChunk(3, prompts[3], 0)],
                 [SequenceChunk(s, [7], len(prompts[s]) + (s < 3)) for s in range(4)]]  # 4 rows
        logits, calls = [], []
        for chunks in steps:
            del quantized_by[:]
            logits.append(ex.step(chunks))
            calls.append(list(quantized_by))
        ex.close()
        return logits, calls

    fused, calls = run(True)
    layers = load_config(ckpt).decoder.num_layers
    # per layer: the attention norm (for qkv), the attention (o), the MLP norm (gate_up),
    # silu*up (down); the final norm feeds the unquantized lm_head
    for step, kinds in enumerate([["prefill"], ["decode", "prefill"], []]):
        got = calls[step]
        assert got.count("norm") == 2 * layers * (step < 2), (step, got)
        assert got.count("silu") == layers * (step < 2), (step, got)
        for kind in ("prefill", "decode"):
            assert got.count(kind) == layers * (kind in kinds), (step, got)
    unfused, calls = run(False)
    assert all(set(c) == {"-"} for c in calls), calls
    for a, b in zip(fused, unfused, strict=True):
        assert torch.equal(a, b)
    steps = ReferenceSteps(ReferenceDecoder.from_checkpoint(ckpt))
    want = steps.step([(s, prompts[s], 0) for s in range(3)])
    np.testing.assert_allclose(fused[0].numpy(), want, atol=TOL, rtol=0)


def test_fragment_weights_refused_where_gluon_is_missing(int4_g64, tmp_path, monkeypatch):
    """Triton kernels without a usable triton.experimental.gluon (simulated: no triton on this
    CPU machine) cannot run fragment weights: one line at load, naming what to do."""
    import dataclasses
    import sys
    import types

    from kiln.errors import ConfigError
    from kiln.roles import Role
    from kiln.runtime.torch_backend.kernels import load_kernels
    from kiln.runtime.torch_backend.model import quant_linear

    build(int4_g64, tmp_path / "e", backend="torch", dtype="bfloat16", **LIMITS)
    quant = read_manifest(tmp_path / "e").quantization
    tensors, _ = read_packed(tmp_path / "e" / "rank0.safetensors", torch.device("cpu"), quant)
    fake = types.ModuleType("kiln.plugins.quant_linear.triton_kernels")
    fake.gluon_missing = lambda: "triton 9.9 has no usable triton.experimental.gluon (x)"
    monkeypatch.setitem(sys.modules, "kiln.plugins.quant_linear.triton_kernels", fake)
    triton_set = dataclasses.replace(load_kernels("reference", torch.device("cpu")),
                                     name="triton")
    with pytest.raises(ConfigError, match=r"^this engine's INT4 weights are in the tensor-core "
                                          r"fragment layout, whose kernel cannot run here: "
                                          r"triton 9.9 has no .*; pip install triton==3.6.0"):
        quant_linear(quant, triton_set, tensors, Role.DOWN, 0, None, torch.bfloat16)
    fake.gluon_missing = lambda: None
    quant_linear(quant, triton_set, tensors, Role.DOWN, 0, None, torch.bfloat16)
