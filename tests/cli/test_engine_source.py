"""--engine_dir or --model_dir on kiln run, bench and eval: exactly one (one line, exit 2,
before torch loads), build options refused beside --engine_dir, --model_dir built through the
build cache once and then found there (saying so), and the engine held while a command runs."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from kiln.build_cache.store import EngineCache
from kiln.cli.build import build as build_command
from kiln.cli.engine_source import MODEL_ONLY
from kiln.cli.main import main
from tests.cli.test_main import HEAVY, _fresh_python

COMMANDS = {"run": ["--input_text", "Hi"], "bench": [], "eval": ["--dataset", "x.txt"]}


def kiln(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="kiln")


def _one_line_error(result, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    assert len(result.output.splitlines()) == 1 and result.output.startswith("error: "), \
        result.output
    for part in parts:
        assert part in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_neither_or_both_is_one_line_saying_what_each_does(command, cache):
    _one_line_error(kiln(command, *COMMANDS[command]),
                    "give --engine_dir ENGINE_DIR (an engine built by kiln build) or "
                    "--model_dir HF_DIR|HUB_ID", f"(see kiln {command} --help)")
    _one_line_error(kiln(command, "--engine_dir", "e", "--model_dir", "m", *COMMANDS[command]),
                    "give --engine_dir or --model_dir, not both")
    assert not cache.dir.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_build_options_beside_engine_dir_are_refused_by_name(command, cache):
    result = kiln(command, "--engine_dir", "e", "--max_seq_len", "64", "--norm_plugin",
                  "enable", *COMMANDS[command])
    _one_line_error(result, "--max_seq_len and --norm_plugin apply to --model_dir only",
                    "drop them, or give --model_dir instead of --engine_dir")
    _one_line_error(kiln(command, "--engine_dir", "e", "--cache_dir", "c", *COMMANDS[command]),
                    "--cache_dir applies to --model_dir only: it decides the engine the build "
                    "cache builds (or where it keeps it)", "drop it")


def test_every_build_option_passes_through_and_eval_sets_gather_context_logits():
    from kiln.cli.bench import bench
    from kiln.cli.eval import eval_command
    from kiln.cli.run import run

    dirs = {"checkpoint_dir", "output_dir", "overwrite"}
    wanted = {p.name for p in build_command.params} - dirs | set(MODEL_ONLY) | {"model_dir"}
    for command in (run, bench):
        assert wanted <= {p.name for p in command.params}
    assert {p.name for p in eval_command.params} >= wanted - {"gather_context_logits"}
    assert "gather_context_logits" not in {p.name for p in eval_command.params}


@pytest.mark.parametrize("args", [
    ["run", "--engine_dir", "e", "--model_dir", "m", "--input_text", "x"],
    ["bench", "--engine_dir", "e", "--max_batch_size", "2"],
    ["eval", "--dataset", "x"]])
def test_the_checks_run_before_torch_loads(args):
    imported = json.loads(_fresh_python(f"""
        import io, json, sys
        from contextlib import redirect_stderr, redirect_stdout
        from kiln.cli.main import main
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            try:
                main({args!r}, prog_name="kiln")
            except SystemExit as e:
                assert e.code == 2, e.code
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """))
    assert imported == []


def test_run_builds_once_then_uses_the_cached_engine_and_says_so(tiny_hf, cache, caplog):
    args = ["run", "--model_dir", str(tiny_hf), "--input_text", "Hello", "--max_output_len", "5",
            "--ignore_eos", "--max_batch_size", "2"]
    with caplog.at_level(logging.WARNING):
        first = kiln(*args)
        built = [r.getMessage() for r in caplog.records]
        caplog.clear()
        second = kiln(*args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert first.stdout == second.stdout and first.stdout.count("\n") == 1
    (entry,) = cache.entries()
    assert json.loads((entry.engine_dir / "config.json").read_text())["limits"][
        "max_batch_size"] == 2
    assert len(built) == 1 and built[0].startswith(f"building the engine for {tiny_hf} (onnx, "
                                                   f"the default on a machine without a CUDA GPU)")
    (hit,) = caplog.records  # one line at the default level (WARNING), naming the backend
    assert hit.levelno == logging.WARNING and "\n" not in hit.getMessage()
    assert hit.getMessage().startswith(f"using cached engine {entry.engine_dir} (onnx, the "
                                       f"default on a machine without a CUDA GPU; {tiny_hf}, "
                                       f"built ")
    assert kiln(*args[:-1], "3").exit_code == 0 and len(cache.entries()) == 2  # another key


def test_the_engine_is_held_while_the_command_runs(tiny_hf, cache, monkeypatch):
    """A prune between the lookup and the engine's opening keeps the engine (in use; the LLM
    then holds it itself: tests/runtime/test_llm_model.py); after the command it is removed.
    An --engine_dir inside the cache is held as well."""
    from kiln.runtime import LLM

    pruned = []

    def prune_then_open(*args):
        pruned.append(EngineCache().prune(everything=True))
        return LLM(*args)

    monkeypatch.setattr("kiln.runtime.LLM", prune_then_open)  # kiln run imports it when run
    prompt = ["--input_text", "Hi", "--max_output_len", "2"]
    assert kiln("run", "--model_dir", str(tiny_hf), *prompt).exit_code == 0
    (entry,) = cache.entries()
    assert kiln("run", "--engine_dir", str(entry.engine_dir), *prompt).exit_code == 0
    assert [[e.name for e in p.in_use] for p in pruned] == [[entry.name]] * 2
    assert [p.removed for p in pruned] == [[], []]
    assert [e.name for e in cache.prune(everything=True).removed] == [entry.name]


def test_eval_builds_its_engine_with_context_logits(tiny_hf, cache, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nPack my box with five "
                    "dozen liquor jugs.\n")
    result = kiln("eval", "--model_dir", str(tiny_hf), "--dataset", str(text), "--stride", "32")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("perplexity ")
    (entry,) = cache.entries()
    assert json.loads((entry.engine_dir / "config.json").read_text())["gather_context_logits"]
    again = kiln("eval", "--engine_dir", str(entry.engine_dir), "--dataset", str(text),
                 "--stride", "32")
    assert again.stdout == result.stdout


def test_bench_on_a_model_dir(tiny_hf, cache):
    result = kiln("bench", "--model_dir", str(tiny_hf), "--input_len", "8", "--output_len", "4",
                  "--num_requests", "2", "--warmup", "0")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    (entry,) = cache.entries()
    assert report["engine"]["engine_dir"] == str(entry.engine_dir)
    assert report["engine"]["backend"] == "onnx"


@pytest.mark.parametrize("args, message", [
    (["bench", "--baseline", "hf"], "--model_dir builds with --backend onnx; add --backend torch"),
    (["bench", "--json_output", "{notes}"], "exists and is not a kiln bench report"),
    (["eval", "--dataset", "x.txt", "--json_output", "{notes}"],
     "exists and is not a kiln eval report"),
    # not read whole to find out (a new user's /dev/full took 24 GB)
    (["bench", "--json_output", "/dev/zero"], "/dev/zero is not a regular file"),
    (["bench", "--json_output", "{notes}/new/r.json"], "r.json: cannot be written, {notes} is a "
                                                        "file, not a directory"),
    (["eval", "--dataset", "x.txt", "--json_output", "{big}"],
     "exists and is not a kiln eval report"),
    # a trial's report went into the Hugging Face dir it read (an input)
    (["eval", "--dataset", "{text}", "--json_output", "{model}/r.json"],
     "r.json is inside the --model_dir {model}, an input kiln only reads; write the report "
     "elsewhere"),
    (["bench", "--json_output", "{model}/r.json"], "inside the --model_dir {model}, an input"),
    (["run", "--input_text", "Hi", "--dtype", "float64"], "'float64' is not one of"),
    # the command's own checks, on the engine the build would make
    (["eval", "--dataset", "{tmp}/nope.txt"], "nope.txt: no such file or directory"),
    (["eval", "--dataset", "{tmp}/two.txt"], "two.txt: the text is 2 tokens long, so 1 token "
                                             "to score (the first is context only); perplexity "
                                             "needs at least 2 to score"),
    (["eval", "--dataset", "{text}", "--max_seq_len", "48", "--max_length", "60"],
     "max_length 60 exceeds the engine's max_input_len 48"),
    (["eval", "--dataset", "{text}", "--max_seq_len", "48", "--stride", "60"],
     "stride 60 must be in [1, max_length 48]"),
    (["bench", "--input_len", "60", "--max_seq_len", "48"],
     "60 exceeds the engine's max_input_len 48"),
    (["run", "--input_text", ""], "prompt 1: the prompt is empty"),
    (["run", "--input_text", "one two three four five six seven eight nine ten",
      "--max_input_len", "4"], "exceeds the engine's max_input_len 4"),
    (["run", "--input_text", "Hi", "--stop_token_ids", "99999"],
     "--stop_token_ids: token id 99999 is outside the vocabulary"),
    (["bench", "--max_batch_size", "100000000", "--max_seq_len", "64"],
     "max_batch_size 100000000) need a KV cache of"),
    # conversion's and the build's checks, from the options and the HF config
    (["run", "--input_text", "Hi", "--max_input_len", "60", "--max_seq_len", "32"],
     "max_input_len (60) exceeds max_seq_len (32)"),
    (["run", "--input_text", "Hi", "--target", "sm999"], "builds for one target, cpu or cuda"),
    (["run", "--input_text", "Hi", "--max_seq_len", "100000"],
     "exceeds the model's max_position_embeddings 64"),
    # named as flags (they had been tp_size, pp_size: a trial's --tp_size 2)
    (["run", "--input_text", "Hi", "--tp_size", "3"], "--tp_size 3 does not divide the 4 query "
                                                      "heads; this model allows --tp_size 1, 2, "
                                                      "4"),
    (["run", "--input_text", "Hi", "--tp_size", "2"],  # (a retest had been told of "a tp_size
     # 1 checkpoint", which --model_dir never makes)
     "the onnx backend cannot run tp_size 2: ONNX Runtime has no collective op; use --backend "
     "torch (one process per rank), --backend tensorrt (NVIDIA GPUs), or --tp_size 1"),
    (["run", "--input_text", "Hi", "--pp_size", "2", "--dp", "2"],  # (retest 44c: had been sent
     # to kiln convert_checkpoint)
     "--dp 2 runs copies of a single-rank engine, and this engine has 2 ranks (tp 1 x pp 2); run "
     "it with --dp 1, or pass --tp_size 1 and --pp_size 1 for data parallelism"),
    (["bench", "--max_num_tokens", "4", "--max_batch_size", "5"],
     "max_num_tokens 4 is below max_batch_size 5"),
    (["run", "--input_text", "Hi", "--pp_size", "100"], "--pp_size 100 exceeds the 2 layers (a "
                                                        "stage holds at least one); this model "
                                                        "allows --pp_size 1 to 2"),
    # this machine (no CUDA GPU) cannot run the engine: the runtime's machine check
    (["run", "--input_text", "Hi", "--backend", "torch"],
     "needs a CUDA GPU for its Triton kernels; on this machine use an onnx engine (build with "
     "--backend onnx)"),
    (["serve", "--backend", "torch"], "needs a CUDA GPU"),
])
def test_bad_input_with_model_dir_is_refused_before_a_build(tiny_hf, cache, tmp_path, args,
                                                            message, caplog):
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB that the check must not read
    text = tmp_path / "text.txt"
    text.write_text("Some text to score, long enough for a window or two.")
    (tmp_path / "two.txt").write_text("Hi")  # a token a character
    args = [a.format(notes=notes, tmp=tmp_path, big=big, text=text, model=tiny_hf)
            for a in args]
    with caplog.at_level(logging.WARNING):
        _one_line_error(kiln(args[0], "--model_dir", str(tiny_hf), *args[1:]),
                        message.format(model=tiny_hf, notes=notes))
    assert not (tiny_hf / "r.json").exists()
    assert not [r for r in caplog.records if "building the engine" in r.getMessage()]
    assert cache.entries() == []


@pytest.mark.parametrize("args", [["bench"], ["run", "--input_text", "Hi"]])
def test_limits_too_large_for_this_machine_name_the_options_to_pass(tiny_hf, cache, args):
    """A trial's kiln run --model_dir had been told to "rebuild with a smaller --max_seq_len",
    an engine it never built; an --engine_dir's is still told to rebuild."""
    result = kiln(args[0], "--model_dir", str(tiny_hf), "--max_batch_size", "100000000",
                  "--max_seq_len", "64", *args[1:])
    _one_line_error(result, "need a KV cache of",
                    "; pass a smaller --max_seq_len or --max_batch_size")
    assert "rebuild" not in result.output and cache.entries() == []


