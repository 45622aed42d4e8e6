"""``kiln run``: generate from an engine dir and print the text, then TTFT, TPOT and tokens/s.

Thin over :class:`kiln.runtime.LLM`. Sampling flags are generated from the fields of
:class:`~kiln.runtime.SamplingParams` (their help included); flags not given keep the engine's
generation_config.json defaults (greedy unless it says ``do_sample``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import click

from kiln.cli.context import CliContext, executor_options
from kiln.runtime import LLM, CompletionResult, ExecutorOptions, SamplingParams

# Fields with their own flag (max_tokens is --max_output_len) or not shown by this command.
_NOT_FLAGS = {"max_tokens", "logprobs"}  # logprobs: the API returns them; run prints text


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


def build_params(llm: LLM, max_output_len: int, given: dict[str, Any]) -> SamplingParams:
    overrides = {k: v for k, v in given.items() if v is not None and v != ()}
    return llm.default_params.replace(max_tokens=max_output_len, **overrides)


def read_prompts(input_text: tuple[str, ...], input_file: Path | None) -> list[str]:
    """Prompts from --input_text (repeatable) and --input_file (.jsonl: one per line; else one)."""
    prompts = list(input_text)
    if input_file is not None:
        text = input_file.read_text()
        if input_file.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    item = json.loads(line)
                    if isinstance(item, dict) and "prompt" not in item:
                        raise click.BadParameter(f"line {n}: a JSON object needs a 'prompt' key",
                                                 param_hint="--input_file")
                    prompts.append(item["prompt"] if isinstance(item, dict) else str(item))
        else:
            prompts.append(text)
    if not prompts:
        raise click.BadParameter("give --input_text or --input_file", param_hint="--input_text")
    return prompts


@click.command("run")
@click.option("--engine_dir", required=True, type=click.Path(path_type=Path),
              help="Engine dir (output of kiln build).")
@click.option("--input_text", multiple=True, help="A prompt. Repeatable.")
@click.option("--input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt file: .jsonl = one prompt per line (string or {\"prompt\": ...}); "
                   "any other file = one prompt.")
@click.option("--max_output_len", default=64, show_default=True, type=click.IntRange(min=1),
              help="New tokens per prompt at most.")
@click.option("--streaming", is_flag=True, help="Print text as it is generated.")
@click.option("--chat", is_flag=True, help="Wrap each prompt as a user message in the model's "
                                           "chat template.")
@executor_options
@sampling_options
@click.pass_obj
def run(obj: CliContext, engine_dir: Path, input_text: tuple[str, ...], input_file: Path | None,
        max_output_len: int, streaming: bool, chat: bool, device: str,
        num_threads: int | None, cpu_spin_wait: bool,
        **sampling: Any) -> None:
    """Generate text with an engine; prints the output, then TTFT, TPOT and tokens/s."""
    prompts = read_prompts(input_text, input_file)
    with LLM(engine_dir, ExecutorOptions(device=device, num_threads=num_threads,
                                         cpu_spin_wait=cpu_spin_wait)) as llm:
        params = build_params(llm, max_output_len, sampling)
        inputs = [llm.render_chat([{"role": "user", "content": p}]) if chat else p
                  for p in prompts]
        if streaming:
            results = _stream(llm, inputs, params, len(prompts) > 1)
        else:
            results = llm.generate(inputs, params)
            for i, result in enumerate(results):
                click.echo(f"[{i}] {result.text}" if len(results) > 1 else result.text)
    click.echo(format_stats(results), err=obj.verbosity < 0)


def _stream(llm: LLM, inputs: list[Any], params: SamplingParams,
            many: bool) -> list[CompletionResult]:
    results: dict[int, CompletionResult] = {}
    for delta in llm.generate_stream(inputs, params):
        text = f"[{delta.index}] {delta.text}\n" if many and delta.text else delta.text
        sys.stdout.write(text)
        sys.stdout.flush()
        if delta.result is not None:
            results[delta.index] = delta.result
    if not many:
        sys.stdout.write("\n")
    return [results[i] for i in range(len(inputs))]


def format_stats(results: list[CompletionResult]) -> str:
    """One line: mean TTFT, mean time per output token, output tokens/s over the run."""
    ttft = [r.timings.ttft_s for r in results if r.timings.ttft_s is not None]
    tpot = [r.timings.tpot_s for r in results if r.timings.tpot_s is not None]
    tokens = sum(len(r.token_ids) for r in results)
    start = min(r.timings.arrival for r in results)
    end = max(r.timings.finished for r in results if r.timings.finished is not None)
    mean = lambda v: sum(v) / len(v) * 1000 if v else float("nan")  # noqa: E731
    reasons = ",".join(sorted({str(r.finish_reason) for r in results}))
    return (f"TTFT {mean(ttft):.1f} ms | time per output token {mean(tpot):.1f} ms | "
            f"{tokens / (end - start):.1f} tokens/s ({tokens} tokens, {len(results)} "
            f"request{'s' if len(results) > 1 else ''}, finish: {reasons})")
