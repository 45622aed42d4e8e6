"""A directory of one kind given where another is needed: the error names the kind and the fix.

Every (given, wanted) combination of HF checkpoint, kiln checkpoint and engine dir, through
the CLI (one line, exit 2, nothing written) and through the Python API.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import kiln
from kiln.builder import build
from kiln.checkpoint import load_config
from kiln.cli.main import main
from kiln.dirs import DirKind, classify_dir, dir_kind
from kiln.engine import EngineError, read_manifest
from kiln.errors import CheckpointError, KilnError
from kiln.runtime import LLM
from tests.models import hf_model

LIMITS = dict(max_batch_size=2, max_input_len=8, max_seq_len=16)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[DirKind, Path]:
    root = tmp_path_factory.mktemp("dirs")
    hf = hf_model("llama-gqa", root / "hf")
    ckpt = kiln.convert_checkpoint(hf, root / "ckpt", progress=False)
    engine = build(ckpt, root / "engine", **LIMITS).output_dir
    return {DirKind.HF_CHECKPOINT: hf, DirKind.KILN_CHECKPOINT: ckpt, DirKind.ENGINE: engine}


def test_classify(dirs, tmp_path):
    for kind, path in dirs.items():
        assert classify_dir(path) is kind
    (tmp_path / "config.json").write_text("{not json")
    assert classify_dir(tmp_path) is DirKind.OTHER
    assert classify_dir(tmp_path / "nope") is DirKind.OTHER
    assert dir_kind({"hidden_size": 8}) is DirKind.OTHER
    assert dir_kind([1, 2]) is DirKind.OTHER
    assert dir_kind({"model_type": "llama"}) is DirKind.HF_CHECKPOINT
    # An engine manifest holds format_version, decoder and mapping too: backend decides.
    manifest = json.loads((dirs[DirKind.ENGINE] / "config.json").read_text())
    assert {"format_version", "decoder", "mapping"} <= manifest.keys()


def kiln_cli(*args: str):
    return CliRunner().invoke(main, ["-q", *args])


def expect_one_line(result, message: str, out: Path | None = None) -> None:
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {message}\n"
    assert out is None or not out.exists()


def test_run_and_bench_given_a_kiln_checkpoint(dirs):
    ckpt = dirs[DirKind.KILN_CHECKPOINT]
    message = (f"{ckpt} is a kiln checkpoint, not an engine dir: build it first with kiln build "
               f"--checkpoint_dir {ckpt} --output_dir <engine_dir>")
    expect_one_line(kiln_cli("run", "--engine_dir", str(ckpt), "--input_text", "hi"), message)
    expect_one_line(kiln_cli("bench", "--engine_dir", str(ckpt)), message)
    with pytest.raises(EngineError) as err:  # from Python: the Python function
        read_manifest(ckpt)
    assert str(err.value) == (f"{ckpt} is a kiln checkpoint, not an engine dir: build it first "
                              f"with kiln.build('{ckpt}', '<engine_dir>')")


def test_run_given_an_hf_checkpoint(dirs):
    hf = dirs[DirKind.HF_CHECKPOINT]
    message = (f"{hf} is a Hugging Face checkpoint, not an engine dir: kiln run, bench, eval and "
               f"serve take it as --model_dir {hf} (LLM(model=...)), which converts and builds it "
               f"through the build cache; or convert it first with kiln convert_checkpoint "
               f"--model_dir {hf} --output_dir <checkpoint_dir>, then build with kiln build "
               f"--checkpoint_dir <checkpoint_dir> --output_dir <engine_dir>")
    expect_one_line(kiln_cli("run", "--engine_dir", str(hf), "--input_text", "hi"), message)
    with pytest.raises(EngineError) as err:
        LLM(hf)
    assert str(err.value) == (
        f"{hf} is a Hugging Face checkpoint, not an engine dir: LLM(model='{hf}') takes it, "
        f"converting and building it through the build cache (kiln.engine_for_model('{hf}') "
        f"returns the engine dir it builds); or convert it first with "
        f"kiln.convert_checkpoint('{hf}', '<checkpoint_dir>'), then build with "
        f"kiln.build('<checkpoint_dir>', '<engine_dir>')")


def test_build_given_an_engine_dir(dirs, tmp_path):
    engine, ckpt = dirs[DirKind.ENGINE], dirs[DirKind.KILN_CHECKPOINT]
    message = (f"{engine} is an engine dir, not a kiln checkpoint: it is built already; run it "
               f"with kiln run --engine_dir {engine} (kiln bench, eval and serve take "
               f"--engine_dir too), or give the kiln checkpoint it was "
               f"built from (--checkpoint_dir {ckpt})")
    out = tmp_path / "out"
    expect_one_line(kiln_cli("build", "--checkpoint_dir", str(engine), "--output_dir", str(out)),
                    message, out)
    with pytest.raises(CheckpointError) as err:
        build(engine, out, **LIMITS)
    assert str(err.value) == (f"{engine} is an engine dir, not a kiln checkpoint: it is built "
                              f"already; run it with LLM('{engine}'), or give the kiln "
                              f"checkpoint it was built from (checkpoint_dir='{ckpt}')")
    assert not out.exists()


def test_build_given_an_hf_checkpoint(dirs, tmp_path):
    hf = dirs[DirKind.HF_CHECKPOINT]
    message = (f"{hf} is a Hugging Face checkpoint, not a kiln checkpoint: convert it first with "
               f"kiln convert_checkpoint --model_dir {hf} --output_dir <checkpoint_dir>")
    out = tmp_path / "out"
    expect_one_line(kiln_cli("build", "--checkpoint_dir", str(hf), "--output_dir", str(out)),
                    message, out)
    with pytest.raises(CheckpointError) as err:
        load_config(hf)
    assert str(err.value) == (f"{hf} is a Hugging Face checkpoint, not a kiln checkpoint: "
                              f"convert it first with kiln.convert_checkpoint('{hf}', "
                              f"'<checkpoint_dir>')")


@pytest.mark.parametrize("kind, fix, api_fix", [
    (DirKind.KILN_CHECKPOINT, "it is converted already; build it with kiln build "
                              "--checkpoint_dir {path} --output_dir <engine_dir>",
     "it is converted already; build it with kiln.build('{path}', '<engine_dir>')"),
    (DirKind.ENGINE, "it is built already; run it with kiln run --engine_dir {path} (kiln "
                     "bench, eval and serve take --engine_dir too)",
     "it is built already; run it with LLM('{path}')"),
])
def test_convert_given_a_kiln_dir(dirs, tmp_path, kind, fix, api_fix):
    path = dirs[kind]
    message = f"{path} is {kind.value}, not a Hugging Face checkpoint: {{}}"
    out = tmp_path / "out"
    expect_one_line(kiln_cli("convert_checkpoint", "--model_dir", str(path), "--output_dir",
                             str(out)), message.format(fix.format(path=path)), out)
    with pytest.raises(CheckpointError) as err:
        kiln.convert_checkpoint(path, out, progress=False)
    assert str(err.value) == message.format(api_fix.format(path=path))
    assert not out.exists()


def test_each_kind_still_loads_where_it_belongs(dirs):
    assert load_config(dirs[DirKind.KILN_CHECKPOINT]).decoder.num_layers == 2
    assert read_manifest(dirs[DirKind.ENGINE]).backend == "onnx"


def test_unrecognized_configs_keep_their_own_errors(dirs, tmp_path):
    """A config.json of no known kind (or a damaged one) gets the format owner's error."""
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(CheckpointError, match="format_version None is not supported"):
        load_config(tmp_path)
    with pytest.raises(EngineError, match="format_version None is not supported"):
        read_manifest(tmp_path)
    manifest = json.loads((dirs[DirKind.ENGINE] / "config.json").read_text())
    del manifest["backend"]  # damaged manifest: no longer classified as an engine dir
    (tmp_path / "config.json").write_text(json.dumps(manifest))
    # the key named, not Python's KeyError('backend') (a retest's reading)
    with pytest.raises(EngineError, match=r"malformed manifest \(missing key 'backend'\); "
                                          r"rebuild with kiln build"):
        read_manifest(tmp_path)
    del manifest["limits"]["max_batch_size"]
    manifest["backend"] = "onnx"
    (tmp_path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"malformed manifest \(missing key 'max_batch_size'\)"):
        read_manifest(tmp_path)
    for value in (True, 4.0):  # JSON's true had been read as one slot
        manifest["limits"]["max_batch_size"] = value
        (tmp_path / "config.json").write_text(json.dumps(manifest))
        with pytest.raises(EngineError, match=rf"malformed manifest \(max_batch_size must be a "
                                              rf"positive integer, found {value}\); rebuild"):
            read_manifest(tmp_path)
    ckpt = json.loads((dirs[DirKind.KILN_CHECKPOINT] / "config.json").read_text())
    del ckpt["decoder"]["num_layers"], ckpt["decoder"]["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(ckpt))
    with pytest.raises(CheckpointError, match=r"config.json: edited since kiln wrote it \(it "
                                              r"no longer matches the digest recorded in it\), "
                                              r"and as edited: missing keys 'hidden_size' and "
                                              r"'num_layers'; undo the edit$"):
        load_config(tmp_path)
    del ckpt["manifest_sha256"]  # no digest to tell an edit by: the keys and both fixes
    (tmp_path / "config.json").write_text(json.dumps(ckpt))
    with pytest.raises(CheckpointError, match=r"config.json: missing keys 'hidden_size' and "
                                              r"'num_layers'; not a kiln checkpoint config as "
                                              r"kiln writes it: undo the edit, or re-run kiln "
                                              r"convert_checkpoint$"):
        load_config(tmp_path)


@pytest.mark.parametrize("command", ["run", "bench", "serve", "eval", "verify"])
def test_a_file_inside_the_dir_is_named_as_a_file_with_the_fix(dirs, tmp_path, command):
    """``--engine_dir E/config.json`` (tab completion's slip): say it is a file and which
    directory to pass, not "no such engine directory"; named by its option, as the CLI's other
    path errors are (a retest's had named none)."""
    engine = dirs[DirKind.ENGINE]
    given = engine / "config.json"
    (tmp_path / "t.txt").write_text("Some text to score.")
    args = {"run": ["run", "--engine_dir", str(given), "--input_text", "x"],
            "bench": ["bench", "--engine_dir", str(given)],
            "serve": ["serve", "--engine_dir", str(given)],
            "eval": ["eval", "--engine_dir", str(given), "--dataset", str(tmp_path / "t.txt")],
            "verify": ["verify", str(given)]}[command]
    r = CliRunner().invoke(main, args)
    what = f"{given}: is a file, not an engine dir or a kiln checkpoint" \
        if command == "verify" else f"--engine_dir {given}: is a file, not an engine directory"
    assert r.exit_code == 2 and r.output.splitlines() == [
        f"error: {what}; pass the directory that holds it ({engine})"]


def test_an_engine_dir_that_is_no_directory_is_named_as_the_api_takes_it(tmp_path):
    """From Python, the keyword: ``LLM(engine_dir=...)`` is told ``engine_dir=...``."""
    from kiln.runtime import LLM

    given = tmp_path / "english.txt"
    given.write_text("text")
    with pytest.raises(EngineError) as info:
        LLM(engine_dir=given)
    assert str(info.value) == (f"engine_dir={str(given)!r}: is a file, not an engine "
                               f"directory; pass the output_dir of kiln build")
    with pytest.raises(EngineError) as info:
        LLM(engine_dir="/dev/null")
    assert str(info.value) == ("engine_dir='/dev/null': is a character device, not an engine "
                               "directory; pass the output_dir of kiln build")


_HF_FIX = "pass the directory holding the model's config.json and weights"
_CKPT_FIX = "pass the output_dir of kiln convert_checkpoint"


@pytest.mark.parametrize("command", ["run", "bench", "serve", "eval", "convert_checkpoint",
                                     "quantize", "build"])
def test_a_source_dir_that_is_no_directory_is_named_by_its_option(tmp_path, command):
    """``--model_dir`` (``--checkpoint_dir``) of a file, a device or no such path is named by
    its option, as ``--engine_dir``'s are (a retest's had named none). (build's and quantize's
    file is click's to refuse, by name too.)"""
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.")
    flag = "--checkpoint_dir" if command in ("quantize", "build") else "--model_dir"
    noun, fix = ("a kiln checkpoint directory", _CKPT_FIX) if flag == "--checkpoint_dir" else \
        ("an HF checkpoint directory", _HF_FIX)
    rest = {"run": ["--input_text", "x"], "eval": ["--dataset", str(text)],
            "convert_checkpoint": ["--output_dir", str(tmp_path / "out")],
            "quantize": ["--output_dir", str(tmp_path / "out"), "--qformat", "int8_wo"],
            "build": ["--output_dir", str(tmp_path / "out")]}.get(command, [])
    missing = tmp_path / "nope"
    no_such = f"no such {noun[2:]}; {fix}" if flag == "--checkpoint_dir" else \
        (f"no such local directory ({tmp_path}/ has no nope), and not a hub id (those have the "
         f"form org/name); check the path")
    expected = {"/dev/null": f"{flag} /dev/null: is a character device, not {noun}; {fix}",
                str(missing): f"{flag} {missing}: {no_such}"}
    if flag == "--model_dir":
        expected[str(text)] = f"{flag} {text}: is a file, not {noun}; {fix}"
    for given, message in expected.items():
        r = CliRunner().invoke(main, [command, flag, given, *rest])
        assert r.exit_code == 2 and r.output.splitlines() == [f"error: {message}"], r.output
    assert not (tmp_path / "out").exists()


def test_a_source_dir_that_is_no_directory_is_named_as_the_api_takes_it(tmp_path):
    """From Python, the keyword: ``LLM(model=...)`` is told ``model=...``, kiln.build and
    kiln.quantize ``checkpoint_dir=...``, kiln.convert_checkpoint ``model_dir=...``."""
    from kiln.runtime import LLM

    out = tmp_path / "out"
    calls = {"model": lambda p: LLM(model=p),
             "model_dir": lambda p: kiln.convert_checkpoint(p, out, progress=False),
             "checkpoint_dir": lambda p: build(p, out, **LIMITS),
             "checkpoint_dir=": lambda p: kiln.quantize(p, out, qformat="int8_wo")}
    for keyword, call in calls.items():
        keyword = keyword.rstrip("=")
        noun, fix = ("a kiln checkpoint directory", _CKPT_FIX) \
            if keyword == "checkpoint_dir" else ("an HF checkpoint directory", _HF_FIX)
        with pytest.raises(CheckpointError) as info:
            call("/dev/null")
        assert str(info.value) == (f"{keyword}='/dev/null': is a character device, not {noun}; "
                                   f"{fix}")
        with pytest.raises(CheckpointError, match=rf"^{keyword}='{tmp_path}/nope': no such "):
            call(str(tmp_path / "nope"))
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "verify"])
def test_the_dir_above_an_engine_names_it(dirs, tmp_path, command):
    """A trial passed a build cache entry (``engines/<name>``) for its ``engine`` dir inside;
    the error said only "pass the output_dir of kiln build". A parent with several engines,
    or none, gets no guess."""
    import shutil

    entry = tmp_path / "2d711642b726b0440162"
    shutil.copytree(dirs[DirKind.ENGINE], entry / "engine")
    (entry / "entry.json").write_text("{}")
    args = {"run": ["run", "--engine_dir", str(entry), "--input_text", "x"],
            "verify": ["verify", str(entry)]}[command]
    r = CliRunner().invoke(main, args)
    what = "is not an engine directory" if command == "run" else \
        "is neither an engine dir nor a kiln checkpoint"  # verify takes both
    assert r.exit_code == 2 and r.output.splitlines() == [
        f"error: {entry}/config.json: missing, so {entry} {what}; did you mean {entry}/engine?"]
    shutil.copytree(dirs[DirKind.ENGINE], entry / "engine2")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "did you mean" not in r.output, r.output


