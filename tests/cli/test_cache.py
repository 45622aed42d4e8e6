"""``kiln cache list / prune / build``: output, one-line errors (exit 2), no torch for listing
and pruning's start-up, and every ``kiln build`` option offered by ``kiln cache build``."""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.cli.build import build as build_command
from kiln.cli.cache import build as cache_build
from kiln.cli.main import main
from tests.build_cache.conftest import read_only_locks  # noqa: F401 (a fixture)
from tests.build_cache.test_store import fake_entry, leftover
from tests.cli.test_main import heavy_imports


def _invoke(*args):
    return CliRunner().invoke(main, list(args), prog_name="kiln")


@pytest.fixture
def cache(cache):
    """The shared empty cache (tests/conftest.py), its directory made."""
    cache.ensure()
    return cache


def test_list_shows_entries_most_recent_first_and_what_is_not_the_cache_s(cache):
    fake_entry(cache, "old-model", age_days=3, size=2_000_000)
    fake_entry(cache, "new-model", age_days=0, size=1000)
    (cache.dir / "my-stuff").mkdir()
    dead = leftover(cache, f".{'a' * 20}.tmp-999999-x")
    (dead / "checkpoint" / "rank0.safetensors").write_bytes(b"\0" * 3_000_000)
    result = _invoke("cache", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{cache.dir}: 2 cached engines, 2.0 MB (and 1 leftover, 3.0 MB)"
    assert lines[1].split() == ["NAME", "SIZE", "BACKEND", "LAST", "USED", "OPTIONS", "SOURCE"]
    assert lines[2].endswith("/models/new-model") and "s ago" in lines[2]
    assert lines[3].endswith("/models/old-model") and "3 d ago" in lines[3]
    assert (f"leftover of a build or prune that did not finish (3.0 MB; in progress, or killed: "
            f"kiln cache prune removes the latter): {dead}") in lines
    assert f"not made by the cache, left alone: {cache.dir / 'my-stuff'}" in result.output


def test_list_marks_an_entry_in_use(cache):
    entry = fake_entry(cache, "m")
    with cache.hold(entry.engine_dir):
        result = _invoke("cache", "list", "--cache_dir", str(cache.root))
    assert result.output.splitlines()[2].endswith("/models/m (in use)")


def test_prune_by_age_all_and_size(cache):
    for seed, age in (("a", 10), ("b", 5), ("c", 1), ("d", 0)):
        fake_entry(cache, seed, age_days=age, size=100_000)
    result = _invoke("cache", "prune", "--older_than", "7d")
    assert result.exit_code == 0, result.output
    assert "removed " in result.output and "/models/a" in result.output
    assert "removed 1 cached engine" in result.output.splitlines()[-1]
    result = _invoke("cache", "prune", "--max_size", "250kB")
    assert [e.source for e in cache.entries()] == ["/models/c", "/models/d"]
    result = _invoke("cache", "prune", "--all", "--dry_run")
    assert "would remove 2 cached engines" in result.output and len(cache.entries()) == 2
    result = _invoke("cache", "prune", "--all")
    assert cache.entries() == [] and "0 left in" in result.output


def test_prune_says_what_it_left_alone(cache):
    edited = fake_entry(cache, "edited", age_days=9)
    (edited.engine_dir / "notes.txt").write_text("mine")
    result = _invoke("cache", "prune", "--all")
    assert result.exit_code == 0
    assert "left alone: " in result.output and "notes.txt" in result.output
    assert result.output.count("did not write") == 1, result.output  # said once
    assert (edited.engine_dir / "notes.txt").exists()


def test_prune_leftovers_removes_only_leftovers_and_dry_run_lists_them(cache):
    fake_entry(cache, "a", age_days=100)
    dead = leftover(cache, f".{'a' * 20}.tmp-999999-x")
    result = _invoke("cache", "prune", "--leftovers", "--dry_run")
    assert result.exit_code == 0 and dead.exists(), result.output
    assert f"would remove {dead.name} (5.0 kB, left by a build" in result.output
    assert "would remove 0 cached engines, 0 B and 1 leftover, 5.0 kB; 1 left" in result.output
    result = _invoke("cache", "prune", "--leftovers")
    assert result.exit_code == 0 and len(cache.entries()) == 1 and not dead.exists()


def test_a_dry_run_counts_what_would_be_left(cache):
    fake_entry(cache, "a")
    result = _invoke("cache", "prune", "--all", "--dry_run")
    last = result.output.splitlines()[-1]
    assert last.startswith("would remove 1 cached engine, ") and "; 0 left in " in last


def test_a_lock_file_that_is_not_a_lock_is_one_line_and_kept(cache, tiny_hf):
    entry = fake_entry(cache, "a")
    lock = cache.dir / f"{entry.name}.lock"
    lock.write_text("x\n")
    result = _invoke("cache", "prune", "--all")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"left alone: {lock}: is not a kiln lock file" in result.output
    assert lock.read_text() == "x\n" and cache.entries() == [entry]
    result = _invoke("cache", "list")
    assert result.exit_code == 0 and "(lock unreadable)" in result.output, result.output


@pytest.mark.parametrize("command", [["list"], ["prune", "--all"]])
def test_a_cache_dir_that_is_a_file_is_one_line_exit_2(command, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "file"))
    result = _invoke("cache", *command)
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {tmp_path / 'file'}: the build cache is a file, "
                                    f"not a directory; set KILN_CACHE_DIR")


