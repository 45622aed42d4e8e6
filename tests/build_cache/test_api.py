"""engine_for_model: builds once, then hands out the cached engine (saying so); rebuilds on a
changed input; leaves nothing on failure or Ctrl-C; the hub path without a network."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.build_cache import api, cached_engine, engine_for_model, hold_engine
from kiln.build_cache.store import EngineCache
from kiln.cli.main import main
from kiln.errors import BuildCacheError, CheckpointError, ConfigError, KilnError


def _leftovers(cache_dir) -> list[str]:
    return sorted(p.name for p in (cache_dir / "engines").iterdir() if p.name.startswith(".")
                  and ".tmp-" in p.name)


def test_an_entry_built_from_another_path_s_identical_files_says_so(tiny_hf, cache_dir,
                                                                      tmp_path, caplog):
    """The key is the files' content: a trial's copy of a model was told the engine came from
    the other path, as if it were that model."""
    first = engine_for_model(tiny_hf)
    copy = Path(shutil.copytree(tiny_hf, tmp_path / "copy"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kiln.build_cache"):
        assert engine_for_model(copy) == first
    (line,) = [m for r in caplog.records if (m := r.getMessage()).startswith("using cached")]
    assert f"; from identical files at {tiny_hf}, built " in line


def test_a_miss_reads_the_source_once(tiny_hf, cache_dir, monkeypatch):
    """The preflight's conversion plan is the one the build writes: the source's config and
    tensor headers are opened once."""
    from kiln.converters import convert

    opened = []
    real = convert.open_source
    monkeypatch.setattr(convert, "open_source",
                        lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    engine = engine_for_model(tiny_hf)
    assert opened == [str(tiny_hf)] and (engine / "config.json").is_file()


def test_the_second_call_uses_the_cached_engine_and_says_so(tiny_hf, cache_dir, builds, caplog):
    with caplog.at_level(logging.WARNING, logger="kiln.build_cache"):
        first = engine_for_model(tiny_hf)
        caplog.clear()
        second = engine_for_model(tiny_hf)
    assert builds == [str(tiny_hf)] and first == second
    assert first.parent.parent == cache_dir / "engines"
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"using cached engine {first} (onnx, the default on a machine "
                           f"without a CUDA GPU; {tiny_hf}, built ")
    result = CliRunner().invoke(main, ["verify", str(first)])  # complete, checksums right
    assert result.exit_code == 0, result.output
    manifest = json.loads((first / "config.json").read_text())
    assert manifest["source"]["checkpoint_dir"] is None
    assert manifest["source"]["build_cache_key"].startswith(first.parent.name)
    assert (first / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in first.parent.iterdir()) == ["engine", "entry.json"]


def test_a_changed_input_rebuilds_and_both_stay(hf_copy, cache_dir, builds):
    first = engine_for_model(hf_copy, max_batch_size=2)
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    second = engine_for_model(hf_copy, max_batch_size=2)
    third = engine_for_model(hf_copy, max_batch_size=4)
    assert len({first, second, third}) == 3 and len(builds) == 3
    assert len(EngineCache(cache_dir).entries()) == 3


def test_a_failed_build_leaves_nothing(tiny_hf, cache_dir, monkeypatch):
    from kiln import builder
    from kiln.errors import BuildError

    def failing(*args, **kwargs):
        raise BuildError("the backend refused")

    monkeypatch.setattr(builder, "build", failing)
    with pytest.raises(BuildError):
        engine_for_model(tiny_hf)
    assert EngineCache(cache_dir).entries() == [] and _leftovers(cache_dir) == []
    assert list((cache_dir / "engines").glob("[0-9a-f]*.lock")) == []  # nor its lock file


@pytest.mark.parametrize("as_flags", [False, True])
def test_a_full_disk_names_the_entry_and_the_fix(tiny_hf, cache_dir, monkeypatch, as_flags):
    """A trial's KILN_CACHE_DIR on a full disk: "No space left on device" alone."""
    import errno

    from kiln.errors import options_as_flags

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kiln.converters.convert.copy_tokenizer", full)
    with pytest.raises(BuildCacheError) as raised, options_as_flags(as_flags):
        engine_for_model(tiny_hf)
    other = "set KILN_CACHE_DIR (or --cache_dir) to another directory" if as_flags else \
        "pass another cache_dir (or set KILN_CACHE_DIR)"
    assert re.fullmatch(rf"{re.escape(str(cache_dir / 'engines'))}/[0-9a-f]+: the build cache "
                        rf"entry cannot be written \(No space left on device\); nothing was "
                        rf"left half-written: free space on its file system, or "
                        rf"{re.escape(other)}", str(raised.value)), str(raised.value)
    assert EngineCache(cache_dir).entries() == [] and _leftovers(cache_dir) == []


