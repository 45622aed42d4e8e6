"""``kiln build --backend torch`` writes packed weights and the manifest; the loader runs them."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kiln.builder.api import build
from kiln.checkpoint import load_rank
from kiln.engine import EngineError, read_manifest
from kiln.engine.torch_files import pack_weights, read_packed
from kiln.errors import CheckpointError
from kiln.reference import ReferenceDecoder
from kiln.roles import Role
from kiln.runtime.compat import MachineInfo
from kiln.runtime.executor import SequenceChunk
from kiln.runtime.loader import ExecutorOptions, open_engine
from kiln.runtime.torch_backend.executor import TorchExecutor
from kiln.tensorio import read_header, write_tensors
from tests.models import PROMPT, hf_model, kiln_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch-build")
    return kiln_checkpoint(hf_model("llama-gqa", root / "hf"), root / "ckpt")


def test_build_and_run_on_cpu(checkpoint, tmp_path, caplog):
    out = tmp_path / "engine"
    build(checkpoint, out, backend="torch", max_batch_size=2, max_seq_len=32, dtype="float32")
    manifest = read_manifest(out)
    assert manifest.backend == "torch" and manifest.targets == ("cuda", "cpu")
    assert manifest.rank_files == {0: ("rank0.safetensors",)}
    assert set(manifest.checksums) == {"rank0.safetensors"}
    assert manifest.backend_version["torch"] == torch.__version__
    infos, metadata = read_header(out / "rank0.safetensors")
    assert metadata["kiln_torch_format"] == "1" and json.loads(metadata["transposed"]) == []
    assert infos["layers.0.attn.qkv.weight"].dtype == torch.float32
    assert manifest.sizes == {"rank0.safetensors": (out / "rank0.safetensors").stat().st_size}
    with caplog.at_level(logging.WARNING):  # the default level: shown without -v
        _, executor = open_engine(out, ExecutorOptions(device="cpu"))
    assert isinstance(executor, TorchExecutor) and executor.model.kernels.name == "reference"
    (warning,) = [r for r in caplog.records if r.name == "kiln.runtime.torch_executor"]
    assert warning.levelno == logging.WARNING and "reference kernels, the slow path (slower " \
        "than an onnx engine: SmolLM2 on 2 CPU cores, 10 vs 37 tokens/s)" in warning.getMessage()
    assert executor.reserve(0, len(PROMPT))
    got = executor.step([SequenceChunk(0, PROMPT, 0)])[0]
    want = ReferenceDecoder.from_checkpoint(checkpoint).forward(torch.tensor([PROMPT]))[0, -1]
    assert float((got - want).abs().max()) <= 1e-4


def test_device_auto_without_a_gpu_is_refused_before_any_file_is_read(checkpoint, tmp_path):
    out = tmp_path / "engine"
    build(checkpoint, out, backend="torch", max_batch_size=2, max_seq_len=32, dtype="float32")
    (out / "rank0.safetensors").unlink()  # would fail the file check; the refusal comes first
    no_gpu = MachineInfo(kiln_version=read_manifest(out).kiln_version)
    with pytest.raises(EngineError) as info:
        open_engine(out, ExecutorOptions(device="auto"), machine=no_gpu)
    assert str(info.value) == (
        "this torch engine needs a CUDA GPU for its Triton kernels; on this machine use an onnx "
        "engine (build with backend='onnx'), or pass device='cpu' to run the PyTorch reference "
        "kernels, slower than an onnx engine: SmolLM2 on 2 CPU cores, 10 vs 37 tokens/s")
    from kiln.errors import options_as_flags

    with options_as_flags(), pytest.raises(EngineError) as info:  # kiln run's words
        open_engine(out, ExecutorOptions(device="auto"), machine=no_gpu)
    assert "(build with --backend onnx), or pass --device cpu to run" in str(info.value)
    with pytest.raises(EngineError, match=r"rank0\.safetensors: missing"):  # cpu asked: it goes on
        open_engine(out, ExecutorOptions(device="cpu"), machine=no_gpu)


def test_an_engine_built_for_the_cpu_alone_runs_there_by_default(checkpoint, tmp_path, caplog):
    """Retest 45d: a torch engine built with --target cpu had been refused by kiln run without
    --device cpu, as needing a CUDA GPU; it runs on the CPU, the slow path said."""
    out = tmp_path / "engine"
    build(checkpoint, out, backend="torch", max_batch_size=2, max_seq_len=32, dtype="float32",
          targets=["cpu"])
    no_gpu = MachineInfo(kiln_version=read_manifest(out).kiln_version)
    with caplog.at_level(logging.WARNING):
        _, executor = open_engine(out, ExecutorOptions(device="auto"), machine=no_gpu)
    assert executor.model.kernels.name == "reference"
    assert any("the slow path" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("rank, said", [(0, True), (1, False), (3, False)])
def test_under_torchrun_only_the_driver_says_the_cpu_path_is_slow(checkpoint, tmp_path, caplog,
                                                                 monkeypatch, rank, said):
    """A retest's torchrun of 4 CPU ranks had printed the slow-path warning 4 times (the
    workers print nothing else)."""
    from kiln.runtime.torch_executor import check_options

    out = tmp_path / "engine"
    build(checkpoint, out, backend="torch", max_batch_size=2, max_seq_len=32, dtype="float32")
    for name, value in {"WORLD_SIZE": "4", "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    manifest = read_manifest(out)
    with caplog.at_level(logging.WARNING):
        check_options(manifest, MachineInfo(kiln_version=manifest.kiln_version),
                      ExecutorOptions(device="cpu"))
    slow = [r for r in caplog.records if "reference kernels, the slow path" in r.getMessage()]
    assert len(slow) == int(said), caplog.records


def test_cudnn_prefill_attention_on_the_cpu_is_refused_before_any_file_is_read(checkpoint,
                                                                              tmp_path):
    out = tmp_path / "engine"
    build(checkpoint, out, backend="torch", max_batch_size=2, max_seq_len=32, dtype="float32")
    (out / "rank0.safetensors").unlink()  # would fail the file check; the refusal comes first
    with pytest.raises(EngineError) as info:
        open_engine(out, ExecutorOptions(device="cpu", prefill_attention="cudnn"))
    assert str(info.value) == (
        "prefill_attention='cudnn': cuDNN's attention runs on a CUDA GPU, and this torch engine "
        "runs on the CPU here; use 'auto' or 'kiln'")


def test_build_casts_to_the_engine_dtype(checkpoint, tmp_path):
    build(checkpoint, tmp_path / "e", backend="torch", max_seq_len=32, dtype="bfloat16")
    tensors, transposed = read_packed(tmp_path / "e" / "rank0.safetensors", torch.device("cpu"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and not transposed


def test_a_tp2_pp2_checkpoint_builds_one_file_per_rank_with_its_shards(tmp_path):
    """Engines of several ranks run in tests/runtime/test_distributed.py."""
    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt", tp=2, pp=2)
    build(ckpt, tmp_path / "e", backend="torch", max_seq_len=32, dtype="float32")
    manifest = read_manifest(tmp_path / "e")
    assert manifest.rank_files == {r: (f"rank{r}.safetensors",) for r in range(4)}
    first, _ = read_packed(tmp_path / "e" / "rank1.safetensors", torch.device("cpu"))
    last, _ = read_packed(tmp_path / "e" / "rank3.safetensors", torch.device("cpu"))
    assert "embed.weight" in first and "lm_head.weight" not in first
    assert set(first) & set(last) == set()  # stage 0 holds layer 0, stage 1 layer 1
    assert first["layers.0.attn.qkv.weight"].shape == (64, 64)  # (4 + 2 * 2) heads x 16 / 2
    assert last["lm_head.weight"].shape == (64, 64)  # vocab-parallel: 128 rows / 2


def test_swapped_rank_files_are_refused_at_load_and_old_files_load(tmp_path):
    """Each file records its rank and world; swapped rank0/rank1 (same names, same shapes)
    used to run silently with wrong text. Files without the fields (older builds) load."""
    from kiln.config import Mapping
    from kiln.runtime.torch_executor import read_rank

    ckpt = kiln_checkpoint(hf_model("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt", tp=2)
    engine = tmp_path / "e"
    build(ckpt, engine, backend="torch", max_seq_len=32, dtype="float32")
    manifest = read_manifest(engine)
    _, metadata = read_header(engine / "rank1.safetensors")
    assert (metadata["rank"], metadata["tp_size"], metadata["pp_size"]) == ("1", "2", "1")
    read_rank(engine, manifest, 1, torch.device("cpu"))
    (engine / "rank0.safetensors").rename(engine / "swap")
    (engine / "rank1.safetensors").rename(engine / "rank0.safetensors")
    (engine / "swap").rename(engine / "rank1.safetensors")
    with pytest.raises(EngineError) as info:
        read_rank(engine, manifest, 0, torch.device("cpu"))
    assert str(info.value) == (
        f"{engine / 'rank0.safetensors'}: built as rank 1 of tp 2 x pp 1, and the manifest lists "
        f"it for rank 0 of tp 2 x pp 1: the engine dir's files were renamed, swapped or mixed "
        f"from another build; rebuild with kiln build --backend torch")
    old = tmp_path / "old.safetensors"
    write_tensors(old, {"embed.weight": torch.zeros(2, 2)},
                  metadata={"kiln_torch_format": "1", "transposed": "[]"})
    tensors, _ = read_packed(old, torch.device("cpu"), rank=1, mapping=Mapping(tp_size=2))
    assert set(tensors) == {"embed.weight"}


def test_packing_transposes_only_what_it_is_told(checkpoint):
    tensors = load_rank(checkpoint, 0)
    packed, names = pack_weights(tensors, torch.float16, frozenset({Role.OUT}))
    assert names == {"layers.0.attn.o.weight", "layers.1.attn.o.weight"}
    o = tensors["layers.1.attn.o.weight"]
    assert torch.equal(packed["layers.1.attn.o.weight"], o.half().t())
    assert packed["layers.1.attn.o.weight"].is_contiguous()


def test_read_packed_refuses_other_files(tmp_path):
    path = tmp_path / "x.safetensors"
    write_tensors(path, {"embed.weight": torch.zeros(2, 2)})
    with pytest.raises(EngineError, match="not a kiln torch engine file"):
        read_packed(path, torch.device("cpu"))


def test_a_damaged_engine_file_says_rebuild(checkpoint, tmp_path):
    """kiln build wrote the file: its remedy is a rebuild, not a download."""
    build(checkpoint, tmp_path / "e", backend="torch", max_seq_len=32)
    path = tmp_path / "e" / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=r"rank0\.safetensors: not a valid safetensors file: "
                       r".*; rebuild the engine \(kiln build\), or copy it again$"):
        read_packed(path, torch.device("cpu"))