@pytest.mark.parametrize("command", [["list"], ["prune", "--all"],
                                     ["build", "--model_dir", "hf"]])
@pytest.mark.parametrize("name, problem", [
    ("loop", "is a symbolic link loop"),
    ("a" * 300, "has a name longer than the file system allows (255 bytes a name)")])
def test_a_kiln_cache_dir_the_os_refuses_is_said_in_words(command, name, problem, tmp_path,
                                                            monkeypatch):
    """A retest's had been the OS's "Too many levels of symbolic links" (an empty cache to
    kiln cache list) and "File name too long"."""
    (tmp_path / "loop").symlink_to("loop")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / name))
    result = _invoke("cache", *command)
    assert result.exit_code == 2 and result.output == (
        f"error: {tmp_path / name}: the build cache {problem}; set KILN_CACHE_DIR (or "
        f"--cache_dir) to another directory\n"), result.output


@pytest.mark.parametrize("args, message", [
    (["cache", "prune"], "say what to remove: --all, --older_than 7d"),
    (["cache", "prune", "--dry_run"], "say what to remove"),
    (["cache", "prune", "--all", "--older_than", "7d"], "--all removes every entry; "
                                                        "--older_than selects fewer"),
    (["cache", "prune", "--all", "--max_size", "1GB", "--older_than", "1d"],
     "--older_than and --max_size select fewer"),
    (["cache", "prune", "--leftovers", "--older_than", "1d"], "--leftovers removes no entry"),
    (["cache", "prune", "--older_than", "7"], "'7' is not a duration: give a number with its "
                                              "unit"),
    (["cache", "prune", "--older_than", "0"], "'0' is not a duration"),
    (["cache", "prune", "--older_than", "1m"], "'1m' is ambiguous (minutes or months?): write "
                                               "1min"),
    (["cache", "prune", "--older_than", "3M"], "'3M' is ambiguous"),
    (["cache", "prune", "--older_than", "-1d"], "'-1d' is a negative duration: give 0s or more"),
    # a trial's 1e400d had been "not a duration: give a number with its unit"
    (["cache", "prune", "--older_than", "1e400d"], "'1e400d' is longer than any duration kiln "
                                                   "can count: give a number a float holds"),
    (["cache", "prune", "--max_size", "lots"], "'lots' is not a size like 20GB"),
    # a trial's 1e400GB was a traceback (OverflowError), exit 1
    (["cache", "prune", "--max_size", "1e400GB"], "'1e400GB' is more than any machine holds "
                                                  "(at most 1 EB)"),
    (["cache", "build"], "Missing option '--model_dir'"),
    (["cache", "build", "--model_dir", "x", "--backend", "nope"], "'nope' is not one of"),
])
def test_usage_errors_are_one_line_exit_2(args, message, cache):
    result = _invoke(*args)
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert message in result.output


def test_a_size_in_capital_e_notation_is_taken(cache):
    fake_entry(cache, "a", age_days=1)
    result = _invoke("cache", "prune", "--max_size", "1E1", "--dry_run")
    assert result.exit_code == 0, result.output


def test_older_than_takes_0s_and_its_help_says_the_rule(cache):
    fake_entry(cache, "a", age_days=1)
    assert _invoke("cache", "prune", "--older_than", "0s").exit_code == 0
    assert cache.entries() == []
    help_text = " ".join(_invoke("cache", "prune", "--help").output.split())
    assert "a bare number is refused, 0 included" in help_text


def test_a_bad_model_dir_is_one_line_exit_2(cache, tmp_path):
    result = _invoke("cache", "build", "--model_dir", str(tmp_path / "nope"))
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"error: --model_dir {tmp_path / 'nope'}: no such local "
                                    f"directory")