def test_a_read_only_cache_serves_its_entries_and_refuses_a_build(tiny_hf, cache_dir, builds,
                                                                  monkeypatch, request, caplog):
    engine = engine_for_model(tiny_hf)

    def read_only(self):
        raise BuildCacheError(f"{self.dir}: the build cache cannot be written (Read-only file "
                              f"system); set KILN_CACHE_DIR (or --cache_dir) to a writable directory")

    monkeypatch.setattr(EngineCache, "ensure", read_only)
    request.getfixturevalue("read_only_locks")
    with caplog.at_level(logging.WARNING, logger="kiln.build_cache"):
        with cached_engine(tiny_hf) as path:
            assert path == engine and len(builds) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("using the build cache without its locks" in m for m in messages)
    with pytest.raises(BuildCacheError, match="cannot be written .*set KILN_CACHE_DIR"):
        engine_for_model(tiny_hf, max_batch_size=3)
    assert len(builds) == 1


def test_ctrl_c_during_a_build_leaves_nothing_and_the_next_call_builds(tiny_hf, cache_dir,
                                                                       monkeypatch, builds):
    from kiln import builder

    real = builder.build

    def interrupted(checkpoint, output, **kwargs):
        real(checkpoint, output, **kwargs)  # the engine is written, the entry is not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(builder, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine_for_model(tiny_hf)
    assert EngineCache(cache_dir).entries() == [] and _leftovers(cache_dir) == []
    assert list((cache_dir / "engines").glob("[0-9a-f]*.lock")) == []
    monkeypatch.setattr(builder, "build", real)
    assert engine_for_model(tiny_hf).is_dir() and len(builds) == 2


def test_a_damaged_entry_is_rebuilt(tiny_hf, cache_dir, builds, caplog):
    engine = engine_for_model(tiny_hf)
    data = next(engine.glob("rank0*.onnx*"))
    data.write_bytes(data.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="kiln.build_cache"):
        assert engine_for_model(tiny_hf) == engine
    assert len(builds) == 2
    assert any("is damaged" in r.getMessage() and data.name in r.getMessage()
               for r in caplog.records)
    assert api.damage(engine) is None


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _edit_text(path):
    path.write_text(path.read_text().replace("}", ', "mine": 1}', 1))


def _edit_limits(engine):
    manifest = json.loads((engine / "config.json").read_text())
    manifest["limits"]["max_seq_len"] *= 2
    (engine / "config.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("harm,named", [
    (lambda engine: (engine / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda engine: _truncate(engine / "tokenizer.json"),
     "tokenizer.json was changed since the build"),
    (lambda engine: _edit_text(engine / "tokenizer_config.json"),
     "tokenizer_config.json was changed since the build"),
    (_edit_limits, "config.json was edited since the build"),
    (lambda engine: (engine / "config.json").write_text('{"trunc'),
     "config.json is missing or unreadable"),
    (lambda engine: (engine / "config.json").unlink(), "config.json is missing or unreadable"),
], ids=["tokenizer-removed", "tokenizer-truncated", "tokenizer-config-edited", "config-edited",
         "config-truncated", "config-removed"])
