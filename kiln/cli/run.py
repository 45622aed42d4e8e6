"""``kiln run``: generate from an engine dir and print the text, then TTFT, TPOT and tokens/s.

Thin over :class:`kiln.runtime.LLM`. The engine is ``--engine_dir``'s, or ``--model_dir``'s
from the build cache (kiln/cli/engine_source.py). Sampling flags are generated from the fields of
:class:`~kiln.runtime.SamplingParams` (their help included); flags not given keep the engine's
generation_config.json defaults (greedy unless it says ``do_sample``).

Output contract:
- stdout holds only generated text, so it can be piped. One prompt: its text and a newline.
  Several prompts: one block per prompt, in prompt order, each a ``[i]`` header line, then the
  text and a newline. ``--streaming`` prints the same bytes as they come: the earliest block
  not yet complete is printed live; a later block's text is held until every block before it
  is complete, then printed (what it has so far) and continued live.
- The stats line (mean TTFT, time per output token, tokens/s) goes to stderr; kiln's own
  ``-q`` (``kiln -q run``) drops it.
- A request that ended with an error (its logits turned NaN/Inf, ...) adds an ``error:`` line
  with its reason on stderr, and the command exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import types
import typing
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kiln.cli.context import (
    CliContext,
    IntRange,
    PathArg,
    dp_option,
    executor_options,
    gpu_options,
)
from kiln.cli.engine_source import engine_command, held_engine
from kiln.errors import (
    UNREADABLE_JSON,
    KilnError,
    build_larger,
    json_type,
    outside_vocabulary,
    shown,
)
from kiln.runtime.errors import SamplingParamsError
from kiln.runtime.params import SamplingParams, is_utf8  # torch-free: --help stays fast

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kiln.engine import EngineManifest
    from kiln.runtime import LLM, CompletionResult

log = logging.getLogger(__name__)

# Fields with their own flag (max_tokens is --max_output_len) or not shown by this command.
# logprobs, prompt_logprobs: the API returns them; run prints text
_NOT_FLAGS = {"max_tokens", "logprobs", "prompt_logprobs"}


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, multiple) for a SamplingParams annotation."""
    hint = typing.get_type_hints(SamplingParams)[annotation]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        return args[0], False
    return hint, False


def sampling_options(func):
    """Add one ``--<field>`` option per SamplingParams field (help from its metadata)."""
    for f in reversed(dataclasses.fields(SamplingParams)):
        if f.name in _NOT_FLAGS:
            continue
        kind, multiple = _click_type(f.name)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            opt = click.option(f"--{f.name}/--no-{f.name}", default=None, help=help_text)
        else:
            opt = click.option(f"--{f.name}", type=kind, multiple=multiple, default=None,
                               help=help_text + (" Repeatable." if multiple else ""))
        func = opt(func)
    return func


def _overrides(given: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None and v != ()}


def check_sampling_flags(max_output_len: int, given: dict[str, Any]) -> None:
    """The sampling flags checked before the engine loads, each over SamplingParams' defaults
    (the engine's own are read with it), a bad one named as its flag."""
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    flags = {k: v for k, v in _overrides(given).items() if k in fields}  # not the engine's
    try:
        SamplingParams(max_tokens=max_output_len, **flags)
    except SamplingParamsError as e:  # stop[0]: an entry of --stop, named by its flag
        flag = "--max_output_len" if e.name == "max_tokens" else f"--{e.name}"
        raise click.BadParameter(e.worded(shown), param_hint=flag) from None


def build_params(llm: LLM, max_output_len: int, given: dict[str, Any]) -> SamplingParams:
    return llm.default_params.replace(max_tokens=max_output_len, **_overrides(given))