def test_an_unwritable_cache_dir_is_one_line_exit_2(tmp_path, tiny_hf, monkeypatch):
    (tmp_path / "file").write_text("")
    result = _invoke("cache", "build", "--model_dir", str(tiny_hf), "--cache_dir",
                     str(tmp_path / "file"))
    assert result.exit_code == 2 and "is a file" in result.output
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "file"))
    result = _invoke("cache", "build", "--model_dir", str(tiny_hf))
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {tmp_path / 'file'}: the build cache is a file, "
                                    f"not a directory; set KILN_CACHE_DIR")


def test_build_prints_the_engine_dir_and_then_finds_it(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "root"))
    args = ["-q", "cache", "build", "--model_dir", str(tiny_hf), "--max_batch_size", "2",
            "--norm_plugin", "disable", "--max_cache_size", "1GB"]
    first = _invoke(*args)
    assert first.exit_code == 0, first.output
    engine = first.output.strip()
    manifest = json.loads((tmp_path / "root" / "engines" / engine.split("/")[-2] / "engine" /
                           "config.json").read_text())
    assert manifest["limits"]["max_batch_size"] == 2 and manifest["plugins"]["norm"] is False
    mtime = os.stat(engine).st_mtime
    time.sleep(0.01)
    assert _invoke(*args).output.strip() == engine and os.stat(engine).st_mtime == mtime


def test_cache_build_offers_every_option_of_kiln_build():
    offered = {p.name for p in cache_build.params}
    dirs = {"checkpoint_dir", "output_dir", "overwrite"}
    assert {p.name for p in build_command.params} - dirs <= offered
    assert {"model_dir", "revision", "tp_size", "pp_size", "allow_pickle", "cache_dir",
            "max_cache_size"} <= offered


@pytest.mark.parametrize("args", [["cache", "--help"], ["cache", "list"], ["cache", "prune"],
                                  ["cache", "build", "--help"], ["cache", "prune", "--all"]])
def test_cache_commands_start_without_heavy_libraries(args, tmp_path):
    assert heavy_imports(args, {"KILN_CACHE_DIR": str(tmp_path)}) == []


@pytest.mark.usefixtures("read_only_locks")
def test_list_works_on_a_read_only_cache(cache):
    fake_entry(cache, "a")
    result = _invoke("cache", "list")
    assert result.exit_code == 0 and result.output.splitlines()[2].endswith("/models/a")
    assert "its lock files cannot be written (a read-only cache?)" in result.output


@pytest.mark.usefixtures("read_only_locks")
def test_a_dry_run_prune_works_on_a_read_only_cache(cache):
    """As the docs say: a trial's dry run there had said it would remove 0 engines, with a
    "left alone" line per entry."""
    fake_entry(cache, "a")
    fake_entry(cache, "b")
    result = _invoke("cache", "prune", "--all", "--dry_run")
    assert result.exit_code == 0, result.output
    assert "would remove 2 cached engines" in result.output and "left alone" not in result.output
    assert "which entries are in use is unknown" in result.output
    assert len(cache.entries()) == 2


def test_the_docs_two_step_example_runs_as_written(tiny_hf, tmp_path, monkeypatch):
    docs = (Path(__file__).resolve().parents[2] / "docs" / "build_cache.md").read_text()
    (inner,) = re.findall(r'"\$\((kiln [^)]*)\)"', docs)
    args = shlex.split(inner)[1:]
    args[args.index("--model_dir") + 1] = str(tiny_hf)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "root"))
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert (Path(result.output.strip()) / "config.json").is_file()  # only the dir is printed


def test_a_relative_model_dir_is_listed_by_its_absolute_path(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "root"))
    monkeypatch.chdir(tiny_hf.parent)
    assert _invoke("-q", "cache", "build", "--model_dir", tiny_hf.name).exit_code == 0
    assert _invoke("cache", "list").output.splitlines()[2].endswith(f"  {tiny_hf}")


@pytest.mark.parametrize("command", [["list"], ["prune", "--all"], ["prune", "--leftovers"]])
def test_a_cache_dir_given_that_does_not_exist_is_one_line_exit_2(command, tmp_path):
    """`kiln cache list --cache_dir /typo` had reported an empty cache (and prune "nothing to
    prune"), exit 0."""
    missing = tmp_path / "typo"
    result = _invoke("cache", *command, "--cache_dir", str(missing))
    assert result.exit_code == 2 and result.output == (
        f"error: Invalid value for '--cache_dir': {missing}: no such directory; check the path "
        f"(kiln cache build --cache_dir {missing} makes a cache there) (see kiln cache "
        f"{command[0]} --help)\n"), result.output
    assert not missing.exists()


