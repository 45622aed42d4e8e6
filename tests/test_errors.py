"""kiln.errors' shared checks."""

from __future__ import annotations

import pytest

import kiln
from kiln.builder.options import BuildOptions
from kiln.converters.options import ConvertOptions
from kiln.engine import BuildLimits, EngineError
from kiln.errors import ConfigError, KilnError, option, options_as_flags, outside_vocabulary
from kiln.evaluation import check_window, evaluate, resolve_window
from kiln.quantization.options import QuantizeOptions
from kiln.runtime.options import ExecutorOptions


@pytest.mark.parametrize("make,error,field", [
    (lambda **kw: ConvertOptions(**kw), ConfigError, "overwrite"),
    (lambda **kw: QuantizeOptions(qformat="int8_wo", **kw), ConfigError, "quantize_lm_head"),
    (lambda **kw: QuantizeOptions(qformat="int8_wo", **kw), ConfigError, "no_accuracy_gate"),
    (lambda **kw: BuildOptions("ckpt", "out", **kw), ConfigError, "overwrite"),
    (lambda **kw: BuildOptions("ckpt", "out", **kw), ConfigError, "gather_context_logits"),
    (lambda **kw: ExecutorOptions(**kw), EngineError, "cpu_spin_wait"),
    (lambda **kw: ExecutorOptions(**kw), EngineError, "verify_checksums"),
], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_a_flag_of_the_python_api_takes_true_or_false_only(make, error, field, value):
    """A trial's overwrite="no" had replaced an existing output, no_accuracy_gate="false"
    written a checkpoint past its gate and quantize_lm_head="false" quantized the head: a
    non-empty string is truthy. None is the default where the option has one (cpu_spin_wait)."""
    if value is None and field == "cpu_spin_wait":
        assert make(**{field: None}).cpu_spin_wait is None
        return
    with pytest.raises(error) as e:
        make(**{field: value})
    assert str(e.value) == f"{field} must be True or False, found {value!r}"
    assert getattr(make(**{field: True}), field) is True


COUNTS = [  # (options, field, least, whether None is its default)
    (lambda **kw: ConvertOptions(**kw), "tp_size", 1, False),
    (lambda **kw: ConvertOptions(**kw), "pp_size", 1, False),
    (lambda **kw: QuantizeOptions(qformat="int8_sq", calib_dataset="d", **kw), "calib_size", 1,
     False),
    (lambda **kw: QuantizeOptions(qformat="int4_wo", **kw), "group_size", 1, True),
    (lambda **kw: BuildOptions("ckpt", "out", **kw), "max_batch_size", 1, False),
    (lambda **kw: BuildOptions("ckpt", "out", **kw), "max_seq_len", 2, True),  # had been 1
    (lambda **kw: BuildOptions("ckpt", "out", **kw), "workers", 1, False),
    (lambda **kw: ExecutorOptions(**kw), "num_threads", 1, True),
    (lambda **kw: ExecutorOptions(**kw), "dp", 1, False),
    (lambda **kw: ExecutorOptions(**kw), "rank", 0, False),
]


@pytest.mark.parametrize("make,field,least,optional", COUNTS,
                         ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("value", ["2", 2.0, True, None, "least - 1"])
def test_a_count_of_the_python_api_takes_an_integer_in_range_only(make, field, least, optional,
                                                                   value):
    """One check for every options class (kiln.errors.check_counts): build's had taken
    max_batch_size=True as 1, and each class had its own wording."""
    error = EngineError if field in ("num_threads", "dp", "rank") else ConfigError
    value = least - 1 if value == "least - 1" else value
    if value is None and optional:
        assert getattr(make(**{field: None}), field) is None
        return
    with pytest.raises(error) as e:
        make(**{field: value})
    wanted = "a positive integer" if least == 1 else f"an integer >= {least}"
    assert str(e.value) == f"{field} must be {wanted}, found {value!r}"
    assert getattr(make(**{field: least}), field) == least
    with options_as_flags(), pytest.raises(error) as e:  # a kiln command's: its flag
        make(**{field: value})
    assert str(e.value) == f"--{field} must be {wanted}, found {value!r}"


def test_an_engine_s_limits_are_named_as_its_manifest_names_them():
    """BuildLimits come from a build's options (checked, and named, there) or from an engine's
    config.json, whose keys no flag sets: kept bare inside a kiln command too."""
    with options_as_flags(), pytest.raises(ConfigError) as e:
        BuildLimits(max_batch_size=0, max_input_len=8, max_seq_len=16, max_num_tokens=8)
    assert str(e.value) == "max_batch_size must be a positive integer, found 0"


@pytest.mark.parametrize("field,value,shown", [
    ("tp_size", -(10 ** 5000), "found a negative integer of about 5,001 digits"),
    ("overwrite", "n" * 500, "found 'nnnnnnnnnnnnnnnnnnn...nnnnnnn' (502 characters)"),
], ids=["5000-digit-count", "500-character-flag"])
def test_a_huge_value_is_shown_cut(field, value, shown):
    """The counts and flags are shown as the runtime shows a request's values
    (kiln.errors.shown): repr() refuses an int past 4,300 digits (a ValueError, not the one
    line), and a long string had been echoed whole."""
    with pytest.raises(ConfigError) as e:
        ConvertOptions(**{field: value})
    assert str(e.value).endswith(shown) and len(str(e.value)) < 100, str(e.value)


@pytest.mark.parametrize("call", [
    lambda **kw: kiln.convert_checkpoint("no/such/model", "out", **kw),
    lambda **kw: kiln.quantize("no/such/ckpt", "out", qformat="int8_wo", **kw),
    lambda **kw: kiln.build("no/such/ckpt", "out", **kw),
    lambda **kw: evaluate("no/such/engine", "no/such/text.txt", **kw),
], ids=["convert_checkpoint", "quantize", "build", "evaluate"])
def test_progress_of_the_python_api_takes_true_or_false_only(call):
    """Trial D's quantize(progress="yes") was taken (a truthy string); it is refused first."""
    with pytest.raises(ConfigError, match=r"^progress must be True or False, found 'yes'$"):
        call(progress="yes")


@pytest.mark.parametrize("call", [
    lambda: kiln.convert_checkpoint("no/such/model", "out", progess=True),
    lambda: kiln.quantize("no/such/ckpt", "out", qformat="int8_wo", progess=True),
    lambda: kiln.build("no/such/ckpt", "out", progess=True),
], ids=["convert_checkpoint", "quantize", "build"])
def test_a_misspelt_progress_is_told_the_name(call):
    """Trial 36's build(progres=False) was told the options build takes, progress not among
    them, and no guess."""
    with pytest.raises(ConfigError, match=r"\(progess: did you mean progress\?\); it takes .*"
                                          r"progress"):
        call()


@pytest.mark.parametrize("make, python, command_line", [
    (lambda: ExecutorOptions(dp=2, engine_process=True),
     "dp=2 runs every replica in a process of its own already; leave engine_process out",
     "--dp 2 runs every replica in a process of its own already; leave --engine_process out"),
    (lambda: QuantizeOptions(qformat="int8_wo", calib_size=4),
     "calib_size needs calib_dataset, which is not given; give it, or leave calib_size out",
     "--calib_size needs --calib_dataset, which is not given; give it, or leave --calib_size "
     "out"),
    (lambda: QuantizeOptions(qformat="int8_wo", calib_size=4, eval_dataset="e.txt"),
     "calib_size does nothing here: int8_wo calibrates nothing, and eval_dataset scores the "
     "accuracy gate; leave calib_size out",
     "--calib_size does nothing here: int8_wo calibrates nothing, and --eval_dataset scores the "
     "accuracy gate; leave --calib_size out"),
    (lambda: QuantizeOptions(qformat="int8_wo", kv_cache_dtype="fp8"),
     "kv_cache_dtype='fp8' needs calibration data: pass calib_dataset (a .txt, .jsonl or "
     ".parquet file, or a hub dataset id)",
     "--kv_cache_dtype fp8 needs calibration data: pass --calib_dataset (a .txt, .jsonl or "
     ".parquet file, or a hub dataset id)"),
    (lambda: QuantizeOptions(qformat="int8_wo", max_ppl_ratio=1.5, calib_max_seq_length=64),
     "calib_max_seq_length and max_ppl_ratio need text: calib_dataset or eval_dataset, and "
     "neither is given; give one, or leave them out",
     "--calib_max_seq_length and --max_ppl_ratio need text: --calib_dataset or --eval_dataset, "
     "and neither is given; give one, or leave them out"),
    (lambda: QuantizeOptions(qformat="int8_wo", eval_dataset="e.txt", max_ppl_ratio=0.5),
     "max_ppl_ratio must be a finite number >= 1 (no_accuracy_gate=True measures without "
     "refusing), found 0.5",
     "max_ppl_ratio must be a finite number >= 1 (--no_accuracy_gate measures without "
     "refusing), found 0.5"),
    (lambda: check_window(max_length=8, stride=9),  # evaluate()'s, and kiln eval's
     "stride 9 must be in [1, max_length 8]; lower stride",
     "stride 9 must be in [1, max_length 8]; lower --stride"),
    # a trial's too-long max_length from Python had been told of --max_input_len, --model_dir
    (lambda: resolve_window(max_input_len=96, max_length=97, stride=None),
     "max_length 97 exceeds the engine's max_input_len 96; lower max_length or build with a "
     "larger max_input_len (kiln.build, or beside LLM(model=...))",
     "max_length 97 exceeds the engine's max_input_len 96; lower --max_length or build with a "
     "larger --max_input_len (kiln build, or beside --model_dir)"),
    (lambda: check_window(max_length=8, stride=0),
     "stride 0 must be in [1, max_length 8]; raise stride",
     "stride 0 must be in [1, max_length 8]; raise --stride"),
], ids=["dp-engine_process", "calib_size", "calib_size-eval", "kv_cache_dtype", "gate-text",
        "max_ppl_ratio", "stride", "max_length-too-long", "stride-0"])
def test_an_option_is_named_as_the_python_api_or_the_cli_takes_it(make, python, command_line):
    """A Python caller of ExecutorOptions(dp=2, ...), QuantizeOptions or evaluate() had been
    told of --dp, --calib_size, --stride: flags it has not. The CLI (which runs its commands
    in kiln.errors.options_as_flags) still names its flags."""
    with pytest.raises(KilnError) as e:
        make()
    assert str(e.value) == python
    with options_as_flags(), pytest.raises(KilnError) as e:
        make()
    assert str(e.value) == command_line
    with pytest.raises(KilnError) as e:  # and the keywords again after the command
        make()
    assert str(e.value) == python


def test_option_names_a_keyword_or_a_flag():
    from pathlib import Path

    assert (option("dp"), option("dp", 2), option("eval_dataset", Path("a b.txt")),
            option("quantize_lm_head", True)) == \
        ("dp", "dp=2", "eval_dataset='a b.txt'", "quantize_lm_head=True")
    with options_as_flags():
        assert (option("dp"), option("dp", 2), option("eval_dataset", Path("a b.txt")),
                option("quantize_lm_head", True)) == \
            ("--dp", "--dp 2", "--eval_dataset a b.txt", "--quantize_lm_head")


def test_option_names_a_flag_other_than_the_keyword_where_told():
    """LLM(model=...) and engine_for_model(model) take what kiln run takes as --model_dir."""
    assert (option("model", flag="model_dir"), option("model", "m", flag="model_dir")) == \
        ("model", "model='m'")
    with options_as_flags():
        assert (option("model", flag="model_dir"), option("model", "m", flag="model_dir")) == \
            ("--model_dir", "--model_dir m")


def test_listed_names_a_few_and_counts_the_rest():
    from kiln.errors import listed

    assert listed([]) == "[]" and listed(list("abcde")) == "['a', 'b', 'c', 'd', 'e']"
    assert listed(list("abcdefg")) == "['a', 'b', 'c', 'd', 'e'] and 2 more"
    assert listed(list("abc"), most=2) == "['a', 'b'] and 1 more"


def test_advice_on_limits_names_options_to_pass_for_an_engine_built_from_them():
    """A kiln run --model_dir user had been told to "rebuild with a smaller --max_seq_len": no
    build of theirs made that engine, the options they passed did."""
    from kiln.errors import build_larger, build_smaller, limits_as_options

    with options_as_flags():
        assert build_smaller("max_seq_len", "max_batch_size") == \
            "rebuild with a smaller --max_seq_len or --max_batch_size"
        with limits_as_options():
            assert build_smaller("max_seq_len", "max_batch_size") == \
                "pass a smaller --max_seq_len or --max_batch_size"
            assert build_larger("max_input_len") == "pass a larger --max_input_len"
        assert build_larger("max_input_len").startswith("build with a larger --max_input_len")
    with limits_as_options():
        assert build_smaller("max_seq_len") == "pass a smaller max_seq_len"


@pytest.mark.parametrize("value, message", [
    (5, "engine_dir must be a path (a str or os.PathLike), found int 5"),
    (None, "engine_dir must be a path (a str or os.PathLike), found None"),
    (b"e", "engine_dir must be a path (a str or os.PathLike), found bytes b'e'"),
    ("", "engine_dir is empty; give it"),
    ("-", "engine_dir='-': kiln reads '-' as standard input or output, not a directory; give "
          "the directory's path (./- for one named '-')"),
    ("e\0", "engine_dir='e\\x00' holds a NUL character, which no path can hold; give the path "
            "without it"),
])
def test_check_path_names_the_argument_and_what_it_takes(value, message):
    from kiln.errors import check_path

    with pytest.raises(ConfigError) as raised:
        check_path("engine_dir", value, ConfigError, "give it", directory=True)
    assert str(raised.value) == message
    with options_as_flags(), pytest.raises(ConfigError, match="^--engine_dir"):
        check_path("engine_dir", value, ConfigError, "give it", directory=True)


def test_check_path_names_its_flag_where_that_is_another_name():
    from kiln.errors import check_path

    with pytest.raises(ConfigError, match="^model is empty"):
        check_path("model", "", ConfigError, "give it", flag="model_dir")
    with options_as_flags(), pytest.raises(ConfigError, match="^--model_dir is empty"):
        check_path("model", "", ConfigError, "give it", flag="model_dir")


def test_check_path_takes_a_path_and_a_dash_where_no_directory_is_asked_for(tmp_path):
    from kiln.errors import check_path

    for value in ("x", tmp_path, "./-"):
        check_path("engine_dir", value, ConfigError, "give it", directory=True)
    check_path("dataset", "-", ConfigError, "give it")


@pytest.mark.parametrize("engine_dir, dataset, error, message", [
    (5, "d.txt", EngineError, "engine_dir must be a path (a str or os.PathLike), found int 5"),
    ("e", None, "DatasetError", "dataset must be a path (a str or os.PathLike), found None"),
])
def test_evaluate_refuses_an_argument_that_is_no_path(engine_dir, dataset, error, message):
    from kiln.errors import DatasetError

    error = DatasetError if error == "DatasetError" else error
    with pytest.raises(error) as raised:
        evaluate(engine_dir, dataset)
    assert str(raised.value) == message


@pytest.mark.parametrize("ids, label, expected", [
    ([0, 7], "prompt", None),
    ([1, 8, -1], "prompt", "prompt[1]: token id 8 is outside the vocabulary [0, 8); pass ids of "
                           "the model's tokenizer"),
    ([[1], [2, -3]], "input_ids", "input_ids[1][1]: token id -3 is outside the vocabulary "
                                  "[0, 8); pass ids of the model's tokenizer"),
    ((3, 9), None, "token id 9 is outside the vocabulary [0, 8); pass ids of the model's "
                   "tokenizer"),
    ([-10**300], "stop", "stop[0]: a token id, a negative integer of about 301 digits, is "
                         "outside the vocabulary [0, 8); pass ids of the model's tokenizer"),
])
def test_outside_vocabulary_names_the_first_id_outside_by_its_path(ids, label, expected):
    found = outside_vocabulary(ids, 8, label)
    assert (None if found is None else str(found)) == expected
