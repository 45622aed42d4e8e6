"""Pipeline stages, memory-split parts and tensor-parallel graphs reproduce the oracle."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kiln.builder import build
from kiln.builder.graph.context import GraphSpec
from kiln.builder.graph.decoder import write_part
from kiln.builder.onnx_backend import OnnxBackend
from kiln.builder.options import MIN_BUILD_MEMORY
from kiln.builder.plan import plan_rank
from kiln.checkpoint import load_config, rank_file
from kiln.engine import read_manifest
from kiln.plugins import PLUGINS
from tests.builder.conftest import LIMITS, engine_runner
from tests.builder.onnx_steps import StepRunner
from tests.builder.reference_steps import SCHEDULE

TOL = 1e-4


def assert_matches(runner, want: list[np.ndarray]) -> None:
    for chunks, expected in zip(SCHEDULE, want, strict=True):
        got = runner.step(chunks)
        assert np.isfinite(got).all()
        assert float(np.abs(got - expected).max()) <= TOL


@pytest.mark.parametrize("name", ["llama-gqa", "falcon-40b-gqa"])
def test_pipeline_stages(checkpoint, reference_logits, tmp_path, name):
    ckpt = checkpoint(name, pp=2)
    build(ckpt, tmp_path / "engine", **LIMITS)
    manifest = read_manifest(tmp_path / "engine")
    assert manifest.rank_files == {0: ("rank0.onnx", "rank0.onnx.data"),
                                   1: ("rank1.onnx", "rank1.onnx.data")}
    assert_matches(engine_runner(tmp_path / "engine"), reference_logits(name))


def test_memory_budget_splits_a_rank_into_parts(checkpoint, reference_logits, tmp_path):
    ckpt = checkpoint("llama-gqa")
    config = load_config(ckpt)
    from kiln.builder.api import check_rank_files
    weights = check_rank_files(ckpt, config)[0]
    whole = weights.nbytes(list(weights.infos))
    # Room for a bit more than half the weights: two parts of one layer each.
    budget = int(OnnxBackend.base_memory + OnnxBackend.memory_factor * whole * 0.6)
    parts = plan_rank(config, 0, weights, budget, OnnxBackend.memory_factor,
                      OnnxBackend.base_memory)
    assert [(p.layers, p.first, p.last) for p in parts] == [(range(0, 1), True, False),
                                                            (range(1, 2), False, True)]
    for workers in (1, 2):  # 2: each part in its own spawned worker, half the budget each
        engine = tmp_path / f"engine{workers}"
        build(ckpt, engine, max_build_memory=budget * workers, workers=workers, **LIMITS)
        manifest = read_manifest(engine)
        assert manifest.rank_files[0] == ("rank0.part0.onnx", "rank0.part0.onnx.data",
                                          "rank0.part1.onnx", "rank0.part1.onnx.data")
        assert_matches(engine_runner(engine), reference_logits("llama-gqa"))


def test_workers_past_the_layers_are_capped(checkpoint, tmp_path, monkeypatch, caplog):
    """No more workers than a layer each, each with its share of the memory (a retest's
    --workers 100 of a small model had been refused for 0.2 GB a worker)."""
    from kiln.builder import api

    ckpt = checkpoint("llama-gqa")  # 2 layers, tp 1
    config = load_config(ckpt)
    weights = api.check_rank_files(ckpt, config)[0]
    budget = int(OnnxBackend.base_memory
                 + OnnxBackend.memory_factor * weights.nbytes(list(weights.infos)) * 0.6)

    class Planned(Exception):
        pass

    def planned(engine, plan, parts, tmp, workers, progress):
        raise Planned(len(parts), workers)

    monkeypatch.setattr(api, "run_parts", planned)
    with caplog.at_level(logging.INFO, logger="kiln"), pytest.raises(Planned) as info:
        build(ckpt, tmp_path / "engine", max_build_memory=budget * 2, workers=100, **LIMITS)
    assert info.value.args == (2, 2)  # two parts of one layer, a worker and a budget each
    assert "workers: 2, one per layer of every rank at most (workers=100)" in caplog.messages
    assert not any(tmp_path.iterdir())


def test_budget_too_small_for_one_layer(checkpoint, tmp_path):
    from kiln.engine import EngineError
    with pytest.raises(EngineError, match="raise max_build_memory"):
        build(checkpoint("llama-gqa"), tmp_path / "engine", max_build_memory=MIN_BUILD_MEMORY,
              **LIMITS)
    assert not any(tmp_path.iterdir())


def test_a_streaming_backend_budgets_its_largest_tensor_not_a_fixed_size(checkpoint):
    """The torch backend streams tensors: a part needs its largest tensor as read plus its
    copies at the build size, and the libraries (a fixed 3 GiB had refused SmolLM2 under 2 GB,
    whose build peaks at 0.37 GB)."""
    from kiln.builder.api import check_rank_files
    from kiln.builder.graph.context import RankWeights
    from kiln.builder.torch_backend import TorchBackend
    from kiln.engine import EngineError

    ckpt = checkpoint("llama-gqa")
    config = load_config(ckpt)
    stored = RankWeights(check_rank_files(ckpt, config)[0].path, "bfloat16")  # float32 on disk
    largest = max(stored.infos.values(), key=lambda info: info.nbytes).nbytes
    need = TorchBackend.base_memory + largest + TorchBackend.tensor_copies * largest // 2

    def parts(budget: int) -> int:
        return len(plan_rank(config, 0, stored, budget, TorchBackend.memory_factor,
                             TorchBackend.base_memory, TorchBackend.tensor_copies))

    assert parts(need) == 1 and parts(10**12) == 1
    with pytest.raises(EngineError, match=r"needs about 0\.4 GB of host RAM to build, over the "
                                          r"1 KB budget per worker; raise max_build_memory$"):
        parts(1000)  # one worker: no advice to lower --workers


def tp_runner(ckpt, directory, plugins: bool) -> StepRunner:
    """The tp ranks' graphs (as the tensorrt backend parses them), run with emulated NCCL."""
    config = load_config(ckpt)
    mapping = config.mapping
    spec = GraphSpec(decoder=config.decoder, mapping=mapping, dtype="float32",
                     max_seq_len=LIMITS["max_seq_len"],
                     plugins=dict.fromkeys(PLUGINS, plugins) | {
                         "gated_mlp": plugins and config.decoder.gated_mlp,
                         "gqa": False, "residual_norm": False})  # ONNX Runtime CPU only
    from kiln.builder.graph.context import PartSpec
    chain = []
    for pp_rank in range(mapping.pp_size):
        layers = mapping.stage_layers(pp_rank, config.decoder.num_layers)
        group = []
        for tp_rank in range(mapping.tp_size):
            rank = mapping.rank(tp_rank, pp_rank)
            part = PartSpec(rank=rank, layers=layers, first=pp_rank == 0,
                            last=pp_rank == mapping.pp_size - 1)
            group.append(write_part(spec, part, ckpt / rank_file(rank), directory))
        chain.append(group)
    return StepRunner(chain, config.decoder, mapping, "float32", LIMITS["max_batch_size"],
                      LIMITS["max_seq_len"])


