"""The object every kiln subcommand receives through ``@click.pass_obj``, and the options and
parameter types several commands share."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import click

from kiln.dirs import unknown_home, unusable_path
from kiln.sizes import parse_size


@dataclass
class CliContext:
    debug: bool
    verbosity: int  # -1 quiet, 0 default, 1+ verbose

    @property
    def progress(self) -> bool:
        """Show progress, but not under --quiet: a bar on a terminal, a line every 30 s in a
        log (:mod:`kiln.progress`)."""
        return self.verbosity >= 0


def executor_options(func):
    """The options every command that loads an engine shares: ExecutorOptions' fields, their
    defaults and help (kiln.runtime.options, torch-free)."""
    from kiln.runtime.options import DEVICES, ExecutorOptions

    fields = {f.name: f for f in dataclasses.fields(ExecutorOptions)}

    def kw(name: str) -> dict:
        return {"default": fields[name].default, "help": fields[name].metadata["help"]}

    options = [
        click.option("--device", type=click.Choice(DEVICES), show_default=True, **kw("device")),
        click.option("--num_threads", type=IntRange(min=1), **kw("num_threads")),
        click.option("--cpu_spin_wait/--no_cpu_spin_wait", **kw("cpu_spin_wait")),
        click.option("--verify_checksums", is_flag=True, **kw("verify_checksums")),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class PathArg(click.Path):
    """click.Path that refuses an empty value (click would read "" as the current directory)
    and, where a file is asked for, a directory: one that exists, or a path ending with ``/``
    (``Path`` drops the slash: ``--json_output reports/`` had written a file named reports);
    and ``-`` for a directory (the dash names standard input or output: ``--output_dir -``
    had built into a directory named "-"; ``./-`` names one). Where click would refuse a
    path, in its own words ("Directory 'f' is a file.", "... is not readable."), or let one
    through that the OS refuses (a symbolic link loop, a name too long:
    :func:`kiln.dirs.unusable_path`) or that names an unknown user's home (``~nouser/x``),
    one line in kiln's."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail(f"{value!r} is an empty path; give a path", param, ctx)
        if not self.file_okay and value == "-":
            self.fail("'-' names standard input or output, not a directory; give the "
                      "directory's path (./- for one named '-')", param, ctx)
        if isinstance(value, str) and value != "-":
            path = os.path.expanduser(value)
            if (problem := unknown_home(value) or unusable_path(Path(path))) is not None:
                self.fail(f"{value!r} {problem}; give another path", param, ctx)
            if not self.file_okay and os.path.isfile(path):
                self.fail(f"{value!r} is a file; give a directory's path, not a file's", param,
                          ctx)
            if self.readable and os.path.exists(path) and not os.access(path, os.R_OK):
                self.fail(f"{value!r} cannot be read (permission denied); give one you can "
                          f"read", param, ctx)
            norm = os.path.normpath(path)
            if self.file_okay and self.dir_okay and not os.path.exists(path) \
                    and os.path.isfile(norm):
                # 'f.txt/' or 'f.txt/.': pathlib drops them (a retest's --dataset english.txt/
                # had read the file, where --input_file refused it and cat says "Not a directory")
                self.fail(f"{value!r} treats {norm!r} as a directory (a '/' after it), and it "
                          f"is a file; give a directory, or the file's path {norm!r}", param, ctx)
            if not self.dir_okay:
                if value.endswith(("/", os.sep)):
                    self.fail(f"{value!r} ends with '/', so it names a directory; give a "
                              f"file's path, not a directory's", param, ctx)
                if os.path.isdir(path):
                    self.fail(f"{value!r} is a directory; give a file's path, not a "
                              f"directory's", param, ctx)
        return super().convert(value, param, ctx)