def test_an_entry_damaged_beyond_its_rank_files_is_rebuilt(tiny_hf, cache_dir, builds, caplog,
                                                           harm, named):
    """A new-user trial: a removed tokenizer.json and an edited config.json were handed out
    (the runtime then refused them, naming kiln build, which refuses to write into the cache),
    and an unreadable config.json was "rebuilt" into a refusal that prune repeated."""
    engine = engine_for_model(tiny_hf)
    harm(engine)
    with caplog.at_level(logging.WARNING, logger="kiln.build_cache"):
        assert engine_for_model(tiny_hf) == engine
    assert len(builds) == 2
    assert any("is damaged" in r.getMessage() and named in r.getMessage()
               for r in caplog.records)
    assert api.damage(engine) is None


def test_a_users_file_in_an_entry_without_its_config_is_left_alone(tiny_hf, cache_dir, caplog):
    """The files the build wrote are recorded in entry.json; another name is not the cache's
    to delete, even where the manifest that would say so is gone."""
    engine = engine_for_model(tiny_hf)
    (engine / "config.json").unlink()
    (engine / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="kiln.build_cache"):
        with pytest.raises(BuildCacheError) as raised:
            engine_for_model(tiny_hf)
    assert str(raised.value) == (
        f"the cached engine {engine} is damaged (config.json is missing or unreadable) and is "
        f"not rebuilt, as {engine}: holds notes.txt, which the build did not write; move that "
        f"away and it is, or delete the entry {engine.parent} yourself")
    assert "rebuilding" not in caplog.text  # (a retest: said, then refused)
    assert (engine / "notes.txt").read_text() == "mine"
    (engine / "notes.txt").unlink()
    assert engine_for_model(tiny_hf) == engine and api.damage(engine) is None


def test_something_else_in_the_way_of_an_entry_is_refused(tiny_hf, cache_dir):
    request = api.request_for(tiny_hf)
    in_the_way = request.cache.dir / request.name
    in_the_way.mkdir(parents=True)
    (in_the_way / "mine.txt").write_text("user data")
    with pytest.raises(BuildCacheError, match="not made by the cache .*move it away"):
        engine_for_model(tiny_hf)
    assert (in_the_way / "mine.txt").read_text() == "user data"


def test_max_cache_size_evicts_least_recently_used_after_a_build(tiny_hf, cache_dir, builds,
                                                                caplog):
    first = engine_for_model(tiny_hf, max_batch_size=1)
    second = engine_for_model(tiny_hf, max_batch_size=2)
    engine_for_model(tiny_hf, max_batch_size=1)  # a use: second is now the least recent
    size = EngineCache(cache_dir).entries()[0].size()
    with hold_engine(first):
        third = engine_for_model(tiny_hf, max_batch_size=3, max_cache_size=2 * size + 1000)
    left = {e.engine_dir for e in EngineCache(cache_dir).entries()}
    assert left == {first, third} and not second.exists()
    assert "over its limit" not in caplog.text
    with hold_engine(first):  # in use: not evicted, though the limit asks for it
        engine_for_model(tiny_hf, max_batch_size=4, max_cache_size=1)
    assert {e.engine_dir for e in EngineCache(cache_dir).entries()} >= {first}
    # the cache left over its limit is said (it had been silent)
    assert "over its limit of 1 B: the engine just built and 1 in use are kept; kiln cache " \
        "prune --max_size frees the rest once they are done" in caplog.text
    caplog.clear()
    engine_for_model(tiny_hf, max_batch_size=5, max_cache_size=1)  # nothing in use now
    assert len(EngineCache(cache_dir).entries()) == 1  # the one just built
    # a trial: this had read "... and 0 in use are kept ... once they are done"
    assert "over its limit of 1 B: the engine just built is kept; the limit is below what " \
        "must be kept" in caplog.text
    assert len(builds) == 5