def test_a_cut_output_names_the_option_to_pass(tiny_hf, cache, caplog):
    with caplog.at_level(logging.WARNING, logger="kiln.cli.run"):
        result = kiln("run", "--model_dir", str(tiny_hf), "--input_text", "Hi", "--max_seq_len",
                      "8", "--max_output_len", "50", "--ignore_eos")
    assert result.exit_code == 0, result.output
    (warned,) = [m for m in caplog.messages if "--max_output_len" in m]
    assert warned.endswith("(finish 'length'); for more, pass a larger --max_seq_len")


def test_cache_build_still_builds_what_this_machine_cannot_run(tiny_hf, cache):
    """Engines built ahead of time: kiln cache build runs no machine check (a torch engine for
    CUDA, on this machine without a GPU), and kiln run on it then refuses without building."""
    result = kiln("cache", "build", "--model_dir", str(tiny_hf), "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert len(cache.entries()) == 1
    _one_line_error(kiln("run", "--model_dir", str(tiny_hf), "--backend", "torch",
                         "--input_text", "Hi"), "needs a CUDA GPU")


def test_a_missing_model_dir_is_one_line(tmp_path, cache):
    _one_line_error(kiln("run", "--model_dir", str(tmp_path / "nope"), "--input_text", "Hi"),
                    f"{tmp_path / 'nope'}: no such local directory")