def test_a_file_outside_any_engine_is_not_sent_to_its_directory(tmp_path, monkeypatch):
    """``--engine_dir english.txt``: its directory is no engine either; say what to pass."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "english.txt").write_text("text")
    r = CliRunner().invoke(main, ["verify", "english.txt"])
    assert r.exit_code == 2 and r.output.splitlines() == [
        "error: english.txt: is a file, not an engine dir or a kiln checkpoint; pass an engine "
        "dir (the output_dir of kiln build) or a kiln checkpoint (the output_dir of kiln "
        "convert_checkpoint)"]


def test_load_config_given_a_file_names_the_directory_to_pass(dirs):
    """(kiln build's click option refuses a file itself; the API says which dir to pass.)"""
    ckpt = dirs[DirKind.KILN_CHECKPOINT]
    with pytest.raises(CheckpointError) as err:
        load_config(ckpt / "config.json")
    assert str(err.value) == (f"{ckpt / 'config.json'}: is a file, not a kiln checkpoint directory; "
                              f"pass the directory that holds it ({ckpt})")


def test_a_missing_directory_names_a_sibling_close_to_it(tmp_path, monkeypatch):
    """A typo in a directory name: the one-line error names the sibling it most likely meant
    (absolute and relative paths); nothing close, no suggestion."""
    from kiln.dirs import read_config
    from kiln.engine import EngineError

    (tmp_path / "engine_smol").mkdir()
    (tmp_path / "notes.txt").write_text("a file is never suggested")
    with pytest.raises(EngineError, match=rf"^{tmp_path}/engine_smoll: no such engine directory; "
                                          rf"did you mean {tmp_path}/engine_smol\? pass the "):
        read_config(tmp_path / "engine_smoll", DirKind.ENGINE, EngineError)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EngineError, match=r"^engine_smoll: .* did you mean engine_smol\? "):
        read_config("engine_smoll", DirKind.ENGINE, EngineError)
    (tmp_path / "engines" / "smollm2").mkdir(parents=True)
    for typo in ("engine/smollm2", "Engines/smollm2", "engines/SMOLLM2", "engine/smolm2/"):
        with pytest.raises(EngineError, match=r"did you mean engines/smollm2\? "):
            read_config(typo, DirKind.ENGINE, EngineError)
    for far in ("other", "notes.tx", "nowhere/engine_smoll", "a/b/c/d/e/f"):
        with pytest.raises(EngineError) as info:
            read_config(far, DirKind.ENGINE, EngineError)
        assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("text", ['{"a": 1' + "0" * 5000 + "}", "[" * 100000 + "]" * 100000])