def read_prompts(input_text: tuple[str, ...],
                 input_file: Path | tuple[Path, ...] | None) -> list[str]:
    """Prompts from --input_text and --input_file (both repeatable; a file: .jsonl, one per
    line, else one), texts first, then the files in order."""
    for text in input_text:
        if not is_utf8(text):
            raise click.BadParameter(f"{_shown(text)} is not UTF-8 text (the shell passed bytes "
                                     "that are not UTF-8; set a UTF-8 locale or use "
                                     "--input_file)", param_hint="--input_text")
    prompts = list(input_text)
    files = () if input_file is None else (input_file,) if isinstance(input_file, Path) \
        else input_file
    if sum(str(path) == "-" for path in files) > 1:
        raise click.BadParameter("- (standard input) given more than once; it holds one prompt",
                                 param_hint="--input_file")
    for path in files:
        prompts += _read_input_file(path)
    if not prompts:
        # a usage line: "Invalid value for --input_text" had been said of no value given
        raise click.UsageError("give a prompt: --input_text TEXT or --input_file FILE")
    return prompts


# Most bytes an --input_file may hold (prompts, not a corpus): a device such as /dev/zero, or a
# wrong file, is refused at this size instead of filling the memory.
INPUT_FILE_MAX_BYTES = 256 << 20


