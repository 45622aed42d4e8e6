"""Engine dirs that cannot run here are refused before anything loads, with the reason and fix."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import onnx
import pytest

import kiln.hashing
from kiln.engine import BuildLimits, EngineError, read_manifest
from kiln.runtime import LLM
from kiln.runtime.compat import MachineInfo, check_onnx, check_tensorrt
from kiln.runtime.errors import TokenizerError
from kiln.runtime.loader import ExecutorOptions, loaded_ranks, open_engine
from tests.runtime.toy_onnx import rewrite_manifest, toy_engine_dir

LIMITS = BuildLimits(max_batch_size=2, max_input_len=8, max_seq_len=16, max_num_tokens=16)
RTX = {"backend": "tensorrt", "backend_version": {"tensorrt_rtx": "1.7.1.116"},
       "targets": ["sm86", "sm89"], "rank_files": {"0": ["rank0.engine"]}, "checksums": {}}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return toy_engine_dir(tmp_path_factory.mktemp("checks") / "engine", LIMITS)


@pytest.fixture
def engine(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "engine"))


def machine(**kw) -> MachineInfo:
    base = dict(kiln_version="0.1.0", libraries={"onnxruntime": "1.31.1",
                                                 "tensorrt_rtx": "1.7.1.116"},
                gpus=((8, 6),))
    return MachineInfo(**{**base, **kw})


def test_missing_dir(tmp_path):
    with pytest.raises(EngineError, match="no such engine directory"):
        open_engine(tmp_path / "nope")


def test_corrupt_manifest(engine):
    (engine / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match="invalid JSON.*rebuild"):
        open_engine(engine)


def test_manifest_missing_keys(engine):
    (engine / "config.json").write_text('{"format_version": 1}')
    with pytest.raises(EngineError, match="malformed manifest"):
        open_engine(engine)


def record_sizes(engine: Path) -> None:
    """Give the toy engine's manifest the sizes kiln build records."""
    names = read_manifest(engine).rank_files[0]
    rewrite_manifest(engine, sizes={n: (engine / n).stat().st_size for n in names})