@pytest.mark.parametrize("name,tp,pp", [("llama-gqa", 2, 1), ("llama-mqa-tied", 2, 1),
                                        ("falcon-7b-mqa", 2, 1), ("mpt", 2, 1),
                                        ("llama-rope-dynamic", 2, 2), ("falcon-rw-alibi", 4, 1)])
@pytest.mark.parametrize("plugins", [True, False])
def test_tensor_parallel_graphs(checkpoint, reference_logits, tmp_path, name, tp, pp, plugins):
    ckpt = checkpoint(name, tp=tp, pp=pp)
    runner = tp_runner(ckpt, tmp_path, plugins)
    collectives = [op for op, _, _ in runner.groups[-1].ranks[0].collectives]
    layers = len(load_config(ckpt).mapping.stage_layers(pp - 1, 2))
    per_layer = 1 if load_config(ckpt).decoder.residual.value == "parallel" else 2
    assert collectives == ["all_reduce"] * (per_layer * layers) + ["all_gather"]
    assert_matches(runner, reference_logits(name))


def test_an_onnx_cpu_engine_whose_cache_cannot_fit_here_is_said_before_the_build(
        checkpoint, tmp_path, caplog, monkeypatch):
    """A typo in --max_batch_size built an engine that no load could take (a new user's
    100,000,000); built ahead of time for a larger machine it may be right, so a warning."""
    import logging

    import psutil

    real = psutil.virtual_memory()  # the build's own budget reads what is available
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(total=1000))
    with caplog.at_level(logging.WARNING, logger="kiln.builder.api"):
        build(checkpoint("llama-gqa"), tmp_path / "engine", **LIMITS)
    (message,) = [m for m in caplog.messages if "KV cache" in m]
    assert "max_batch_size 4, max_seq_len 32) need a KV cache of " in message
    assert "at load on the CPU, and this machine has 1 KiB of memory: it will not load here" \
        in message
    # the load's refusal says the same figure in the same units (a trial's build had said
    # "9437183999.9 GB" and its run "8583068.8 TiB")
    from kiln.engine import EngineError
    from kiln.runtime import onnx_executor

    figure = message.split("need a KV cache of ")[1].split(" at load")[0]
    monkeypatch.setattr(onnx_executor, "available_memory", lambda: 1000)
    manifest = read_manifest(tmp_path / "engine")
    with pytest.raises(EngineError, match=f"need a KV cache of {figure} of host memory"):
        onnx_executor._check_cache_memory(manifest, manifest.full_kv_cache_bytes(), "cpu")
    caplog.clear()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="kiln.builder.api"):
        build(checkpoint("llama-gqa"), tmp_path / "engine2", **LIMITS)
    assert not [m for m in caplog.messages if "KV cache" in m]


def test_a_kv_cache_past_what_any_machine_holds_is_refused(checkpoint, tmp_path):
    """A trial's kiln build --max_batch_size 99999999999 (a KV cache of 8.2 EiB) had built,
    with a warning, for its kiln run to refuse; past 1 EB it is refused, one line, exit 2."""
    from click.testing import CliRunner

    from kiln.cli.main import main
    from kiln.errors import ConfigError

    big = 99999999999999  # the test model's cache is small: 1.5 EiB at max_seq_len 32
    with pytest.raises(ConfigError, match=rf"^this engine's limits \(max_batch_size {big}, "
                       r"max_seq_len 32\) need a KV cache of [0-9.]+ [PE]iB, more than any "
                       r"machine holds; lower max_batch_size or max_seq_len$"):
        build(checkpoint("llama-gqa"), tmp_path / "engine",
              **{**LIMITS, "max_batch_size": big})
    assert not (tmp_path / "engine").exists()
    result = CliRunner().invoke(main, ["build", "--checkpoint_dir", str(checkpoint("llama-gqa")),
                                       "--output_dir", str(tmp_path / "engine"),
                                       "--max_batch_size", str(big), "--max_seq_len", "32"])
    assert result.exit_code == 2, result.output
    assert "more than any machine holds; lower --max_batch_size or --max_seq_len" \
        in result.output
