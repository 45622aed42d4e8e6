"""The kiln command group: help, aliases, one-line errors with exit code 2, --debug, and a
start-up that imports no heavy library."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from kiln.cli.main import main
from kiln.errors import CheckpointError
from tests.models import hf_model

HEAVY = ("torch", "onnx", "onnxruntime")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "model")


def _invoke(*args):
    return CliRunner().invoke(main, list(args), prog_name="kiln")


@pytest.mark.parametrize("args", [[], ["convert_checkpoint"], ["convert-checkpoint"], ["build"],
                                  ["run"], ["bench"], ["verify"]])
def test_help(args):
    result = _invoke(*args, "--help")
    assert result.exit_code == 0 and "Usage: kiln" in result.output


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet); its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("args", [
    None, [], ["--help"], ["build", "--help"], ["bench", "--help"], ["verify", "--help"],
    ["run", "--help"], ["convert_checkpoint", "--help"], ["build"], ["bench"], ["verify"],
    ["run"], ["run", "--engine_dir", "e", "--top_p", "x"], ["nope"],
    ["build", "--checkpoint_dir", "c", "--output_dir", "o", "--backend", "nope"]])
def test_start_up_help_and_usage_errors_import_no_heavy_library(args):
    assert heavy_imports(args) == []


def heavy_imports(args: list[str] | None, env: dict[str, str] | None = None) -> list[str]:
    """The HEAVY modules a fresh Python has imported after ``kiln ARGS`` (None: only
    importing kiln's CLI), with ``env`` set in its os.environ first."""
    return json.loads(_fresh_python(f"""
        import io, json, os, sys
        from contextlib import redirect_stderr, redirect_stdout
        os.environ.update({env or {}!r})
        from kiln.cli.main import main
        if {args!r} is not None:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                try:
                    main({args!r}, prog_name="kiln")
                except SystemExit:
                    pass
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """))


def test_the_listing_shows_each_lazy_command_s_own_short_help():
    before, after = json.loads(_fresh_python("""
        import click, json
        from kiln.cli.main import LazyCommand, main
        ctx = click.Context(main, info_name="kiln")
        lazy = sorted(n for n, c in main.commands.items() if isinstance(c, LazyCommand))
        before = main.get_help(ctx)
        for name in lazy:
            assert not isinstance(main.get_command(ctx, name), LazyCommand)
        print(json.dumps([before, main.get_help(ctx)]))
    """))
    assert "  verify  " in before and before == after


def test_build_offers_the_registered_backends():
    from kiln.builder.backends import backend_names
    from kiln.cli.build import build

    (backend,) = [p for p in build.params if p.name == "backend"]
    assert list(backend.type.choices) == backend_names()


def test_convert_with_dashed_alias(hf_dir, tmp_path):
    result = _invoke("-q", "convert-checkpoint", "--model_dir", str(hf_dir),
                     "--output_dir", str(tmp_path / "out"), "--tp_size", "2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "rank1.safetensors").is_file()


def test_bad_input_is_one_line_exit_2(tmp_path):
    result = _invoke("convert_checkpoint", "--model_dir", str(tmp_path / "missing"),
                     "--output_dir", str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search("no such (local )?directory", lines[0])


@pytest.mark.parametrize("args", [[], ["cache"]])
def test_a_group_without_its_command_prints_its_help(args):
    """``kiln cache`` alone had printed its whole help after "error:" and before "(see kiln
    cache --help)"; now it prints the help as ``kiln`` alone does, exit 2 (click's)."""
    result = _invoke(*args)
    assert result.exit_code == 2
    assert result.output.startswith(f"Usage: kiln {' '.join(args)}".rstrip() + " [OPTIONS]")
    assert "error:" not in result.output and "(see kiln" not in result.output


@pytest.mark.parametrize("args,message", [
    (["quantize", "--calib_size", "abc"], "'abc' is not a valid integer."),
    (["quantize", "--max_ppl_ratio", "abc"], "'abc' is not a valid number."),
    (["quantize", "--max_ppl_ratio", "nan"], "nan is not in the range x>=1.0."),
    (["serve", "--port", "0"], "0 is not in the range 1<=x<=65535."),
])
def test_a_bad_number_is_named_as_a_number(args, message, tmp_path):
    """click's own words were "'abc' is not a valid integer range" (a trial read it as asking
    for a range), and a range let NaN through (now refused in click's words for a value out of
    range)."""
    result = _invoke(*args, "--checkpoint_dir", str(tmp_path), "--output_dir",
                     str(tmp_path / "q"), "--qformat", "int8_wo") if args[0] == "quantize" \
        else _invoke(*args, "--engine_dir", str(tmp_path))
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert message in result.output


@pytest.mark.parametrize("args,hint", [
    (["run", "-v"], "(-v is kiln's own option: it goes before the command, kiln -v run ...)"),
    (["quantize", "--debug"], "(--debug is kiln's own option: it goes before the command, "
                              "kiln --debug quantize ...)"),
    (["cache", "prune", "-q"], "(-q is kiln's own option: it goes before the command, "
                               "kiln -q cache prune ...)"),
    (["run", "--bogus"], "(see kiln run --help)"),
    (["--bogus"], "(see kiln --help)"),  # trial 38: click's usage block of three lines
    (["-x", "run"], "(see kiln --help)"),
    (["--temperature", "0", "run"], "(--temperature is an option of kiln run: it goes after "
                                    "the command, kiln run --temperature ...)"),  # trial 39
    (["--qformat", "x", "quantize"], "(--qformat is an option of kiln quantize: it goes after "
                                     "the command, kiln quantize --qformat ...)"),
    (["--max_seq_len", "64", "build"], "it goes after the command, kiln build --max_seq_len "
                                       "...)"),  # the command given, not the first (a retest)
    (["--engine_dir", "e", "eval"], "it goes after the command, kiln eval --engine_dir ...)"),
])
def test_a_global_option_after_the_command_says_where_it_goes(args, hint):
    """The README's own "kiln run -v" (a trial copied it) ended at "No such option"."""
    result = _invoke(*args)
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.rstrip().endswith(hint)


@pytest.mark.parametrize("args,hint", [
    (["eval", "--gather_context_logits"], "(--gather_context_logits is an option of kiln bench, "
     "build, cache build, run and serve, not of kiln eval; see kiln eval --help)"),
    (["run", "--qformat", "int8_wo"], "(--qformat is an option of kiln quantize, not of kiln run; "
     "see kiln run --help)"),
    (["cache", "list", "--overwrite"], "(--overwrite is an option of kiln build, "
     "convert_checkpoint and quantize, not of kiln cache list; see kiln cache list --help)"),
    (["serve", "--overwrite"], "(--overwrite is an option of kiln build, convert_checkpoint and "
     "quantize, not of kiln serve; see kiln serve --help)"),
])
def test_an_option_of_another_command_names_the_commands_that_take_it(args, hint):
    """Trial C's kiln eval --gather_context_logits was told "No such option" alone; trial 36's
    serve --overwrite was first asked "Did you mean '--verbose'?", click's guess."""
    result = _invoke(*args)
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output == f"error: No such option '{args[-1 if args[-1][0] == '-' else -2]}'. " \
                            f"{hint}\n"


@pytest.mark.parametrize("args,message", [
    (["run", "--engine_dir", "e", "--input_text", "x", "--ignore_eos", "--no-ignore_eos"],
     "--ignore_eos and --no-ignore_eos contradict each other; give one (see kiln run --help)"),
    (["serve", "--engine_dir", "e", "--no_engine_process", "--engine_process"],
     "--no_engine_process and --engine_process contradict each other; give one "
     "(see kiln serve --help)"),
])
def test_both_forms_of_a_flag_are_refused(args, message):
    """Trial C: click kept the last of a flag's two forms silently."""
    result = _invoke(*args)
    assert result.exit_code == 2 and result.output == f"error: {message}\n", result.output


def test_a_flag_given_twice_the_same_way_passes_on():
    result = _invoke("run", "--engine_dir", "/nonexistent/e", "--input_text", "x",
                     "--ignore_eos", "--ignore_eos")
    assert result.exit_code == 2 and "no such engine directory" in result.output


@pytest.mark.parametrize("args,command", [
    (["eval", "--engine_dir", "e", "--stride"], "kiln eval"),
    (["cache", "list", "--cache_dir"], "kiln cache list"),
    (["run", "--input_text"], "kiln run"),
])
def test_an_option_without_its_value_points_to_its_command(args, command):
    """Trial 36's `kiln eval ... --stride` (its value left out) was sent to `kiln --help`."""
    result = _invoke(*args)
    assert result.exit_code == 2
    assert result.output == f"error: Option '{args[-1]}' requires an argument. " \
                            f"(see {command} --help)\n"


@pytest.mark.parametrize("args,option,value", [
    (["run", "--engine_dir", "e", "--max_output_len", "--input_text", "hi"], "--max_output_len",
     "--input_text"),
    (["run", "--engine_dir", "e", "--input_text", "--chat"], "--input_text", "--chat"),
    (["eval", "--engine_dir", "e", "--dataset", "--stride", "64"], "--dataset", "--stride"),
])
def test_an_option_of_the_command_is_no_value(args, option, value):
    """Trial 37: `--max_output_len --input_text hi` took "--input_text" as the number (then
    told to quote 'hi'), and `--input_text --chat` generated for the prompt "--chat"."""
    result = _invoke(*args)
    command = f"kiln {args[0]}"
    assert result.exit_code == 2
    assert result.output == f"error: Option '{option}' requires an argument: {value} is an " \
                            f"option of {command} (to give it as the value, write " \
                            f"{option}={value}) (see {command} --help)\n"


@pytest.mark.parametrize("args,value,what", [
    (["run", "--engine_dir", "e", "--input_text", "--chta"], "--chta",
     "--chta looks like an option, but kiln run has no such option"),
    (["eval", "--engine_dir", "e", "--dataset", "--strid", "64"], "--strid",
     "--strid looks like an option, but kiln eval has no such option"),
    (["run", "--engine_dir", "e", "--input_text", "--debug"], "--debug",
     "--debug is kiln's own option, which goes before the command"),
    (["run", "--engine_dir", "e", "--input_text", "--help"], "--help",
     "--help is an option of kiln run"),
    # short ones: a trial's `--output_dir -o` built a directory named "-o"
    (["build", "--checkpoint_dir", "c", "--output_dir", "-o"], "-o",
     "-o looks like an option, but kiln build has no such option"),
    (["run", "--engine_dir", "e", "--input_text", "-x"], "-x",
     "-x looks like an option, but kiln run has no such option"),
    (["build", "--checkpoint_dir", "c", "--output_dir", "-ofile"], "-ofile",
     "-ofile looks like an option, but kiln build has no such option"),
    (["build", "--checkpoint_dir", "-v", "--output_dir", "o"], "-v",
     "-v is kiln's own option, which goes before the command"),
    (["build", "--checkpoint_dir", "c", "--output_dir", "-h"], "-h",
     "-h is an option of kiln build"),
])
def test_a_word_that_looks_like_an_option_is_no_value(args, value, what, tmp_path,
                                                      monkeypatch):
    """`--input_text --chta` (a misspelled --chat) had generated for the prompt "--chta"."""
    monkeypatch.chdir(tmp_path)
    result = _invoke(*args)
    option = args[args.index(value) - 1]
    assert result.exit_code == 2
    assert result.output == f"error: Option '{option}' requires an argument: {what} (to give " \
                            f"it as the value, write {option}={value}) (see kiln {args[0]} " \
                            f"--help)\n"
    assert list(tmp_path.iterdir()) == []  # no directory named "-o"


@pytest.mark.parametrize("value", ["-1", "-0.5", "-.5", "-inf", "-", "--", "--1", "- x",
                                   "-x y"])
def test_a_value_that_looks_like_no_option_passes(value, tmp_path):
    """Negative numbers (to their option's own check), a dash alone and values with a space
    after a dash (argparse's rule) stay values."""
    result = _invoke("run", "--engine_dir", str(tmp_path / "nope"), "--input_text", value)
    assert result.exit_code == 2 and "no such engine directory" in result.output, result.output


@pytest.mark.parametrize(("args", "message"), [
    (["build", "--checkpoint_dir", "c", "--output_dir", "o", "--max_batch_size", "-3"],
     "Invalid value for '--max_batch_size': -3 is not in the range x>=1."),
    (["run", "--engine_dir", "e", "--input_text", "hi", "--temperature", "-0.5"],
     "must be a finite number >= 0 (0 = greedy), found -0.5"),
])
def test_a_negative_number_reaches_its_options_check(args, message):
    result = _invoke(*args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_the_equals_form_gives_a_dash_value_literally(tmp_path, monkeypatch):
    """The escape hatch the refusal names: `--checkpoint_dir=-c` is the path "-c"."""
    monkeypatch.chdir(tmp_path)
    result = _invoke("build", "--checkpoint_dir=-c", "--output_dir", "o")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --checkpoint_dir -c: no such kiln checkpoint "
                                    "directory"), \
        result.output


@pytest.mark.parametrize("args, message", [
    (["run", "--engine_dir", "a", "--input_text", "x", "--engine_dir=b"],
     "--engine_dir is given twice ('a', then 'b'); give it once (see kiln run --help)"),
    (["build", "--checkpoint_dir", "c", "--output_dir", "o", "--max_batch_size", "2",
      "--max_batch_size", "4", "--max_batch_size", "8"],
     "--max_batch_size is given 3 times ('2', then '4', then '8'); give it once "
     "(see kiln build --help)"),
    (["cache", "prune", "--max_size", "1G", "--max_size", "2G"],
     "--max_size is given twice ('1G', then '2G'); give it once (see kiln cache prune --help)"),
])
def test_an_option_of_one_value_given_twice_is_refused(args, message, tmp_path):
    """click kept the last value silently: a trial's repeated --engine_dir ran the second."""
    result = _invoke(*args)
    assert result.exit_code == 2 and result.output.strip() == f"error: {message}", result.output


def test_a_required_choice_left_out_is_one_line(tmp_path):
    """click lists the choices one a line: a retest's kiln quantize without --qformat printed
    six lines."""
    result = _invoke("quantize", "--checkpoint_dir", str(tmp_path), "--output_dir",
                     str(tmp_path / "q"))
    assert result.exit_code == 2 and result.output == (
        "error: Missing option '--qformat'. Choose from: fp8, int8_sq, int8_wo, int4_wo, "
        "int4_awq (see kiln quantize --help)\n"), result.output


@pytest.mark.parametrize("args, message", [
    # a trial: "Missing option '--model_dir'" named what was missing, not what was given
    (["cache", "build", "tiny/llama"], "unexpected argument 'tiny/llama': kiln cache build takes "
                                       "options only (each value goes after its option's name)"),
    (["run", "--engine_dir", "e", "--input_text", "hi", "there", "you", "--ignore_eos"],
     "unexpected argument 'there': kiln run takes options only (quote a value with spaces, as "
     "--input_text 'hi there you')"),
    # a trial's prompt without its option
    (["run", "--engine_dir", "e", "hi", "there"],
     "unexpected argument 'hi': kiln run takes options only (the prompt goes after "
     "--input_text: --input_text 'hi there'; or quote a value with spaces, as --engine_dir "
     "'e hi there')"),
])
def test_a_word_that_is_no_option_s_value_is_named(args, message):
    result = _invoke(*args)
    assert result.exit_code == 2 and result.output.strip() == \
        f"error: {message} (see kiln {' '.join(args[:2 if args[0] == 'cache' else 1])} --help)", \
        result.output


@pytest.mark.parametrize("args, meant", [
    (["run", "--engine_dir", "e", "--input_text", "hi", "--max_output", "3"], "--max_output_len"),
    (["build", "--checkpoint_dir", "c", "--output_dir", "o", "--max_batch", "4"],
     "--max_batch_size"),
])
def test_a_misspelled_option_with_its_value_is_named_not_its_value(args, meant):
    """A trial's `--max_output 3` was told "unexpected argument '3'": the misspelling is the
    error, and click suggests the option meant."""
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert f"No such option '{args[-2]}'" in result.output and meant in result.output
    assert "unexpected argument" not in result.output


def test_quiet_and_verbose_together_are_refused():
    result = _invoke("-q", "-v", "cache", "list")
    assert result.exit_code == 2 and result.output.strip() == (
        "error: -q (only errors) and -v (more logging) contradict each other; give one (see "
        "kiln --help)"), result.output


def test_repeatable_options_and_values_that_look_like_options_pass(tmp_path):
    """A value that is an option's name passes in the = form (without it, it is refused: see
    test_an_option_of_the_command_is_no_value)."""
    result = _invoke("run", "--input_text=--engine_dir", "--input_text", "b",
                     "--input_text=--chta", "--engine_dir", str(tmp_path / "nope"))
    assert result.exit_code == 2 and "no such engine directory" in result.output


def test_debug_shows_the_traceback_and_keeps_the_exit_status(tmp_path):
    """--debug adds the traceback; the one-line message and exit 2 stay (a new user's --debug
    run exited 1, where the README says 2)."""
    result = _invoke("--debug", "convert_checkpoint", "--model_dir", str(tmp_path / "missing"),
                     "--output_dir", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "Traceback (most recent call last)" in result.output
    assert CheckpointError.__name__ in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")


def test_unknown_dtype_is_a_usage_error(hf_dir, tmp_path):
    result = _invoke("convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir",
                     str(tmp_path / "out"), "--dtype", "float8")
    assert result.exit_code == 2 and "float8" in result.output


def test_a_revision_of_a_local_directory_is_refused(hf_dir, tmp_path):
    """A revision names a hub model's commit: on a local directory it had been ignored."""
    result = _invoke("convert_checkpoint", "--model_dir", str(hf_dir), "--output_dir",
                     str(tmp_path / "out"), "--revision", "foo")
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert f"--revision foo: {hf_dir} is a local directory" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["build", "--checkpoint_dir", "", "--output_dir", "e"],
     "'--checkpoint_dir': '' is an empty path"),
    (["build", "--checkpoint_dir", "c", "--output_dir", " "],
     "'--output_dir': ' ' is an empty path"),
    (["run", "--engine_dir", "", "--input_text", "hi"], "'--engine_dir': '' is an empty path"),
    (["bench", "--engine_dir", "e", "--json_output", ""], "'--json_output': '' is an empty path"),
    (["verify", ""], "'ENGINE_DIR': '' is an empty path"),
    (["convert_checkpoint", "--model_dir", "", "--output_dir", "o"], "--model_dir is empty"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(args, message, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args, prog_name="kiln")
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert message in result.output


@pytest.mark.parametrize("args", [["eval", "--engine_dir", "e", "--dataset", "{f}/"],
                                  ["run", "--engine_dir", "{f}/", "--input_text", "hi"]])
def test_a_file_s_path_with_a_trailing_slash_is_refused(args, tmp_path, monkeypatch):
    """A retest's --dataset english.txt/ had read the file (pathlib drops the '/'), where
    --input_file english.txt/ was refused and cat says "Not a directory"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "english.txt").write_text("Some text.")
    args = [a.format(f="english.txt") for a in args]
    result = CliRunner().invoke(main, args, prog_name="kiln")
    option = args[args.index("english.txt/") - 1]
    assert result.exit_code == 2 and result.output == (
        f"error: Invalid value for '{option}': 'english.txt/' treats 'english.txt' as a "
        f"directory (a '/' after it), and it is a file; give a directory, or the file's path "
        f"'english.txt' (see kiln {args[0]} --help)\n"), result.output


@pytest.mark.parametrize("size, message", [
    ("1KB", "error: --max_build_memory 1KB is 1000 bytes, less than the 400 MiB any build needs "
            "(a backend's libraries alone); give 400MiB or more"),
    ("0", "error: --max_build_memory 0 is 0 bytes, less than the 400 MiB any build needs"),
])
def test_a_size_under_its_minimum_is_told_as_typed_with_the_minimum(size, message, tmp_path):
    """A trial's --max_build_memory 1KB had been told "--max_build_memory 1000 is 1000 bytes"
    and how to write a size; its 0 "'0' must be at least 1 byte", then 1 the real minimum."""
    args = ["build", "--checkpoint_dir", str(tmp_path), "--output_dir", str(tmp_path / "e"),
            "--max_build_memory", size]
    result = CliRunner().invoke(main, args, prog_name="kiln")
    assert result.exit_code == 2 and result.output.startswith(message), result.output


@pytest.mark.parametrize("args", [
    ["build", "--checkpoint_dir", "c", "--output_dir", "-"],
    ["convert_checkpoint", "--model_dir", "m", "--output_dir", "-"],
    ["quantize", "--checkpoint_dir", "c", "--output_dir", "-", "--qformat", "int8_wo"],
    ["cache", "list", "--cache_dir", "-"],
])
def test_a_dash_is_not_taken_for_a_directory(args, tmp_path, monkeypatch):
    """`--output_dir -` had built into a directory named "-" (the dash names stdin/stdout)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args, prog_name="kiln")
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert "'-' names standard input or output, not a directory; give the directory's path " \
           "(./- for one named '-')" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, why", [
    (["build", "--checkpoint_dir", "file", "--output_dir", "e"],
     "'--checkpoint_dir': 'file' is a file; give a directory's path, not a file's"),
    (["build", "--checkpoint_dir", "c", "--output_dir", "loop"],
     "'--output_dir': 'loop' is a symbolic link loop; give another path"),
    (["run", "--engine_dir", "loop/e", "--input_text", "hi"],
     "'--engine_dir': 'loop/e' is under a symbolic link loop; give another path"),
    (["convert_checkpoint", "--model_dir", "m", "--output_dir", "a" * 300],
     "'--output_dir': '" + "a" * 300 + "' has a name longer than the file system allows (255 "
     "bytes a name); give another path"),
])
def test_a_path_click_or_the_os_refuses_is_one_line_in_kiln_s_words(args, why, tmp_path,
                                                                      monkeypatch):
    """A file had been click's "Directory 'file' is a file.", a symbolic link loop a
    traceback (Path.resolve's RuntimeError) from kiln build and kiln run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "loop").symlink_to("loop")
    result = CliRunner().invoke(main, args, prog_name="kiln")
    assert result.exit_code == 2 and result.output.startswith(
        f"error: Invalid value for {why} (see kiln "), result.output
    assert len(result.output.splitlines()) == 1


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["run", "--help"]])
def test_help_into_a_closed_pipe_exits_as_a_command_does(args):
    """`kiln --help | true` had exited 1 (click's choice) where `kiln run ... | true` exits
    141, as a tool killed by SIGPIPE."""
    process = subprocess.Popen([sys.executable, "-m", "kiln.cli.main", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before kiln has imported: its first write finds it closed
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err.decode()) == (141, "")


@pytest.mark.parametrize("args", [[], ["--bogus"]])
def test_kilns_own_usage_error_into_a_closed_pipe_exits_as_a_command_does(args):
    """`kiln 2>&1 | true`: click writes the help (or `kiln --bogus`'s usage error) after its
    own handlers, so the broken pipe had escaped them as a traceback into the closed pipe and
    exit 1; a command's usage error exits 141 there."""
    process = subprocess.Popen([sys.executable, "-m", "kiln.cli.main", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    process.stdout.close()  # before kiln has imported: its first write finds it closed
    assert process.wait(timeout=120) == 141


def test_an_interrupted_command_called_from_python_leaves_the_signal_handlers(monkeypatch):
    """The quiet exit on a second signal belongs to the console command only: called from
    Python (here click's runner), an interrupted command had left a SIGINT handler that ended
    the caller's process at its next Ctrl-C (os._exit: it crashed a CI test worker)."""
    import signal

    import click

    @click.command()
    def stopped():
        raise KeyboardInterrupt

    monkeypatch.setitem(main.commands, "stopped", stopped)
    before = signal.getsignal(signal.SIGINT)
    assert _invoke("stopped").exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert getattr(signal.getsignal(signal.SIGTERM), "__name__", None) != "exit_now"


@pytest.mark.parametrize("error", ["ImportError", "RuntimeError"])
def test_a_library_s_own_error_for_a_ctrl_c_is_an_interrupt(monkeypatch, error):
    """A trial's Ctrl-C during `kiln cache build`'s imports (1 in 10) ended in onnxruntime's
    `ImportError: initialization failed` (the interrupt its native import caught, as the
    cause), a traceback and exit 1; it is an interrupt: one line, exit 130."""
    import click

    @click.command()
    def boom():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise {"ImportError": ImportError, "RuntimeError": RuntimeError}[error](
                "initialization failed") from e

    @click.command()
    def plain():
        raise RuntimeError("a real bug")

    monkeypatch.setitem(main.commands, "boom", boom)
    monkeypatch.setitem(main.commands, "plain", plain)
    result = _invoke("boom")
    assert result.exit_code == 130 and result.output.strip() == "interrupted (Ctrl-C)"
    result = _invoke("plain")  # no interrupt in the chain: still the bug's traceback
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


@pytest.mark.parametrize("args", ["cache list --cache_dir {tmp}", "--help", "cache --help"])
def test_a_closed_stdout_is_refused_not_silently_lost(tmp_path, args):
    """`kiln run ... >&-`: Python's stdout is None and click dropped the text, exit 0 (also
    `kiln --help >&-`, which click prints while parsing)."""
    args = args.format(tmp=tmp_path)
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m kiln.cli.main {args} >&-"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == \
        "error: standard output is closed (>&-), so kiln's output would be lost; send it to a " \
        "file or to /dev/null\n"


def test_a_signal_after_the_command_is_done_ends_it_as_an_interrupt(tmp_path):
    """A trial's Ctrl-C right after `kiln cache build` printed its engine landed in an exit
    hook of the interpreter's teardown: a traceback ('Exception ignored in atexit callback'),
    exit 0. Here an exit hook sends the signal itself, as late as it can come."""
    script = textwrap.dedent(f"""
        import atexit, os, signal, time
        from kiln.cli.main import run
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))
        run(["cache", "list", "--cache_dir", {str(tmp_path)!r}])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines()[-1] == "interrupted (Ctrl-C)" and \
        "Traceback" not in done.stderr
    assert done.stdout  # what the command printed came out first