def test_a_hub_model_is_keyed_by_its_resolved_commit(tiny_hf, tmp_path, cache_dir, builds,
                                                     monkeypatch):
    """snapshot_download is faked by a local snapshot dir: nothing is downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commits = {"main": "1" * 40, "v2": "2" * 40}
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        commit = commits.get(revision or "main", revision)
        calls.append((repo_id, revision))
        snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
        if not snapshot.exists():
            shutil.copytree(tiny_hf, snapshot)
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    first = engine_for_model("org/tiny")
    assert engine_for_model("org/tiny", revision="main") == first
    assert engine_for_model("org/tiny", revision="1" * 40) == first
    other = engine_for_model("org/tiny", revision="v2")
    assert other != first and builds == ["org/tiny@" + "1" * 40, "org/tiny@" + "2" * 40]
    entry = EngineCache(cache_dir).read(first.parent.name)
    assert entry.parts["source"] == {"repo_id": "org/tiny", "commit": "1" * 40}
    source = json.loads((first / "config.json").read_text())["source"]
    assert source["repo_id"] == "org/tiny" and source["revision"] == "1" * 40
    assert ("org/tiny", "1" * 40) in calls  # the conversion read the commit it was keyed on


@pytest.mark.parametrize("model, options, error, message", [
    ("{tmp}/missing", {}, CheckpointError, "no such local directory"),
    ("", {}, CheckpointError, "model is empty"),
    ("{engine}", {}, CheckpointError, "is an engine dir, not a Hugging Face checkpoint"),
    ("{hf}", {"max_batch_size": 0}, ConfigError, "max_batch_size must be a positive integer"),
    ("{hf}", {"max_batch_sizes": 8}, ConfigError, "unknown options ['max_batch_sizes']"),
    ("{hf}", {"max_batchsize": 4}, ConfigError, "(max_batchsize: did you mean max_batch_size?); "
                                                "it takes allow_long_context, allow_pickle, "
                                                "backend, cache_dir, check, dtype,"),
    ("{hf}", {"revision": "main"}, ConfigError, "revision='main': {hf} is a local directory"),
    ("{hf}", {"dtype": "float64"}, ConfigError, "dtype must be auto or one of"),
    ("{hf}", {"plugins": {"nope": "enable"}}, ConfigError, "unknown plugins ['nope']"),
    ("{hf}", {"plugins": {"norm": "on"}}, ConfigError, "plugins['norm'] must be one of"),
    ("{hf}", {"max_cache_size": -1}, ConfigError, "max_cache_size -1 must be at least 1 byte"),
    ("{hf}", {"max_cache_size": "lots"}, ConfigError, "max_cache_size 'lots' is not a size like "
                                                      "20GB, 512MiB or 2000000000 (a string, or "
                                                      "a number of bytes)"),
    ("{hf}", {"max_build_memory": "18XB"}, ConfigError, "max_build_memory '18XB' is not a size"),
    ("{hf}", {"backend": "nope"}, KilnError, "unknown backend 'nope'"),
    (5, {}, CheckpointError, "model must be a path (a str or os.PathLike), found int 5"),
    # a trial's cache_dir="" had built a cache entry under ./engines
    ("{hf}", {"cache_dir": ""}, BuildCacheError, "cache_dir is empty; give the build cache's "
                                                 "directory, or leave it out for the default"),
    ("{hf}", {"cache_dir": " "}, BuildCacheError, "cache_dir is empty"),
    ("{hf}", {"cache_dir": "-"}, BuildCacheError, "cache_dir='-': kiln reads '-' as standard "
                                                  "input or output, not a directory; give the "
                                                  "directory's path (./- for one named '-')"),
    ("{hf}", {"cache_dir": Path("-")}, BuildCacheError, "cache_dir='-': kiln reads '-'"),
    ("{hf}", {"cache_dir": 5}, BuildCacheError, "cache_dir must be a path (a str or "
                                                "os.PathLike), found int 5"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_hf, tmp_path, cache_dir, builds, model,
                                                  options, error, message, monkeypatch):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"format_version": 1, "backend": "onnx"}))
    if isinstance(model, str):
        model = model.format(tmp=tmp_path, hf=tiny_hf, engine=engine)
    monkeypatch.chdir(tmp_path)  # an empty cache_dir had been the current directory
    with pytest.raises(error) as raised:
        engine_for_model(model, **options)
    assert message.format(hf=tiny_hf) in str(raised.value) and "\n" not in str(raised.value)
    assert builds == []
    assert EngineCache(cache_dir).entries() == []
    assert {p.name for p in tmp_path.iterdir()} <= {"engine", "kiln-cache"}


@pytest.mark.parametrize("root, where", [("{hf}", "is {hf}, a Hugging Face checkpoint"),
                                         ("{hf}/sub", "lies inside {hf}, a Hugging Face "
                                                      "checkpoint"),
                                         ("{ckpt}/x/y", "lies inside {ckpt}, a kiln checkpoint"),
                                         ("{engine}", "is {engine}, an engine dir")])
def test_a_cache_root_in_a_checkpoint_or_engine_dir_is_refused_before_any_write(
        hf_copy, tmp_path, builds, root, where):
    """A retest's --cache_dir naming its --model_dir had written engines/ among the model's
    files, and one naming a kiln checkpoint had left it one that --overwrite refused (it holds
    'engines', which kiln did not write)."""
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    for directory, manifest in ((ckpt, {"format_version": 1, "decoder": {}, "mapping": {}}),
                                (engine, {"format_version": 1, "backend": "onnx"})):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(manifest))
    before = {p: sorted(p.rglob("*")) for p in (hf_copy, ckpt, engine)}
    root = Path(root.format(hf=hf_copy, ckpt=ckpt, engine=engine))
    with pytest.raises(BuildCacheError) as raised:
        engine_for_model(hf_copy, cache_dir=root)
    assert str(raised.value) == (
        f"{root}: the build cache {where.format(hf=hf_copy, ckpt=ckpt, engine=engine)}; its "
        f"engines/ would be written among that directory's files: set KILN_CACHE_DIR (or "
        f"--cache_dir) to a directory outside it")
    assert builds == [] and {p: sorted(p.rglob("*")) for p in before} == before
    result = CliRunner().invoke(main, ["run", "--model_dir", str(hf_copy), "--cache_dir",
                                       str(root), "--input_text", "hi"])
    assert result.exit_code == 2 and result.output == f"error: {raised.value}\n", result.output
    assert {p: sorted(p.rglob("*")) for p in before} == before


def test_a_cache_root_in_another_cache_is_refused_before_any_write(tiny_hf, tmp_path,
                                                                    cache_dir):
    """Retest 44c: a --cache_dir naming an entry of a cache had built into it (leaving its
    content-hash memo there), and one naming a cache's engines dir (as kiln cache list shows
    it) had made a second cache inside."""
    entry = Path(engine_for_model(tiny_hf)).parent
    engines = entry.parent
    before = sorted(cache_dir.rglob("*"))
    for root, said in ((entry, f"{entry}: the build cache is {entry}, an entry of another build "
                               f"cache, which manages it"),
                       (entry / "engine" / "x", f"{entry / 'engine' / 'x'}: the build cache lies "
                                                f"inside {entry}, an entry of another build cache"),
                       (engines, f"{engines}: is the engines dir of the build cache at "
                                 f"{cache_dir}; set KILN_CACHE_DIR (or --cache_dir) to that, the "
                                 f"cache's root")):
        with pytest.raises(BuildCacheError) as raised:
            engine_for_model(tiny_hf, cache_dir=root)
        assert str(raised.value).startswith(said), str(raised.value)
    assert sorted(cache_dir.rglob("*")) == before


@pytest.mark.parametrize("model, message", [
    ("", "--model_dir is empty; pass an HF checkpoint directory or hub id"),
    (5, "--model_dir must be a path (a str or os.PathLike), found int 5"),
])
def test_the_model_is_named_as_its_flag_inside_a_command(cache_dir, builds, model, message):
    """A trial's kiln run --model_dir '' was told "--model is empty": there is no --model."""
    from kiln.errors import options_as_flags

    with pytest.raises(CheckpointError) as raised, options_as_flags():
        engine_for_model(model)
    assert str(raised.value) == message


