"""EngineCache on disk: entries, prune by age / all / size (least recently used first), locks,
and never deleting what the cache did not create. Entries here are made by hand (no build)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from kiln.build_cache.hashes import MEMO_NAME
from kiln.build_cache.store import (
    NAME_CHARS,
    EngineCache,
    Entry,
    cache_of,
    damage,
    describe_options,
)
from kiln.errors import BuildCacheError

DAY = 86400.0


@pytest.fixture
def cache(tmp_path):
    cache = EngineCache(tmp_path / "root")
    cache.ensure()
    return cache


def fake_entry(cache: EngineCache, seed: str, age_days: float = 0.0, size: int = 1000) -> Entry:
    """A complete entry with a one-file onnx engine of ``size`` bytes, last used
    ``age_days`` ago."""
    key = hashlib.sha256(seed.encode()).hexdigest()
    name = key[:NAME_CHARS]
    tmp = cache.new_tmp(name)
    engine = tmp / "engine"
    engine.mkdir()
    (engine / "rank0.onnx").write_bytes(b"\0" * size)
    (engine / "config.json").write_text(json.dumps({
        "format_version": 1, "kiln_version": "0.1.0", "backend": "onnx",
        "rank_files": {"0": ["rank0.onnx"]}, "sizes": {"rank0.onnx": size}}))
    when = time.time() - age_days * DAY
    entry = cache.install(tmp, name, {"key": key, "parts": {}, "source": f"/models/{seed}",
                                      "backend": "onnx", "created": when,
                                      "build_seconds": 1.0})
    os.utime(entry.path / "entry.json", (when, when))
    return cache.read(name)


def leftover(cache: EngineCache, name: str) -> Path:
    """A .tmp / .del dir called ``name`` as the cache makes it (marked), holding a file."""
    path = cache.new_tmp("f" * NAME_CHARS).rename(cache.dir / name)
    (path / "checkpoint").mkdir()
    (path / "checkpoint" / "rank0.safetensors").write_bytes(b"\0" * 5000)
    return path


def names(entries) -> list[str]:
    return sorted(e.source.removeprefix("/models/") for e in entries)


def test_entries_are_listed_least_recently_used_first(cache):
    for seed, age in (("b", 1), ("a", 3), ("c", 0.5)):
        fake_entry(cache, seed, age)
    assert [e.source for e in cache.entries()] == ["/models/a", "/models/b", "/models/c"]
    assert cache.read(cache.entries()[0].name).engine_dir.is_dir()


def test_a_use_moves_an_entry_to_the_end(cache):
    old, new = fake_entry(cache, "old", 3), fake_entry(cache, "new", 1)
    cache.touch(old)
    assert [e.name for e in cache.entries()] == [new.name, old.name]


def test_prune_older_than(cache):
    sizes = {e.name: e.size() for e in (fake_entry(cache, s, a) for s, a in
                                        (("a", 10), ("b", 8), ("c", 1)))}
    result = cache.prune(older_than=7 * DAY)
    assert names(result.removed) == ["a", "b"]
    assert names(cache.entries()) == ["c"]
    assert result.freed == sum(sizes[e.name] for e in result.removed)


def test_prune_all(cache):
    for seed in "abc":
        fake_entry(cache, seed)
    (cache.dir / MEMO_NAME).write_text("{}")
    assert names(cache.prune(everything=True).removed) == ["a", "b", "c"]
    assert list(cache.dir.iterdir()) == []  # no entry, leftover, lock file or hash memo


def test_max_size_evicts_least_recently_used_first(cache):
    entries = [fake_entry(cache, seed, age, size=10_000) for seed, age in
               (("newest", 0), ("oldest", 5), ("middle", 2), ("older", 3))]
    size = entries[0].size()
    result = cache.prune(max_size=2 * size + size // 2)
    assert [e.source for e in result.removed] == ["/models/oldest", "/models/older"]
    assert names(cache.entries()) == ["middle", "newest"]
    assert sum(e.size() for e in cache.entries()) <= 2 * size + size // 2


def test_an_entry_in_use_is_kept_and_the_next_one_goes(cache):
    oldest, older, new = (fake_entry(cache, s, a, size=10_000) for s, a in
                          (("oldest", 5), ("older", 3), ("new", 0)))
    # held as hold() holds it, less the use it records (which would make it the newest)
    with cache.locked(oldest.name, write=False):
        result = cache.prune(max_size=2 * new.size() + 10)
        assert [e.name for e in result.in_use] == [oldest.name]
        assert [e.name for e in result.removed] == [older.name]
        assert [e.name for e in cache.prune(everything=True).removed] == [new.name]
    assert names(cache.entries()) == ["oldest"]


def test_a_build_in_progress_blocks_prune_not_the_other_way(cache):
    entry = fake_entry(cache, "a", 9)
    with cache.locked(entry.name, write=True):
        assert cache.prune(everything=True).in_use == [entry]
    assert cache.prune(everything=True).removed == [entry]


def test_prune_refuses_what_the_cache_did_not_create(cache, tmp_path):
    mine = fake_entry(cache, "mine", 9)
    edited = fake_entry(cache, "edited", 9)
    (edited.engine_dir / "my-notes.txt").write_text("keep me")
    beside = fake_entry(cache, "beside", 9)
    (beside.path / "outputs").mkdir()
    user_dir = cache.dir / ("0" * NAME_CHARS)  # an entry's name, but no entry.json
    user_dir.mkdir()
    (user_dir / "data.bin").write_bytes(b"user data")
    other = cache.dir / "my-engines"
    other.mkdir()
    unmarked = cache.dir / ("1" * NAME_CHARS)
    unmarked.mkdir()
    (unmarked / "entry.json").write_text(json.dumps({"key": "1" * 64, "source": "x"}))
    target = tmp_path / "user-engine"
    target.mkdir()
    (target / "entry.json").write_text((mine.path / "entry.json").read_text())
    (cache.dir / ("2" * NAME_CHARS)).symlink_to(target)
    fixtures = cache.root / "fixtures" / "model"
    fixtures.mkdir(parents=True)

    result = cache.prune(everything=True)

    assert [e.name for e in result.removed] == [mine.name]
    assert sorted(str(p) for p, _ in result.refused) == sorted([str(edited.path),
                                                                 str(beside.path)])
    assert any("my-notes.txt" in why for _, why in result.refused)
    assert (edited.engine_dir / "my-notes.txt").read_text() == "keep me"
    assert (beside.path / "outputs").is_dir() and edited.engine_dir.is_dir()
    for path in (user_dir / "data.bin", other, unmarked / "entry.json", target / "entry.json",
                 fixtures):
        assert path.exists()
    _, _, foreign = cache.names()
    assert other in foreign and cache.dir / ("2" * NAME_CHARS) in foreign


def test_leftovers_of_killed_builds_go_unless_a_build_runs(cache):
    dead = leftover(cache, f".{'a' * NAME_CHARS}.tmp-999999-x1")
    live = leftover(cache, f".{'b' * NAME_CHARS}.tmp-{os.getpid()}-x2")
    deleting = leftover(cache, f".{'c' * NAME_CHARS}.del-999999-x3")
    with cache.locked("b" * NAME_CHARS, write=True):  # its build is running
        result = cache.prune()
    assert sorted(p for p, _ in result.leftovers) == sorted([dead, deleting])
    assert all(5000 <= size < 5100 for _, size in result.leftovers)  # + the marker
    assert live.exists() and not dead.exists() and not deleting.exists()


def test_a_dir_named_like_a_leftover_is_not_one_without_the_cache_s_marker(cache):
    mine = cache.dir / f".{'0' * NAME_CHARS}.tmp-1-x"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    result = cache.prune(everything=True)
    assert result.leftovers == [] and (mine / "notes.txt").read_text() == "user data"
    assert mine in cache.names()[2]  # listed as not the cache's


def test_an_install_leaves_no_marker_in_the_entry(cache):
    entry = fake_entry(cache, "a")
    assert sorted(p.name for p in entry.path.iterdir()) == ["engine", "entry.json"]
    assert cache.foreign_content(entry) is None


def test_dry_run_lists_the_leftovers_it_would_remove(cache):
    dead = leftover(cache, f".{'a' * NAME_CHARS}.tmp-999999-x1")
    result = cache.prune(dry_run=True)
    assert [p for p, _ in result.leftovers] == [dead] and dead.exists()
    assert 5000 <= result.leftovers[0][1] < 5100


def test_a_lock_file_that_is_not_a_lock_is_named_and_left_alone(cache):
    entry = fake_entry(cache, "a", 9)
    lock = cache.dir / f"{entry.name}.lock"
    lock.write_text("x\n")
    with pytest.raises(BuildCacheError, match=f"^{lock}: is not a kiln lock file .*move it away"):
        with cache.locked(entry.name, write=False):
            pass
    result = cache.prune(everything=True)
    assert result.removed == [] and [p for p, _ in result.refused] == [entry.path]
    assert "is not a kiln lock file" in result.refused[0][1]
    entry.path.rename(cache.dir / "elsewhere")  # its lock file is now an orphan: still kept
    result = cache.prune(everything=True)
    assert lock.read_text() == "x\n" and [p for p, _ in result.refused] == [lock]


def test_a_read_only_cache_is_used_unlocked_with_one_warning_and_not_written(
        cache, read_only_locks, caplog):
    entry = fake_entry(cache, "a")
    with caplog.at_level(logging.WARNING), cache.hold(entry.engine_dir):
        with cache.hold(entry.engine_dir):
            pass
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "using the build cache without its locks" in warnings[0]
    with pytest.raises(BuildCacheError, match="cannot be written .*needs a writable build cache"):
        with cache.locked(entry.name, write=True):
            pass


def test_lock_files_without_an_entry_go_only_under_their_lock(cache):
    name = "a" * NAME_CHARS
    with cache.locked(name, write=True):
        cache.drop_lock(name)
    assert not (cache.dir / f"{name}.lock").exists()
    leftover(cache, f".{name}.tmp-999999-x")
    with cache.locked(name, write=True):
        cache.drop_lock(name)  # a leftover of that name: kept for the next build's lock
    assert (cache.dir / f"{name}.lock").exists()


def test_describe_options_shows_what_tells_entries_apart():
    parts = {"convert": {"dtype": "float32", "tp_size": 2, "pp_size": 1},
             "targets": ["cpu"],
             "build": {"max_batch_size": 8, "max_seq_len": 512, "max_input_len": None,
                       "plugins": {"norm": "disable"}, "gather_context_logits": True,
                       "allow_long_context": False}}
    assert describe_options(parts) == ("float32 tp2xpp1 cpu gather_context_logits "
                                       "max_seq_len=512 norm=disable")
    assert describe_options({}) == "-"


def test_dry_run_removes_nothing(cache):
    entries = [fake_entry(cache, s, 9) for s in "ab"]
    result = cache.prune(everything=True, dry_run=True)
    assert names(result.removed) == ["a", "b"] and result.freed == sum(e.size() for e in entries)
    assert names(cache.entries()) == ["a", "b"]


def test_a_dry_run_reports_what_the_real_one_would_keep(cache):
    """An entry in use, or one holding a user's file, is kept by a prune: its dry run says so
    too (a new-user trial saw 'would remove' on an engine a server was holding)."""
    held, edited, free = (fake_entry(cache, s, a, size=100) for s, a in
                          (("held", 3), ("edited", 2), ("free", 1)))
    (edited.engine_dir / "my-notes.txt").write_text("keep me")
    with cache.hold(held.engine_dir):
        dry = cache.prune(everything=True, dry_run=True)
        assert names(dry.in_use) == ["held"] and names(dry.removed) == ["free"]
        assert [p for p, _ in dry.refused] == [edited.path] and dry.freed == free.size()
        real = cache.prune(everything=True)
    assert (names(real.in_use), names(real.removed), real.refused) == (
        names(dry.in_use), names(dry.removed), dry.refused)


def test_lock_files_of_removed_entries_go(cache):
    entry = fake_entry(cache, "a")
    with cache.locked(entry.name, write=False):
        pass
    assert (cache.dir / f"{entry.name}.lock").exists()
    cache.prune(everything=True)
    assert not (cache.dir / f"{entry.name}.lock").exists()


def test_holding_an_engine_counts_as_a_use(cache):
    """`kiln run --engine_dir <an engine in the cache>` had held the entry without recording
    the use, so LRU pruning took it for unused since its build."""
    used = fake_entry(cache, "used", 10)
    fake_entry(cache, "other", 5)
    with cache.hold(used.engine_dir):
        pass
    assert cache.read(used.name).last_used > time.time() - 60
    assert names(cache.prune(older_than=DAY).removed) == ["other"]


def test_a_use_is_recorded_when_it_ends_too(cache):
    """A trial: the use was recorded when a run started, so `prune --older_than 7d` right after
    a week-long `kiln serve` took its engine as a week unused."""
    entry = fake_entry(cache, "served", 10)
    with cache.hold(entry.engine_dir):
        week_ago = time.time() - 7 * DAY
        os.utime(entry.path / "entry.json", (week_ago, week_ago))  # the serve ran for a week
    assert cache.read(entry.name).last_used > time.time() - 60
    assert names(cache.prune(older_than=DAY).removed) == []


@pytest.mark.parametrize("spelling", ["dotdot", "link to the engine", "link to the cache"])
def test_an_engine_held_by_any_spelling_of_its_path_is_kept_and_used(cache, tmp_path, spelling):
    """A trial ran `kiln run --engine_dir ../cache/engines/<entry>/engine`: the entry was not
    held, and `kiln cache prune --all` deleted the engine while it ran."""
    entry = fake_entry(cache, "a", 10)
    if spelling == "dotdot":
        path = entry.engine_dir.parent / ".." / entry.name / "engine"
    elif spelling == "link to the engine":
        path = tmp_path / "my-engine"
        path.symlink_to(entry.engine_dir)
    else:
        (tmp_path / "cache-link").symlink_to(cache.dir)
        path = tmp_path / "cache-link" / entry.name / "engine"
    with cache.hold(path):
        assert names(cache.prune(everything=True).in_use) == ["a"]
    assert cache.read(entry.name).last_used > time.time() - 60


def test_hold_refuses_a_removed_entry_and_passes_other_dirs(cache, tmp_path):
    entry = fake_entry(cache, "a")
    cache.prune(everything=True)
    with pytest.raises(Exception, match="removed .*kiln cache prune"):
        with cache.hold(entry.engine_dir):
            pass
    with cache.hold(tmp_path / "engine") as path:
        assert path == tmp_path / "engine"


def test_cache_of_finds_the_cache_an_engine_dir_lies_in(cache, tmp_path):
    entry = fake_entry(cache, "a")
    assert cache_of(entry.engine_dir).root == cache.root
    assert cache_of(entry.engine_dir / ".." / "engine").root == cache.root
    (entry.path / "entry.json").write_text("{}")  # not an entry the cache wrote
    assert cache_of(entry.engine_dir) is None
    fake = tmp_path / "mine" / "engines" / entry.name / "engine"  # the shape alone
    fake.mkdir(parents=True)
    assert cache_of(fake) is None and cache_of(tmp_path) is None


def test_damage_names_a_missing_or_truncated_file(cache):
    entry = fake_entry(cache, "a")
    assert damage(entry.engine_dir) is None
    (entry.engine_dir / "rank0.onnx").write_bytes(b"\0" * 10)
    assert "rank0.onnx has 10 bytes" in damage(entry.engine_dir)
    (entry.engine_dir / "rank0.onnx").unlink()
    assert damage(entry.engine_dir) == "rank0.onnx is missing"


def test_a_manifest_or_entry_with_a_byte_order_mark_is_read_as_kiln_reads_it(cache):
    """An engine's config.json saved with a BOM (kiln run reads it) is no damage, and an
    entry.json saved so is still the cache's: they had been rebuilt or listed as foreign."""
    entry = fake_entry(cache, "a")
    for path in (entry.engine_dir / "config.json", entry.path / "entry.json"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert damage(entry.engine_dir) is None
    assert cache.read(entry.name) is not None


def test_an_unwritable_cache_dir_is_one_line_with_the_fix(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match="cannot be written .*set KILN_CACHE_DIR"):
        EngineCache(tmp_path / "file").ensure()


def test_an_empty_kiln_cache_dir_is_unset_and_a_blank_or_dash_one_is_refused(tmp_path,
                                                                           monkeypatch):
    """As the XDG spec reads an empty variable, KILN_CACHE_DIR= is the default; " " and "-"
    had made a cache in ./ and ./- (--cache_dir refuses both)."""
    from click.testing import CliRunner

    from kiln.build_cache.store import cache_root
    from kiln.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("KILN_CACHE_DIR", "")
    assert cache_root() == tmp_path / "xdg" / "kiln"
    for value, said in ((" ", "KILN_CACHE_DIR is blank (' '); set it to the build cache's "
                              "directory, or unset it for the default"),
                        ("-", "KILN_CACHE_DIR is '-', which kiln reads as standard input or "
                              "output, not a directory; set it to the build cache's directory "
                              "(./- for one named '-'), or unset it")):
        monkeypatch.setenv("KILN_CACHE_DIR", value)
        with pytest.raises(BuildCacheError, match=re.escape(said)):
            EngineCache()
        result = CliRunner().invoke(main, ["cache", "list"])
        assert result.exit_code == 2 and result.output.startswith(f"error: {said}"), \
            result.output
    monkeypatch.setenv("KILN_CACHE_DIR", "./-")  # a directory named "-"
    assert cache_root() == tmp_path / "-"
    assert sorted(os.listdir(tmp_path)) == []


def test_a_relative_cache_dir_is_made_absolute(tmp_path, monkeypatch):
    """KILN_CACHE_DIR=relative (or --cache_dir relative) names one place however kiln is
    run later from elsewhere, and messages show where that is."""
    from kiln.build_cache.store import cache_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KILN_CACHE_DIR", "rel")
    assert cache_root() == tmp_path / "rel"
    assert EngineCache("other").dir == tmp_path / "other" / "engines"


@pytest.mark.parametrize("root, what", [("/dev/null", "/dev/null: the build cache is a character "
                                                      "device, not a directory"),
                                        ("/dev/null/x", "/dev/null/x: the build cache cannot be "
                                                        "made there, /dev/null is a character "
                                                        "device, not a directory"),
                                        ("{tmp}/file/sub", "{tmp}/file/sub: the build cache "
                                                           "cannot be made there, {tmp}/file is "
                                                           "a file, not a directory")])
def test_a_root_that_is_or_runs_through_no_directory_is_one_line(tmp_path, root, what):
    """A trial's KILN_CACHE_DIR=/dev/null/x had failed in a lock's mkdir with a bare "Not a
    directory", and /dev/null had been called a file."""
    (tmp_path / "file").write_text("mine")
    root = root.format(tmp=tmp_path)
    with pytest.raises(BuildCacheError) as e:
        EngineCache(root).check_dir()
    assert str(e.value) == (f"{what.format(tmp=tmp_path)}; set KILN_CACHE_DIR (or --cache_dir) "
                            f"to a directory")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("xdg", ["rel", " ", "./x", "~nouser/x"])
def test_an_xdg_cache_home_not_absolute_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog,
                                                                   xdg):
    """The XDG Base Directory spec says to ignore a relative path: a retest's " " and "rel" had
    made a cache under each working directory, without a word."""
    from kiln.build_cache import store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KILN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(store, "_warned_xdg", set())
    with caplog.at_level(logging.WARNING, logger="kiln.build_cache.store"):
        assert store.cache_root() == tmp_path / "home" / ".cache" / "kiln"
        assert store.cache_root() == tmp_path / "home" / ".cache" / "kiln"
    assert [r.getMessage() for r in caplog.records] == [
        f"XDG_CACHE_HOME {xdg!r} is not an absolute path, which the XDG Base Directory spec says "
        f"to ignore: the build cache is ~/.cache/kiln (set KILN_CACHE_DIR for another)"]
