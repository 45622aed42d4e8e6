"""``kiln bench_serve``: a serving benchmark against a running OpenAI-compatible server (see
kiln.serve.bench), in the manner of ``vllm bench serve``.

Prints a table per request rate (TTFT, time per output token, inter-token latency and
end-to-end latency as mean/p50/p90/p99; output tokens/s; requests/s) and writes the same
report as JSON. Where requests failed, a last line on stderr says how many of how many and
the first error, and the exit status is 1 (the figures, of the completed requests, are printed
and written first). Imports here stay light; the client (aiohttp) is imported in the command
body.
"""

from __future__ import annotations

from pathlib import Path

import click

from kiln.cli.bench import _check_json_output, is_report, write_report
from kiln.cli.context import (
    NOT_HEADER,
    CliContext,
    IntRange,
    PathArg,
    given_by,
    header_text,
)
from kiln.errors import KilnError
from kiln.runtime.params import SEED_MAX, SEED_MIN  # torch-free: --help stays fast


class RatesType(click.ParamType):
    name = "RATES"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return _client().parse_rates(value)
        except ValueError as e:
            self.fail(f"{e} (give rates per second, comma-separated, e.g. 1,4,inf)", param, ctx)


class ServeUrlType(click.ParamType):
    name = "URL"

    def convert(self, value, param, ctx):
        why = _client().url_error(value)
        if why is not None:  # refused before any connection, as the URL it is
            self.fail(f"{why}; give the running server's http://HOST:PORT", param, ctx)
        return value


def _is_serve_report(path: Path) -> bool:
    return is_report(path, {"kind", "url", "model", "workload", "rates"})


@click.command("bench_serve")
@click.option("--serve", "url", required=True, metavar="URL", type=ServeUrlType(),
              help="The running server's base URL (e.g. http://127.0.0.1:8000).")
@click.option("--model", default=None,
              help="The model name to send [default: the first /v1/models lists].")
@click.option("--api_key", envvar="KILN_API_KEY", default=None, show_envvar=True,
              callback=lambda c, p, v: _sendable(c, p, v),
              help="Sent as 'Authorization: Bearer KEY'.")
@click.option("--request_rates", default="inf", show_default=True, type=RatesType(),
              help="Poisson arrival rates (requests/s) to run, comma-separated; inf: all "
                   "sent at once.")
@click.option("--num_requests", default=16, show_default=True, type=IntRange(min=1),
              help="Requests per rate.")
@click.option("--input_len", default=128, show_default=True, type=IntRange(min=1),
              help="Prompt tokens per request (random ids).")
@click.option("--output_len", default=128, show_default=True, type=IntRange(min=1),
              help="Generated tokens per request (ignore_eos).")
@click.option("--max_concurrency", default=None, type=IntRange(min=1),
              help="Requests in flight at most [default: no limit].")
@click.option("--vocab_size", default=10000, show_default=True, type=IntRange(min=1),
              help="Prompt token ids are drawn from [0, N) (within any real vocabulary).")
@click.option("--warmup", default=1, show_default=True, type=IntRange(min=0),
              help="Unmeasured rounds first, each as many requests as run at once.")
@click.option("--seed", default=0, show_default=True, type=IntRange(SEED_MIN, SEED_MAX),
              help="Seed of prompts and arrivals, in [-2**63, 2**64 - 1] as kiln bench's; a "
                   "negative one is its two's complement (-1 is 2**64 - 1).")
@click.option("--json_output", type=PathArg(dir_okay=False, path_type=Path), default=None,
              help="Write the report as JSON here (-: standard output, the table then on "
                   "stderr) [default: print it after the table].")
@click.pass_obj
def bench_serve(obj: CliContext, url: str, model: str | None, api_key: str | None,
                warmup: int, json_output: Path | None, **workload: object) -> None:
    """Benchmark a running OpenAI-compatible server (in the manner of vllm bench serve)."""
    bench = _client()
    json_only = json_output is not None and str(json_output) == "-"
    if json_only:  # standard output holds the JSON alone; the table goes to stderr
        json_output = None
    if json_output is not None:
        _check_json_output(json_output, None, _is_serve_report, "kiln bench_serve report")
    spec = bench.ServeWorkload(**workload)
    report = bench.run_serve_benchmark(url, spec, model, api_key, warmup)
    click.echo(report.table(), err=json_only)
    if json_output is not None:
        write_report(json_output, report.to_json())
        if obj.verbosity >= 0:
            click.echo(f"wrote {json_output}", err=True)
    else:
        click.echo(report.to_json())
    failures = report.failures()
    if failures is not None:  # the figures are out; a benchmark with failed requests is no pass
        click.echo(f"error: {failures}", err=True)
        raise SystemExit(1)


def _client():
    """kiln.serve.bench, or one line naming the extra it needs (its HTTP client, aiohttp)."""
    try:
        import kiln.serve.bench as bench
    except ImportError as e:
        raise KilnError(f"kiln bench_serve needs the serve extra ({e.name} is missing): "
                        f"pip install 'kiln-llm[serve]'") from None
    return bench


def _sendable(ctx: click.Context, param: click.Parameter, key: str | None) -> str | None:
    """A key that cannot travel in a header is refused, naming where it came from (a newline
    had been aiohttp's traceback, "Forbidden control character detected in headers")."""
    if key is None or header_text(key):
        return key
    source = given_by(ctx, param)
    raise click.BadParameter(f"the API key given by {source} has a character an HTTP header "
                             f"cannot carry ({NOT_HEADER}); give the server's key", param=param)