@pytest.mark.parametrize("command", [["list"], ["prune", "--all"],
                                     ["build", "--model_dir", "hf"]])
@pytest.mark.parametrize("name, why", [
    ("file", "'file' is a file; give a directory's path, not a file's"),
    ("loop", "'loop' is a symbolic link loop; give another path"),
    ("locked", "'locked' cannot be read (permission denied); give one you can read")])
def test_a_cache_dir_given_that_cannot_be_a_cache_is_one_line_exit_2(command, name, why,
                                                                     tmp_path, monkeypatch):
    """A file and an unreadable directory had been click's "Directory 'file' is a file." and
    "... is not readable.", a loop "no such directory"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "locked").mkdir()
    access = os.access  # (root reads any directory: chmod cannot lock one here)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: access(p, mode, **kw)
                        and os.path.basename(p) != "locked")
    result = _invoke("cache", *command, "--cache_dir", name)
    assert result.exit_code == 2 and result.output == (
        f"error: Invalid value for '--cache_dir': {why} (see kiln cache {command[0]} "
        f"--help)\n"), result.output
    assert (tmp_path / "file").read_text() == "mine" and not any((tmp_path / "locked").iterdir())


@pytest.mark.parametrize("command", [["list"], ["prune", "--all"],
                                     ["build", "--model_dir", "hf"]])
def test_a_cache_dir_of_an_unknown_user_s_home_is_one_line_exit_2(command):
    """``~nouser/x`` had been Path.expanduser's traceback ("Could not determine home
    directory.")."""
    result = _invoke("cache", *command, "--cache_dir", "~nouser/x")
    assert result.exit_code == 2 and result.output == (
        f"error: Invalid value for '--cache_dir': '~nouser/x' starts with ~nouser, but there is "
        f"no user nouser; give another path (see kiln cache {command[0]} --help)\n"), \
        result.output


def test_a_kiln_cache_dir_of_an_unknown_user_s_home_is_one_line_exit_2(monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", "~nouser/x")
    result = _invoke("cache", "list")
    assert result.exit_code == 2 and result.output.startswith(
        "error: KILN_CACHE_DIR '~nouser/x' starts with ~nouser, but there is no user nouser; "
        "set it to the build cache's directory"), result.output


def test_a_missing_cache_dir_named_dash_is_shown_by_its_absolute_path(tmp_path, monkeypatch):
    """./- had been told "-: no such directory" with "kiln cache build --cache_dir -", a
    command that reads - as standard output."""
    monkeypatch.chdir(tmp_path)
    result = _invoke("cache", "list", "--cache_dir", "./-")
    assert result.exit_code == 2 and result.output.startswith(
        f"error: Invalid value for '--cache_dir': {tmp_path / '-'}: no such directory; check "
        f"the path (kiln cache build --cache_dir {tmp_path / '-'} makes a cache there)"), \
        result.output


@pytest.mark.parametrize("command", [["list"], ["prune", "--all"]])
def test_a_cache_s_engines_dir_given_as_its_root_is_one_line_exit_2(command, cache):
    """list prints the engines dir, so a user may pass that: its engines/ had been empty."""
    fake_entry(cache, "a")
    result = _invoke("cache", *command, "--cache_dir", str(cache.dir))
    assert result.exit_code == 2 and result.output == (
        f"error: Invalid value for '--cache_dir': {cache.dir} is the engines dir of the cache "
        f"at {cache.root}; give that, the cache's root (see kiln cache {command[0]} --help)\n"
    ), result.output
    assert len(cache.entries()) == 1


def test_the_default_cache_not_made_yet_is_no_error(tmp_path, monkeypatch):
    """A fresh machine's $KILN_CACHE_DIR (or ~/.cache/kiln): the first build makes it."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "fresh"))
    result = _invoke("cache", "list")
    assert result.exit_code == 0 and result.output == (
        f"{tmp_path / 'fresh' / 'engines'}: no build cache here yet (kiln cache build makes it, "
        f"as --model_dir on kiln run, bench and eval does)\n"), result.output
    result = _invoke("cache", "prune", "--all")
    assert result.exit_code == 0 and "no build cache here; nothing to prune" in result.output
    assert not (tmp_path / "fresh").exists()


def test_a_duration_takes_a_number_in_exponent_form():
    from kiln.cli.cache import Duration

    assert Duration().convert("1e1h", None, None) == 36_000
    assert Duration().convert("2.5E-1d", None, None) == 21_600