def corrupt_a_weight(path: Path) -> None:
    """Flip bytes inside the largest initializer: same size, still a valid graph."""
    weights = max(onnx.load(str(path)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    data = bytearray(path.read_bytes())
    at = data.index(weights) + len(weights) // 2
    data[at:at + 2] = bytes(b ^ 0xFF for b in data[at:at + 2])
    path.write_bytes(bytes(data))


class NoHashing:
    """Stands in for hashlib in kiln.hashing: hashing a file (a sha256 fed block by block) is
    a test failure; the manifest's own digest (its JSON, given at once) is computed."""

    @staticmethod
    def sha256(data: bytes | None = None):
        if data is None:
            raise AssertionError("a file was hashed")
        return hashlib.sha256(data)


@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_size_change_is_caught_at_load_without_hashing(engine, monkeypatch, change):
    record_sizes(engine)
    monkeypatch.setattr(kiln.hashing, "hashlib", NoHashing)
    with pytest.raises(AssertionError, match="hashed"):  # the stand-in is on the hashing path
        open_engine(engine, ExecutorOptions(verify_checksums=True))
    path = engine / "rank0.onnx"
    size = path.stat().st_size
    data = path.read_bytes()
    path.write_bytes(data[:-10] if change == "truncate" else data + b"\0" * 10)
    found = size - 10 if change == "truncate" else size + 10
    with pytest.raises(EngineError, match=rf"rank0\.onnx: {found} bytes, the manifest says "
                                          rf"{size} \(truncated, extended or replaced\); rebuild"):
        open_engine(engine)


def test_same_size_corruption_loads_by_default_and_fails_verify_checksums(engine, caplog):
    record_sizes(engine)
    corrupt_a_weight(engine / "rank0.onnx")
    open_engine(engine)  # presence and sizes only: the corruption goes unnoticed
    with caplog.at_level(logging.INFO, logger="kiln.engine"):
        with pytest.raises(EngineError, match=r"rank0\.onnx: checksum mismatch"):
            open_engine(engine, ExecutorOptions(verify_checksums=True))
    assert "verifying checksums of 1 files (0.0 GB)" in caplog.messages


def test_manifest_without_sizes_checks_presence_only(engine, caplog):
    assert read_manifest(engine).sizes is None  # the toy manifest records none, as older kilns
    with caplog.at_level(logging.INFO, logger="kiln.engine"):
        open_engine(engine)
    assert any("records no file sizes" in m and "presence only" in m for m in caplog.messages)


def test_an_edited_manifest_is_warned_of_once_and_runs_as_it_reads(engine, caplog):
    """An engine's config.json edited by hand (its digest no longer matches) had run without a
    word: only kiln verify and --overwrite looked."""
    import json

    from kiln.runtime.loader import check_engine

    path = engine / "config.json"
    data = json.loads(path.read_text())
    data["limits"]["max_batch_size"] = 1
    path.write_text(json.dumps(data, indent=2))
    with caplog.at_level(logging.WARNING):
        check_engine(engine)
        manifest, _ = open_engine(engine)
    edited = [m for m in caplog.messages if "edited since the build" in m]
    assert edited == [f"{engine}/config.json: edited since the build (its content no longer "
                      f"matches the digest the build recorded in it), and the engine files were "
                      f"built for what it said then: restore the build's config.json, or "
                      f"rebuild with kiln build; it runs as it reads now"]
    assert manifest.limits.max_batch_size == 1
    caplog.clear()
    path.write_text(json.dumps({**data, "limits": {**data["limits"], "max_batch_size": 2}}))
    with caplog.at_level(logging.WARNING):  # undone (in other JSON formatting): no edit
        open_engine(engine)
    assert not [m for m in caplog.messages if "edited" in m]


def test_sizes_round_trip_through_the_manifest(engine):
    record_sizes(engine)
    manifest = read_manifest(engine)
    assert manifest.sizes == {"rank0.onnx": (engine / "rank0.onnx").stat().st_size}
    assert manifest.to_dict()["sizes"] == manifest.sizes


@pytest.mark.parametrize("tp,pp,rank,ranks", [(1, 1, 0, (0,)), (1, 3, 0, (0, 1, 2)),
                                             (2, 1, 1, (1,)), (2, 2, 1, (1, 3))])
def test_a_process_checks_the_ranks_it_opens(tp, pp, rank, ranks):
    manifest = read_manifest_dict(mapping={"tp_size": tp, "pp_size": pp})
    assert loaded_ranks(manifest, rank) == ranks


def test_missing_engine_file(engine):
    (engine / "rank0.onnx").unlink()
    with pytest.raises(EngineError, match="rank0.onnx: missing"):
        open_engine(engine)


def test_missing_tokenizer_is_a_clear_error(engine):
    with pytest.raises(TokenizerError, match="tokenizer.json: missing"):
        LLM(engine)


def test_newer_kiln_refused_before_any_file_is_read(engine):
    (engine / "rank0.onnx").unlink()  # would fail later; the version check comes first
    rewrite_manifest(engine, kiln_version="0.9.1")
    with pytest.raises(EngineError, match=r"built by kiln 0\.9\.1, this is kiln .*rebuild"):
        open_engine(engine)


def test_onnx_checks():
    # The manifest names the version it was built with; the machine's is given explicitly, so
    # the test does not depend on which onnxruntime this environment happens to have.
    manifest = read_manifest_dict(backend="onnx", backend_version={"onnxruntime": "1.31.1"})
    check_onnx(manifest, machine())
    check_onnx(manifest, machine(libraries={"onnxruntime": "1.32.0"}))  # newer is fine
    with pytest.raises(EngineError, match="needs ONNX Runtime.*pip install onnxruntime"):
        check_onnx(manifest, machine(libraries={}))
    with pytest.raises(EngineError, match="onnxruntime 1.31.1.*has 1.18.0.*upgrade"):
        check_onnx(manifest, machine(libraries={"onnxruntime": "1.18.0"}))
    tp2 = read_manifest_dict(backend="onnx", backend_version={"onnxruntime": "1.31.1"},
                             mapping={"tp_size": 2, "pp_size": 1})
    with pytest.raises(EngineError, match=r"tp_size 2.*no all-reduce.*--backend torch, "
                       r"which runs one process per rank, or --backend tensorrt \(NVIDIA GPUs\)"):
        check_onnx(tp2, machine())
    cuda = read_manifest_dict(backend="onnx", backend_version={"onnxruntime": "1.31.1"},
                              targets=["cuda"])
    with pytest.raises(EngineError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        check_onnx(cuda, machine(onnxruntime_providers=("CPUExecutionProvider",)))


def test_tensorrt_rtx_engine_on_hopper_explains_full_tensorrt_is_needed():
    with pytest.raises(EngineError, match="TensorRT-RTX does not support Hopper: full TensorRT "
                                          "is needed"):
        check_tensorrt(read_manifest_dict(**RTX), machine(gpus=((9, 0),)))


@pytest.mark.parametrize("changes,message", [
    ({"gpus": ()}, "no CUDA GPU"),
    ({"gpus": ((8, 0),)}, "targets sm86, sm89 but this GPU is sm80: rebuild with --target sm80"),
    ({"libraries": {}}, "built with tensorrt_rtx 1.7.1.116, which is not installed"),
    ({"libraries": {"tensorrt_rtx": "1.6.0"}}, "only load in the version that built them"),
])
def test_tensorrt_mismatches(changes, message):
    with pytest.raises(EngineError, match=message):
        check_tensorrt(read_manifest_dict(**RTX), machine(**changes))


def test_tensorrt_ranks_need_one_gpu_each():
    tp2 = read_manifest_dict(**RTX, mapping={"tp_size": 2, "pp_size": 1})
    with pytest.raises(EngineError, match="2 ranks but this machine has 1 GPU"):
        check_tensorrt(tp2, machine())
    check_tensorrt(tp2, machine(gpus=((8, 6), (8, 6))))


def test_full_tensorrt_engine_runs_on_its_own_capability():
    full = read_manifest_dict(**{**RTX, "backend_version": {"tensorrt": "10.13.0"},
                                 "targets": ["sm90"]})
    check_tensorrt(full, machine(gpus=((9, 0),), libraries={"tensorrt": "10.13.0"}))


def test_tensorrt_engine_refused_on_this_machine_before_loading(engine):
    rewrite_manifest(engine, **RTX)  # no rank0.engine exists: nothing may be read
    with pytest.raises(EngineError) as info:
        open_engine(engine, machine=machine(gpus=((9, 0),)))
    assert "Hopper" in str(info.value)
    with pytest.raises(EngineError, match="no CUDA GPU|not installed"):
        open_engine(engine)  # the real machine: no GPU here


_BASE: dict = {}


def read_manifest_dict(**changes):
    """A toy manifest with ``changes`` applied (from a pristine toy engine's config.json)."""
    import json
    import tempfile

    from kiln.engine import EngineManifest

    if not _BASE:
        with tempfile.TemporaryDirectory() as d:
            toy_engine_dir(Path(d) / "e", LIMITS)
            _BASE.update(json.loads((Path(d) / "e" / "config.json").read_text()))
            assert read_manifest(Path(d) / "e").backend == "onnx"
    return EngineManifest.from_dict({**_BASE, **changes})


def test_num_threads_far_past_the_cpus_is_refused(monkeypatch):
    """--num_threads 10000 on 2 cores had started ~3,000 threads and ignored SIGTERM for
    minutes (a new user's trial)."""
    from kiln.runtime.options import ExecutorOptions

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert ExecutorOptions(num_threads=64).num_threads == 64  # a few past the CPUs: allowed
    with pytest.raises(EngineError) as info:
        ExecutorOptions(num_threads=10000)
    assert str(info.value) == ("num_threads=10000 is more than 64, the most kiln starts (2 "
                               "CPU(s) here, and threads past them only contend); pass "
                               "num_threads=2 or fewer for speed, or leave it out (all cores)")
    from kiln.errors import options_as_flags

    with options_as_flags(), pytest.raises(EngineError) as info:  # kiln run's, as --dp's
        ExecutorOptions(num_threads=10000)
    assert str(info.value).startswith("--num_threads 10000 is more than 64, ")
    assert "; pass --num_threads 2 or fewer for speed" in str(info.value)


def test_num_threads_past_the_cpus_is_warned_about(engine, monkeypatch, caplog):
    """A trial's --num_threads 64 on 2 cores ran without a word, its first token 100x later."""
    from kiln.runtime.loader import check_engine

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level(logging.WARNING):
        check_engine(engine, ExecutorOptions(num_threads=2, device="cpu"))
        assert "num_threads" not in caplog.text
        check_engine(engine, ExecutorOptions(num_threads=64, device="cpu"))
    assert ("num_threads 64 is more than the 2 cores this process may use: its threads will "
            "wait for each other; leave it out (all cores) or give at most 2") in caplog.text