def test_a_config_python_cannot_read_is_one_line(tmp_path, text):
    """A trial's config.json nested 100,000 deep (or with a 5,000-digit number): a
    RecursionError (ValueError) traceback from every command that read it."""
    from kiln.dirs import DirKind, read_config
    from kiln.errors import ConfigError

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON \("):
        read_config(tmp_path, DirKind.ENGINE, ConfigError)


@pytest.mark.parametrize("text, found", [("[]", "an array"), ("null", "null"),
                                         ('"x"', "a string"), ("1", "a number")])
@pytest.mark.parametrize("kind", ["ENGINE", "KILN_CHECKPOINT"])
def test_a_config_that_is_not_a_json_object_is_one_line(tmp_path, text, found, kind):
    """A retest's [], null, "x" and 1 had given an AttributeError traceback in run, build,
    quantize and verify."""
    from kiln.dirs import DirKind, read_config
    from kiln.errors import ConfigError

    (tmp_path / "config.json").write_text(text)
    repair = "rebuild with kiln build" if kind == "ENGINE" else "re-run kiln convert_checkpoint"
    with pytest.raises(ConfigError) as info:
        read_config(tmp_path, DirKind[kind], ConfigError)
    assert str(info.value) == f"{tmp_path / 'config.json'}: holds {found}, not a JSON object; " \
                              f"{repair}"


@pytest.mark.parametrize("kind, noun", [(DirKind.ENGINE, "an engine directory"),
                                        (DirKind.KILN_CHECKPOINT, "a kiln checkpoint directory"),
                                        (DirKind.HF_CHECKPOINT, "an HF checkpoint directory")])
def test_a_device_or_pipe_is_named_as_what_it_is_not_as_missing(tmp_path, kind, noun):
    """kiln run --engine_dir /dev/null had been told "no such engine directory": it exists."""
    from kiln.dirs import read_config

    os.mkfifo(tmp_path / "pipe")
    for path, what in ((tmp_path / "pipe", "a named pipe"), (Path("/dev/null"),
                                                              "a character device")):
        with pytest.raises(EngineError, match=rf"^{path}: is {what}, not {noun}; pass "):
            read_config(path, kind, EngineError)


def test_a_config_json_that_is_a_directory_or_a_pipe_is_named_as_such(tmp_path):
    """A retest's config.json made a directory had been told "config.json: missing"."""
    from kiln.dirs import read_config

    (tmp_path / "d" / "config.json").mkdir(parents=True)
    (tmp_path / "p").mkdir()
    os.mkfifo(tmp_path / "p" / "config.json")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").symlink_to("gone.json")
    for directory, what in (("d", "is a directory, not a file"),
                            ("p", "is a named pipe, not a file"),
                            ("s", "is a symbolic link to gone.json, which does not exist")):
        with pytest.raises(EngineError) as info:
            read_config(tmp_path / directory, DirKind.ENGINE, EngineError)
        assert str(info.value) == (f"{tmp_path / directory / 'config.json'}: {what}, so "
                                   f"{tmp_path / directory} is not an engine directory; pass the "
                                   f"output_dir of kiln build")
        verified = CliRunner().invoke(main, ["verify", str(tmp_path / directory)])
        assert verified.exit_code == 2 and verified.output.startswith(  # (retest 44c)
            f"error: {tmp_path / directory / 'config.json'}: {what}, so "), verified.output


def test_a_path_the_os_refuses_is_said_in_words(tmp_path):
    """A retest's KILN_CACHE_DIR of these had been "Too many levels of symbolic links" and "File
    name too long" (and a loop, to kiln cache list, an empty cache)."""
    from kiln.dirs import unusable_path

    (tmp_path / "loop").symlink_to("loop")
    long_path = tmp_path.joinpath(*["b" * 200] * 25)  # every name fits, the path does not
    assert [unusable_path(p) for p in (tmp_path / "loop", tmp_path / "loop" / "x",
                                       tmp_path / ("a" * 300), long_path)] == [
        "is a symbolic link loop", "is under a symbolic link loop",
        "has a name longer than the file system allows (255 bytes a name)",
        "is longer than the file system allows (4096 bytes a path)"]
    assert unusable_path(tmp_path) is None and unusable_path(tmp_path / "new" / "x") is None


NOUSER = "'~nouser/x' starts with ~nouser, but there is no user nouser; give another path"


@pytest.mark.parametrize("call, name", [
    (lambda: kiln.LLM(model="~nouser/x"), "model"),
    (lambda: kiln.LLM("~nouser/x"), "engine_dir"),
    (lambda: kiln.convert_checkpoint("~nouser/x", "/tmp/kiln-unused"), "model_dir"),
    (lambda: kiln.convert_checkpoint(os.devnull, "~nouser/x"), "output_dir"),
    (lambda: build("~nouser/x", "/tmp/kiln-unused"), "checkpoint_dir"),
    (lambda: build(os.devnull, "~nouser/x"), "output_dir"),
    (lambda: kiln.quantize("~nouser/x", "/tmp/kiln-unused", qformat="int8_wo"),
     "checkpoint_dir"),
])
def test_a_path_under_an_unknown_users_home_is_named_as_given(call, name):
    """``Path.expanduser`` raises RuntimeError ("Could not determine home directory") for
    ``~nouser``: a retest's ``LLM(model='~nouser/x')``, kiln.build, kiln.convert_checkpoint and
    kiln.quantize had been that traceback (:func:`kiln.dirs.expand_home`)."""
    with pytest.raises(KilnError) as e:
        call()
    assert str(e.value) == f"{name}={NOUSER}"


@pytest.mark.parametrize("command", [
    ["run", "--input_text", "hi"], ["eval", "--dataset", "{tmp}/text.txt"],
    ["convert_checkpoint", "--output_dir", "{tmp}/out"],
])
def test_a_model_dir_under_an_unknown_users_home_is_one_line(command, tmp_path):
    (tmp_path / "text.txt").write_text("some text")
    command = [word.format(tmp=tmp_path) for word in command]
    r = CliRunner().invoke(main, [*command, "--model_dir", "~nouser/x"])
    assert r.exit_code == 2, r.output
    assert r.output == f"error: --model_dir {NOUSER.replace(chr(39), '', 2)}\n"