def test_sizes_are_taken_as_the_cli_takes_them(tiny_hf, cache_dir, builds):
    """A trial's LLM(model=..., max_build_memory="18GB") was refused ("must be a positive
    integer") while kiln run --model_dir took --max_build_memory 18GB."""
    request = api.request_for(tiny_hf, max_build_memory="18GB")
    assert request.build.max_build_memory == 18 * 10**9
    engine_for_model(tiny_hf, max_cache_size="1GiB", max_build_memory="512MiB")
    assert len(builds) == 1


def test_cached_engine_holds_its_entry_for_the_body(tiny_hf, cache_dir, builds):
    cache = EngineCache(cache_dir)
    with cached_engine(tiny_hf) as engine:
        assert engine == engine_for_model(tiny_hf)
        assert [e.engine_dir for e in cache.prune(everything=True).in_use] == [engine]
    assert [e.engine_dir for e in cache.prune(everything=True).removed] == [engine]
    assert len(builds) == 1


def test_cached_engine_looks_up_again_an_entry_pruned_before_it_was_held(tiny_hf, cache_dir,
                                                                          builds, monkeypatch):
    real = api.engine_for_model
    looked_up = []

    def pruned_right_after(*args, **kwargs):
        engine = real(*args, **kwargs)
        looked_up.append(engine)
        if len(looked_up) == 1:  # a kiln cache prune in another process, between the two steps
            assert EngineCache(cache_dir).prune(everything=True).removed
        return engine

    monkeypatch.setattr(api, "engine_for_model", pruned_right_after)
    with cached_engine(tiny_hf) as engine:
        assert api.damage(engine) is None and EngineCache(cache_dir).read(engine.parent.name)
    assert len(looked_up) == 2 and len(builds) == 2