def dp_option(func):
    """``--dp N``: data-parallel replicas (ExecutorOptions.dp; kiln run, bench and serve)."""
    from kiln.runtime.options import ExecutorOptions

    field = next(f for f in dataclasses.fields(ExecutorOptions) if f.name == "dp")
    return click.option("--dp", type=IntRange(min=1), default=field.default,
                        show_default=True, help=field.metadata["help"])(func)


def gpu_options(func):
    """The torch backend's GPU options of ExecutorOptions (kiln run, bench, serve, eval):
    ``--kv_cache_free_gpu_memory_fraction`` and ``--prefill_attention``; None where not given
    (an engine they do nothing for says so at load)."""
    from kiln.runtime.options import PREFILL_ATTENTION, ExecutorOptions

    fields = {f.name: f for f in dataclasses.fields(ExecutorOptions)}
    func = click.option("--prefill_attention", type=click.Choice(PREFILL_ATTENTION),
                        default=None, help=fields["prefill_attention"].metadata["help"])(func)
    name = "kv_cache_free_gpu_memory_fraction"
    return click.option(f"--{name}", type=FloatRange(min=0, max=1, min_open=True),
                        default=None, help=fields[name].metadata["help"])(func)


class IntRange(click.IntRange):
    """click's IntRange, whose bad value reads "'abc' is not a valid integer" (click's own
    "is not a valid integer range" reads as if a range were expected)."""

    name = "integer"


class FloatRange(click.FloatRange):
    """click's FloatRange, named "number" in its message (as :class:`IntRange`), and refusing
    NaN, which every bound's comparison lets through."""

    name = "number"

    def __init__(self, *args, as_typed: bool = False, **kwargs):
        """``as_typed``: the text as typed once it reads as a number, for an option whose API
        keyword checks its own range, so that the refusal shows it (``--stall_timeout 0``,
        not ``0.0``); as :class:`MemorySize`'s."""
        super().__init__(*args, **kwargs)
        self.as_typed = as_typed

    def _describe_range(self) -> str:
        # as_typed: no bounds of click's (the keyword's check tells its own range in the help)
        return "" if self.as_typed else super()._describe_range()

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if self.as_typed:
            return value if isinstance(value, str) else number
        if number != number:
            self.fail(f"nan is not in the range {self._describe_range()}.", param, ctx)
        return number


class MemorySize(click.ParamType):
    """A byte count: 20GB, 20G, 512MiB, 1.5e9 or plain bytes (:func:`kiln.sizes.parse_size`,
    which the Python API's size keywords use too). ``as_typed``: for an option whose API
    keyword takes the same strings and knows its minimum (``--max_build_memory``), the text as
    typed once its form is checked, so that the API's refusal shows it (``--max_build_memory
    1KB is 1000 bytes``, not ``1000 is 1000 bytes``) and tells that minimum for 0 too."""

    name = "size"

    def __init__(self, as_typed: bool = False):
        self.as_typed = as_typed

    def convert(self, value, param, ctx) -> int | str:
        try:
            size = parse_size(value, least=None if self.as_typed else 1)
        except ValueError as e:
            self.fail(f"{value!r} {e}", param, ctx)
        return value if self.as_typed and isinstance(value, str) else size


# An API key travels in the Authorization header, which clients send as ASCII (httpx encodes
# header values so; a key of other characters had crashed kiln serve when its app encoded it,
# and a newline bench_serve's request)
NOT_HEADER = "only ASCII letters, digits, punctuation and inner spaces"


def header_text(text: str) -> bool:
    """Whether ``text`` can be an HTTP header's value as clients send one: printable ASCII."""
    return all(" " <= c <= "~" for c in text)


def given_by(ctx: click.Context, param: click.Parameter) -> str:
    """Where an option's value came from, as a message names it: its flag (``--api_key``), or
    the environment variable click read it from (``KILN_API_KEY``)."""
    if ctx.get_parameter_source(param.name) is click.core.ParameterSource.COMMANDLINE:
        return f"--{param.name}"
    return str(param.envvar)
