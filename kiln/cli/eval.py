"""``kiln eval``: sliding-window perplexity of an engine on a text dataset (kiln.evaluation).

Prints ``perplexity <value>`` (stdout) and a summary line (tokens, windows, seconds, tokens/s;
stderr); ``--json_output`` writes :meth:`kiln.evaluation.PerplexityResult.to_dict` atomically,
with the same rules as ``kiln bench --json_output`` (never over a file kiln did not write,
never into the engine dir). ``--model_dir`` builds its engine with ``--gather_context_logits``
(kiln/cli/engine_source.py). Imports stay light (``kiln eval --help`` must not load torch).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from kiln.cli.bench import _check_json_output, is_report, write_report
from kiln.cli.context import CliContext, IntRange, PathArg, executor_options, gpu_options
from kiln.cli.engine_source import engine_command, held_engine
from kiln.errors import counted


@engine_command("eval", "Engine dir built with --gather_context_logits (--model_dir builds "
                        "with it).", exclude=("gather_context_logits",))
@click.option("--dataset", required=True, type=PathArg(),
              help="A .txt (paragraphs), .jsonl or .parquet file ('text'), a directory, or a "
                   "hub dataset id owner/name[:glob] (kiln.datasets).")
@click.option("--max_length", type=IntRange(min=2),
              help="Tokens per window [default: the engine's max_input_len].")
@click.option("--stride", type=IntRange(min=1),
              help="Tokens between window starts [default: max_length // 2].")
@click.option("--json_output", type=PathArg(dir_okay=False, path_type=Path), default=None,
              help="Also write the result as JSON here (-: standard output).")
@executor_options
@gpu_options
@click.pass_obj
def eval_command(obj: CliContext, dataset: str, max_length: int | None,
                 stride: int | None, json_output: Path | None, device: str,
                 num_threads: int | None, cpu_spin_wait: bool | None, verify_checksums: bool,
                 kv_cache_free_gpu_memory_fraction: float | None, prefill_attention: str | None,
                 **source: Any) -> None:
    """Perplexity of an engine on a text dataset (sliding windows, as Hugging Face's)."""
    from kiln.datasets import load_texts
    from kiln.evaluation import check_window, evaluate
    from kiln.runtime.loader import ExecutorOptions

    if stride is not None and max_length is not None:  # before a --model_dir build
        check_window(max_length, stride)
    to_stdout = json_output is not None and str(json_output) == "-"
    if to_stdout:
        json_output = None
    if json_output is not None and source["engine_dir"] is None:  # before a build
        _check_json_output(json_output, None, _is_eval_report, "kiln eval report",
                           model_dir=source["model_dir"])
    options = ExecutorOptions(device=device, num_threads=num_threads, cpu_spin_wait=cpu_spin_wait,
                              verify_checksums=verify_checksums,
                              kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
                              prefill_attention=prefill_attention)
    texts = load_texts(dataset)  # before a build (--model_dir): a bad dataset is refused first
    from kiln.evaluation import resolve_window, text_tokens

    tokens: dict[str, list[int]] = {}  # the build copies the tokenizer: tokenized once

    def check(manifest: Any, tokenizer_dir: Path) -> None:  # before a --model_dir build
        from kiln.runtime.tokenizer import load_tokenizer

        resolve_window(manifest.limits.max_input_len, max_length, stride)
        # a text too short to score is refused before the build
        tokens["ids"] = text_tokens(load_tokenizer(tokenizer_dir), texts)

    with held_engine(obj, source, options, check=check, gather_context_logits=True) \
            as engine_dir:
        if json_output is not None:
            _check_json_output(json_output, engine_dir, _is_eval_report, "kiln eval report")
        result = evaluate(engine_dir, texts, max_length, stride, options,
                          progress=obj.progress, token_ids=tokens.get("ids"))
    click.echo(f"perplexity {result.perplexity:.6f}", err=to_stdout)  # '-': stdout is JSON
    sys.stdout.flush()  # before the stderr summary, also when both go to one pipe
    if obj.verbosity >= 0:
        rate = "-" if result.tokens_per_s is None else f"{result.tokens_per_s:.1f}"
        click.echo(f"{counted(result.tokens, 'token')} in {counted(result.windows, 'window')} "
                   f"(max_length {result.max_length}, "
                   f"stride {result.stride}), {result.seconds:.1f} s, {rate} tokens/s", err=True)
    if to_stdout:
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    if json_output is not None:
        write_report(json_output, json.dumps(result.to_dict(), allow_nan=False))
        if obj.verbosity >= 0:
            click.echo(f"wrote {json_output}", err=True)


eval = eval_command  # noqa: A001 - the lazy loader reads the attribute named like the command


def _is_eval_report(path: Path) -> bool:
    """An eval report as kiln writes it: exactly its keys."""
    from kiln.evaluation import PerplexityResult

    return is_report(path, {f.name for f in dataclasses.fields(PerplexityResult)}
                     | {"tokens_per_s"})