def test_a_cache_hit_imports_neither_onnx_nor_the_converter_and_builder_code(tiny_hf, cache_dir):
    """What a hit needs of the backend (its versions, its default targets) is read without
    onnx (~0.6 s to import) and without the graph, conversion or build modules. Both calls run
    in fresh processes (this one's code digest is cached, and the code may change meanwhile)."""
    code = f"""
import json, sys
from kiln.build_cache import engine_for_model
engine = str(engine_for_model({str(tiny_hf)!r}))
heavy = ("onnx", "kiln.builder.graph.context", "kiln.builder.api", "kiln.converters.convert")
print(json.dumps([engine, [m for m in heavy if m in sys.modules]]))
"""
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    (built, imported), (found, hit_imported) = (json.loads(r.stdout) for r in runs)
    assert "building the engine" in runs[0].stderr and imported  # a build needs them
    assert found == built and "using cached engine" in runs[1].stderr
    assert hit_imported == []


def test_hold_engine_holds_an_engine_of_another_cache_root(tmp_path, monkeypatch):
    """A trial ran an engine of a second cache root with the shell's KILN_CACHE_DIR elsewhere:
    it was not held, so `kiln cache prune --all --cache_dir <that root>` could delete it while
    it ran."""
    from tests.build_cache.test_store import fake_entry

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "shell-cache"))
    other = EngineCache(tmp_path / "other-cache")
    other.ensure()
    entry = fake_entry(other, "a", age_days=10)
    with hold_engine(entry.engine_dir):
        assert [e.name for e in other.prune(everything=True).in_use] == [entry.name]
    assert other.read(entry.name).last_used > entry.last_used  # and counted as a use
    assert not (tmp_path / "shell-cache").exists()


def test_a_default_length_below_two_names_the_models_config(hf_copy, cache_dir, builds):
    """A trial's kiln run --model_dir of a config.json edited to max_position_embeddings 1 was
    told of "(config.json)": the cache's checkpoint dir is its own, not the model's."""
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1}))
    with pytest.raises(ConfigError, match=re.escape(
            f"max_position_embeddings 1 ({hf_copy / 'config.json'}), below the 2 kiln builds")) \
            as e:
        engine_for_model(hf_copy)
    # the cache converts again by itself (a retest's user had been told to convert it again)
    assert str(e.value).endswith("or fix the model's config.json") and builds == []


def test_a_bad_max_position_embeddings_read_for_the_key_names_its_file(hf_copy, cache_dir,
                                                                       builds):
    """Given lengths, the key reads max_position_embeddings first: its refusal had said
    "config.json: ..." without the path that conversion's names."""
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": "64"}))
    with pytest.raises(ConfigError) as raised:
        engine_for_model(hf_copy, max_seq_len=16)
    assert str(raised.value) == (f"{hf_copy / 'config.json'}: max_position_embeddings must be a "
                                 f"positive integer, found '64'; fix it in config.json")
    assert builds == []