def _read_input_file(path: Path) -> list[str]:
    """The prompts of one --input_file ("-": standard input, one prompt; a text file's
    trailing newlines are dropped, as the shell's ``$(cat FILE)`` drops them); a malformed
    file is one BadParameter naming the line."""
    data = bytearray()
    stdin = str(path) == "-"
    if stdin:
        path = Path("stdin")  # how messages name it
        if sys.stdin is None:
            raise click.BadParameter("stdin: closed; pipe the prompt in",
                                     param_hint="--input_file")
        if sys.stdin.isatty():
            click.echo("reading the prompt from standard input (end it with Ctrl-D)", err=True)
    try:
        with nullcontext(sys.stdin.buffer) if stdin else path.open("rb") as f:
            # in pieces: a signal is handled between them
            while piece := f.read(min(1 << 20, INPUT_FILE_MAX_BYTES + 1 - len(data))):
                data += piece
                if len(data) > INPUT_FILE_MAX_BYTES:
                    raise click.BadParameter(
                        f"{path}: more than {INPUT_FILE_MAX_BYTES >> 20} MiB; --input_file "
                        f"takes prompts (a text file, or .jsonl with one per line)",
                        param_hint="--input_file")
    except OSError as e:
        raise click.BadParameter(f"{path}: cannot be read ({e.strerror or e})",
                                 param_hint="--input_file") from None
    try:  # newlines as text mode reads them ("\r\n" and "\r" as "\n"); a leading BOM (an
        # editor's, on Windows) is no part of the prompt: a trial's had changed the answer
        text = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise click.BadParameter(f"{path} line {line}: not UTF-8 text (byte offset {e.start}: "
                                 f"{e.reason})", param_hint="--input_file") from None
    if path.suffix != ".jsonl":
        text = text.rstrip("\n")  # the newline(s) an editor or echo ends a file with
        if not text:
            fix = "empty; pipe the prompt in" if stdin else \
                "the file is empty; write the prompt in it"
            raise click.BadParameter(f"{path}: {fix}", param_hint="--input_file")
        return [text]
    unread: dict[str, int] = {}  # key -> first line holding it
    prompts = [_jsonl_prompt(f"{path} line {n}", line, unread, n)
               for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts:
        raise click.BadParameter(f"{path}: no prompts (every line is blank)",
                                 param_hint="--input_file")
    if unread:  # a trial's {"prompt": ..., "max_tokens": 2} had run at the global length
        keys = ", ".join(f"{k!r} (line {n})" for k, n in list(unread.items())[:5])
        more = f" and {len(unread) - 5} more" if len(unread) > 5 else ""
        verb = "is" if len(unread) == 1 else "are"
        log.warning("%s: only each line's 'prompt' is read; %s%s %s not (sampling settings "
                    "are options, for every prompt: kiln run --help)", path, keys, more, verb)
    return prompts


def _jsonl_prompt(where: str, line: str, unread: dict[str, int], number: int) -> str:
    """One .jsonl line: a JSON string, or an object whose "prompt" is a string (its other
    keys, not read, are added to ``unread`` with the first line ``number`` holding each)."""
    try:
        item = json.loads(line)
    except UNREADABLE_JSON as e:
        raise click.BadParameter(f"{where}: not JSON ({e.msg}: column {e.colno})",
                                 param_hint="--input_file") from None
    if isinstance(item, str) and not is_utf8(item):
        message = "the string holds a lone surrogate escape (\\ud800-\\udfff), not UTF-8 text"
    elif isinstance(item, str) and not item:
        message = "the prompt is empty"
    elif isinstance(item, str):
        return item
    elif not isinstance(item, dict):
        message = f'expected a JSON string or {{"prompt": "..."}}, found {json_type(item)}'
    elif "prompt" not in item:
        message = "a JSON object needs a 'prompt' key"
    elif not isinstance(item["prompt"], str):
        message = f"'prompt' must be a string, found {json_type(item['prompt'])}"
    elif not is_utf8(item["prompt"]):
        message = "'prompt' holds a lone surrogate escape (\\ud800-\\udfff), not UTF-8 text"
    elif not item["prompt"]:
        message = "'prompt' is empty"
    else:
        for key in (k for k in item if k != "prompt"):
            unread.setdefault(key, number)
        return item["prompt"]
    raise click.BadParameter(f"{where}: {message}", param_hint="--input_file")


def _shown(text: str) -> str:
    """``text`` quoted, its undecodable bytes as \\xNN, cut to 40 characters."""
    try:
        shown = text.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no undecodable byte gives
        shown = ascii(text)[1:-1]
    return f"'{shown if len(shown) <= 40 else shown[:37] + '...'}'"


@engine_command("run", "Engine dir (output of kiln build).")
@click.option("--input_text", multiple=True, help="A prompt. Repeatable.")
@click.option("--input_file", type=PathArg(exists=True, dir_okay=False, path_type=Path,
                                           allow_dash=True), multiple=True,
              help="Prompt file: .jsonl = one prompt per line (string or {\"prompt\": ...}); "
                   "any other file = one prompt; - = one prompt from standard input. "
                   "Repeatable.")
@click.option("--max_output_len", default=64, show_default=True, type=IntRange(min=1),
              help="New tokens per prompt at most.")
@click.option("--streaming", is_flag=True,
              help="Print text as it is generated (several prompts: the same blocks, in order; "
                   "each block is printed live once the ones before it are complete).")
@click.option("--chat", is_flag=True, help="Wrap each prompt as a user message in the model's "
                                           "chat template.")
@executor_options
@dp_option
@gpu_options
@sampling_options
@click.pass_obj
def run(obj: CliContext, input_text: tuple[str, ...], input_file: tuple[Path, ...],
        max_output_len: int, streaming: bool, chat: bool, device: str,
        num_threads: int | None, cpu_spin_wait: bool | None, verify_checksums: bool, dp: int,
        kv_cache_free_gpu_memory_fraction: float | None, prefill_attention: str | None,
        **options: Any) -> None:
    """Generate text with an engine; prints the text (stdout), then TTFT, TPOT, tokens/s (stderr)."""
    prompts = read_prompts(input_text, input_file)
    check_sampling_flags(max_output_len, options)
    from kiln.runtime import LLM, ExecutorOptions

    executor = ExecutorOptions(device=device, num_threads=num_threads,
                               cpu_spin_wait=cpu_spin_wait, verify_checksums=verify_checksums,
                               dp=dp,
                               kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
                               prefill_attention=prefill_attention)
    stop_ids = options.get("stop_token_ids") or ()

    def check_build(manifest: EngineManifest, tokenizer_dir: Path) -> None:
        check_manifest(manifest, tokenizer_dir, prompts, chat, stop_ids)

    with held_engine(obj, options, executor, check=check_build) as engine_dir:
        check_engine(engine_dir, prompts, chat, stop_ids)  # --engine_dir, or a cache hit
        with LLM(engine_dir, executor) as llm:
            results = _generate(llm, prompts, max_output_len, streaming, chat, options)
    if obj.verbosity >= 0:
        click.echo(format_stats(results), err=True)
    failed = [r.error for r in results if r.finish_reason == "error"]
    if failed:  # each request's own reason (e.g. non-finite logits); exit 2 like any error
        for error in failed:
            click.echo(f"error: {error}", err=True)
        raise SystemExit(2)


def check_engine(engine_dir: Path, prompts: list[str], chat: bool,
                 stop_ids: Sequence[int]) -> None:
    """:func:`check_manifest` on a built engine's files, before it loads."""
    from kiln.engine import read_manifest

    check_manifest(read_manifest(engine_dir), engine_dir, prompts, chat, stop_ids)


def check_manifest(manifest: EngineManifest, tokenizer_dir: Path, prompts: list[str],
                   chat: bool, stop_ids: Sequence[int]) -> None:
    """The engine's vocabulary takes ``stop_ids``, and it takes the prompts
    (:func:`check_prompts`): before it loads, or before a --model_dir engine is built (on the
    manifest it would have and the tokenizer of its checkpoint)."""
    check_stop_ids(manifest, stop_ids)
    check_prompts(manifest, tokenizer_dir, prompts, chat)


def check_stop_ids(manifest: EngineManifest, stop_ids: Sequence[int]) -> None:
    outside = outside_vocabulary(stop_ids, manifest.decoder.vocab_size)  # the id names it
    if outside is not None:
        raise click.BadParameter(str(outside), param_hint="--stop_token_ids")


def check_prompts(manifest: EngineManifest, tokenizer_dir: Path, prompts: list[str],
                  chat: bool) -> None:
    """What the engine would refuse in the prompts (one that tokenizes to nothing, one past
    ``max_input_len``, an engine without a tokenizer or chat template), said before it loads,
    which on a GPU takes a while, or before it is built: the checks of ``LLM.generate``, on
    ``manifest`` and the tokenizer files in ``tokenizer_dir`` (the engine dir, or the checkpoint
    a --model_dir engine is built from). With ``chat``, a message whose own text tokenizes to
    nothing is refused as an empty prompt (the template's tokens around it never are)."""
    from kiln.runtime.core import check_encoded, check_prompt
    from kiln.runtime.errors import RequestError, TokenizerError
    from kiln.runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    if chat and not tokenizer.chat_template:
        raise TokenizerError(f"--chat: {tokenizer_dir} has no chat template "
                             f"(tokenizer_config.json chat_template or chat_template.jinja); run "
                             f"without --chat, or copy the model's template into that directory")
    for i, prompt in enumerate(prompts):
        label, vocab = f"prompt {i + 1}", manifest.decoder.vocab_size
        ids = tokenizer.chat_ids([{"role": "user", "content": prompt}]) if chat \
            else tokenizer.encode(prompt)
        try:
            check_encoded(ids, vocab)
        except RequestError as e:
            raise RequestError(f"{label}: {e}") from None
        check_prompt(label, ids, manifest.limits, vocab)
        if chat:  # the template's tokens hide an empty message: its own, refused as without
            check_prompt(label, tokenizer.encode(prompt, add_special_tokens=False),
                         manifest.limits, vocab)


def _generate(llm: LLM, prompts: list[str], max_output_len: int, streaming: bool, chat: bool,
              options: dict[str, Any]) -> list[CompletionResult]:
    """The prompts' results, their text printed (streamed, or after each finishes)."""
    log_quantization(llm.manifest)
    params = build_params(llm, max_output_len, options)  # the sampling flags are left
    inputs = [llm.render_chat([{"role": "user", "content": p}]) if chat else p
              for p in prompts]
    warn_if_cut(llm, inputs, max_output_len)
    if streaming:
        return _stream(llm, inputs, params)
    results = llm.generate(inputs, params)
    for i, result in enumerate(results):
        click.echo(_header(i, len(results)) + result.text)
    return results


def warn_if_cut(llm: LLM, inputs: list[Any], max_output_len: int) -> None:
    """WARNING when ``--max_output_len`` is more than the engine's ``max_seq_len`` leaves after
    some prompt (its output stops there, finish 'length', which the stats line alone does not
    explain). Prompts the engine refuses are left to generate() to report."""
    from kiln.runtime.core import output_room

    limits = llm.limits
    try:
        lengths = [len(llm.encode(p)) for p in inputs]
    except KilnError:
        return
    rooms = [output_room(limits, n) for n in lengths if 0 < n <= limits.max_input_len]
    cut = [room for room in rooms if room < max_output_len]
    if not cut:
        return
    after = "the prompt" if len(inputs) == 1 else f"{len(cut)} of {len(inputs)} prompts"
    log.warning("--max_output_len %d is more than the engine's max_seq_len %d leaves after %s: "
                "at most %d new token%s%s (finish 'length'); for more, %s", max_output_len,
                limits.max_seq_len, after, min(cut), "" if min(cut) == 1 else "s",
                "" if len(inputs) == 1 else " after the longest", build_larger("max_seq_len"))


def log_quantization(manifest: EngineManifest | None) -> None:
    """INFO (``-v``): the engine's quantization and the accuracy its checkpoint recorded."""
    quant = manifest.quantization if manifest is not None else None
    if quant is None:
        return
    from kiln.quantization.accuracy import summary

    try:
        accuracy = summary(quant.accuracy) if quant.accuracy else "accuracy not measured"
    except KeyError:  # a record without the gate's figures (an imported checkpoint)
        accuracy = f"accuracy {quant.accuracy}"
    log.info("quantization %s (weights %s, activations %s%s): %s", quant.qformat,
             quant.info.weight_dtype, quant.activation_dtype or "float",
             f", group_size {quant.group_size}" if quant.group_size else "", accuracy)


def _header(index: int, count: int) -> str:
    """``[n]`` before the n-th of several prompts' outputs, counted from 1 as the messages
    count them ("prompt 2: ...")."""
    return f"[{index + 1}]\n" if count > 1 else ""


def _stream(llm: LLM, inputs: list[Any], params: SamplingParams) -> list[CompletionResult]:
    """Print the blocks of the module docstring as text arrives; the results in prompt order.
    Interrupted mid-line, the text printed so far ends with a newline off a terminal, so that
    a pipe or file gets whole lines (on a terminal the CLI's message starts a fresh line)."""
    count = len(inputs)
    held = [""] * count  # text received and not printed yet, per prompt
    results: dict[int, CompletionResult] = {}
    live = 0  # the block printed live; every block before it is complete and printed
    last = "\n"  # the last character printed

    def write(text: str) -> None:
        nonlocal last
        if text:
            sys.stdout.write(text)
            last = text[-1]

    write(_header(0, count))
    try:
        for delta in llm.generate_stream(inputs, params):
            held[delta.index] += delta.text
            if delta.result is not None:
                results[delta.index] = delta.result
            while live < count:
                write(held[live])
                held[live] = ""
                if live not in results:
                    break
                live += 1
                write("\n" + (_header(live, count) if live < count else ""))
            sys.stdout.flush()
    except KeyboardInterrupt:
        if last != "\n" and not sys.stdout.isatty():
            write("\n")
            sys.stdout.flush()
        raise
    return [results[i] for i in range(count)]


def format_stats(results: list[CompletionResult]) -> str:
    """One line: mean TTFT, mean time per output token, output tokens/s over the run; ``-`` for
    a figure that does not exist (no request produced a token, or none produced two)."""
    ttft = [r.timings.ttft_s for r in results if r.timings.ttft_s is not None]
    tpot = [r.timings.tpot_s for r in results if r.timings.tpot_s is not None]
    tokens = sum(len(r.token_ids) for r in results)
    start = min(r.timings.arrival for r in results)
    end = max((r.timings.finished for r in results if r.timings.finished is not None),
              default=start)
    mean = lambda v: f"{sum(v) / len(v) * 1000:.1f} ms" if v else "-"  # noqa: E731
    rate = f"{tokens / (end - start):.1f}" if end > start else "-"
    reasons = ",".join(sorted({str(r.finish_reason) for r in results}))
    return (f"TTFT {mean(ttft)} | time per output token {mean(tpot)} | "
            f"{rate} tokens/s ({tokens} token{'s' if tokens != 1 else ''}, {len(results)} "
            f"request{'s' if len(results) > 1 else ''}, finish: {reasons})")
