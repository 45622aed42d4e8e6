"""The ``kiln`` command: a click group whose subcommands parse, validate and call the Python API.

Errors a user can cause (:class:`~kiln.errors.KilnError`, click's own usage errors) print one
line and exit with status 2; ``--debug`` adds the traceback.

Start-up stays light: subcommands other than convert_checkpoint are registered lazily (module,
short help) and imported only when invoked or their help is asked, so ``kiln --help`` and usage
errors never import torch, onnx or onnxruntime (tests/cli/test_main.py checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import click

import kiln
from kiln.cli import _interrupted_at_start
from kiln.cli.context import CliContext, IntRange, PathArg
from kiln.config import DTYPES
from kiln.converters.options import ConvertOptions
from kiln.errors import KilnError, options_as_flags
from kiln.interrupts import (
    TERMINATING,
    Terminated,
    catchable,
    exit_code,
    install_termination_signals,
    interrupt_in,
    signal_name,
)


def _traceback_if_debug(ctx: click.Context) -> None:
    """--debug: the exception being handled, as a traceback on stderr (the exit status and the
    one-line message stay as without it)."""
    if ctx.obj is not None and ctx.obj.debug:
        traceback.print_exc()


# kiln's own options (before the command); given after it, the error says where they go
GLOBAL_OPTIONS = ("-v", "--verbose", "-vv", "-q", "--quiet", "--debug")


def _readers_gone() -> list[int]:
    """The file descriptors of stdout and stderr that are pipes whose reader has closed them
    (poll reports an error on them); a broken pipe elsewhere (a worker's) stays an error."""
    gone = []
    for stream in (sys.stdout, sys.stderr):
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
            if any(events & select.POLLERR for _, events in poller.poll(0)):
                gone.append(stream.fileno())
        except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture)
            continue
    return gone


def _quiet(descriptors: list[int]) -> None:
    """Point the gone streams at /dev/null: the interpreter flushes them again at exit."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in descriptors:
        os.dup2(null, fd)


class KilnGroup(click.Group):
    """A group that turns KilnError, a subcommand's usage error and an OSError (disk full,
    permissions) into a one-line message (exit 2) unless --debug, and Ctrl-C / SIGTERM / SIGHUP
    into one line and exit 130 / 143 / 129 (click's own handler would exit 1)."""

    def main(self, *args, **kwargs):
        if sys.stdout is None:  # `kiln run ... >&-` (or `kiln --help >&-`)
            # Python's stdout is None then, and click drops what is echoed: the text was lost,
            # exit 0. Checked before parsing, which prints --help and exits
            click.echo("error: standard output is closed (>&-), so kiln's output would be "
                       "lost; send it to a file or to /dev/null", err=True)
            sys.exit(2)
        try:
            return super().main(*args, **kwargs)
        except SystemExit as e:
            # click exits 1 when stdout's reader went away while it printed (`kiln --help |
            # true`); a command's own output exits 141 then (invoke below): the same for both
            if e.code == 1 and (gone := _readers_gone()):
                _quiet(gone)
                raise SystemExit(128 + signal.SIGPIPE) from None
            raise
        except BrokenPipeError:
            # click writes a usage error of kiln's own (`kiln --bogus`; `kiln` alone: its
            # help) after its handlers, so stderr's reader gone raises out of it: quiet too
            # (https://docs.python.org/3/library/signal.html#note-on-sigpipe)
            if gone := _readers_gone():
                _quiet(gone)
                raise SystemExit(128 + signal.SIGPIPE) from None
            raise

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:  # `kiln` alone: its help
            raise
        except click.UsageError as e:  # kiln's own options (`kiln --bogus`): one line, as a
            # command's (trial 38: click's usage block of three)
            hint, message = "see kiln --help", e.format_message()
            if isinstance(e, click.NoSuchOption) and (others := self._having(ctx, e.option_name)):
                # a command's option before the command (trial 39's kiln --temperature 0 run),
                # shown after the command given where that one takes it (a retest)
                given = {a.replace("-", "_") for a in args}
                after = next((c for c in others if c.split()[1] in given), others[0])
                hint = f"{e.option_name} is an option of {_listed(others)}: it goes after the " \
                       f"command, {after} {e.option_name} ..."
                message = e.message  # without click's guesses at kiln's own
            click.echo(f"error: {_one_line(message)} ({hint})", err=True)
            ctx.exit(2)

    def invoke(self, ctx: click.Context):
        install_termination_signals()
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is _interrupted_at_start:
            # Ctrl-C raises KeyboardInterrupt from here on (kiln.cli's start-up handler exited)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with options_as_flags():  # the API's messages name --dp, not dp (kiln.errors.option)
                return super().invoke(ctx)
        except KilnError as e:
            _traceback_if_debug(ctx)
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except click.exceptions.NoArgsIsHelpError as e:  # `kiln cache`: its help, as `kiln`
            click.echo(e.format_message(), err=True)
            ctx.exit(2)
        except click.UsageError as e:  # a subcommand's bad flag or value: one line too
            command = e.ctx.command_path if e.ctx is not None else "kiln"
            hint, message = f"see {command} --help", e.format_message()
            if isinstance(e, click.NoSuchOption) and e.option_name in GLOBAL_OPTIONS \
                    and e.ctx is not None and e.ctx.parent is not None:
                root, _, rest = command.partition(" ")
                hint = (f"{e.option_name} is kiln's own option: it goes before the command, "
                        f"{root} {e.option_name} {rest} ...")
            elif isinstance(e, click.NoSuchOption) \
                    and (others := self._having(ctx, e.option_name)):
                # trial C's kiln eval --gather_context_logits (a build option) had been told
                # "No such option" alone
                hint = (f"{e.option_name} is an option of {_listed(others)}, not of "
                        f"{command}; see {command} --help")
                message = e.message  # without click's guesses at this command's (they misled)
            click.echo(f"error: {_one_line(message)} ({hint})", err=True)
            ctx.exit(2)
        except OSError as e:  # the machine refused: disk full, permissions, a read-only mount
            if isinstance(e, BrokenPipeError) and (gone := _readers_gone()):
                # `kiln run ... | head` (or stderr's reader gone): stop quietly, as a tool
                # killed by SIGPIPE does
                _quiet(gone)
                ctx.exit(128 + signal.SIGPIPE)
            _traceback_if_debug(ctx)
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}; nothing was left half-written",
                       err=True)
            ctx.exit(2)
        except KeyboardInterrupt as e:
            _stop(ctx, e)
        except Exception as e:  # a library's own error for a Ctrl-C it caught (an import's)
            interrupt = interrupt_in(e)
            if interrupt is None:
                raise
            _stop(ctx, interrupt)

    def _having(self, ctx: click.Context, option: str) -> list[str]:
        """The kiln commands that take ``option`` ("kiln build", "kiln cache list"); each
        command's module is imported (an error's path only)."""
        found = []

        def visit(command: click.Command | None, path: str) -> None:
            if isinstance(command, click.Group):
                for name in command.list_commands(ctx):
                    visit(command.get_command(ctx, name), f"{path} {name}")
            elif command is not None and any(option in p.opts for p in command.params):
                found.append(path)
        visit(self, "kiln")
        return found

    def resolve_command(self, ctx, args):
        # Accept dashes for underscores (convert-checkpoint == convert_checkpoint).
        if args and args[0].replace("-", "_") in self.commands:
            args = [args[0].replace("-", "_"), *args[1:]]
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            _check_arguments(click.Context(command, info_name=name, parent=ctx), rest)
        return name, command, rest

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if isinstance(command, LazyCommand):  # resolved: import it, from now on the real one
            heavy, command = command.heavy, command.load()
            if heavy:
                command.invoke = _heavy_imports_first(command.invoke)
            self.add_command(command, name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own lists get_command(name) of each, which would import every subcommand.
        commands = [(n, c) for n, c in sorted(self.commands.items()) if not c.hidden]
        if commands:
            limit = formatter.width - 6 - max(len(n) for n, _ in commands)
            with formatter.section("Commands"):
                formatter.write_dl([(n, c.get_short_help_str(limit)) for n, c in commands])


def _check_arguments(ctx: click.Context, args: list[str]) -> None:
    """Check a command's arguments before click parses them. A word that is no option's
    value, given to a command without arguments, is named. An option that takes one value,
    given twice, is refused (click keeps the last silently: a trial's ``--engine_dir a ...
    --engine_dir b`` ran b); repeatable options and flags pass.
    A group's command (``kiln cache prune``) is checked as the group names it."""
    if isinstance(ctx.command, click.Group):
        if args and not args[0].startswith("-"):
            command = ctx.command.get_command(ctx, args[0])
            if command is not None:
                _check_arguments(click.Context(command, info_name=args[0], parent=ctx),
                                  args[1:])
        return
    options = {name: param for param in ctx.command.params if isinstance(param, click.Option)
               for name in (*param.opts, *param.secondary_opts)}
    takes_arguments = any(isinstance(p, click.Argument) for p in ctx.command.params)
    seen: dict[str, list[str]] = {}
    flags: dict[str, dict[str, None]] = {}
    last: tuple[str, str, int] | None = None
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        name, eq, value = token.partition("=")
        param = options.get(name) if token.startswith("-") else None
        if token.startswith("-") and param is None:
            return  # click names an unknown option (and the one meant); its value is no stray
        i += 1
        if not token.startswith("-") and not takes_arguments:
            # click would first name a required option as missing (`kiln cache build
            # models/x`: "Missing option '--model_dir'"), not what was given instead
            words = [token]
            for word in args[i:]:  # the rest of an unquoted value: up to the next option
                if word.startswith("-"):
                    break
                words.append(word)
            hint = f"quote a value with spaces, as {last[0]} '{last[1]} {' '.join(words)}'" \
                if last is not None and last[2] == i - 1 else \
                "each value goes after its option's name"
            if "--input_text" in options and not any(
                    a.partition("=")[0] in ("--input_text", "--input_file") for a in args):
                # `kiln run --engine_dir E hi`: far likelier a prompt than a path with a space
                hint = f"the prompt goes after --input_text: --input_text '{' '.join(words)}'; " \
                    f"or {hint}"
            raise click.UsageError(f"unexpected argument {token!r}: {ctx.command_path} takes "
                                   f"options only ({hint})", ctx)
        last = None
        if param is not None and param.is_flag and param.secondary_opts:
            flags.setdefault(param.name, {})[name] = None  # the forms given, in order
        if param is None or param.is_flag or param.count or param.nargs != 1:
            continue
        if not eq:
            if i == len(args):  # click's parser names it without the command (`see kiln
                # --help`): named here, with it
                raise click.BadOptionUsage(name, f"Option {name!r} requires an argument.", ctx)
            _refuse_an_option_as_value(ctx, name, args[i], options)
            value, i = args[i], i + 1
        last = (name, value, i)  # the option, its value, the index after them
        if not param.multiple:
            seen.setdefault(param.opts[-1], []).append(value)
    for forms in flags.values():  # click kept the last of `--engine_process
        # --no_engine_process` silently (trial C)
        if len(forms) > 1:
            first, second = forms
            raise click.UsageError(f"{first} and {second} contradict each other; give one",
                                   ctx)
    for name, values in seen.items():
        if len(values) > 1:
            times = "twice" if len(values) == 2 else f"{len(values)} times"
            raise click.UsageError(f"{name} is given {times} "
                                   f"({', then '.join(map(repr, values))}); give it once", ctx)


def _refuse_an_option_as_value(ctx: click.Context, name: str, word: str,
                               options: dict[str, click.Option]) -> None:
    """Refuse ``word``, the next argument after the option ``name`` (given without ``=``), as
    its value where it is an option of the command, or looks like a long option (``--``, then
    a letter) or a short one (``-``, then a letter, one word) that the command has not: trial
    37's `--max_output_len --input_text hi` took "--input_text" as the number, `--input_text
    --chat` generated for the prompt "--chat", a misspelled `--input_text --chta` for "--chta",
    and a trial's `kiln build ... --output_dir -o` built into a directory named "-o".
    Negative numbers (``-3``, ``-0.5``, ``-inf``) pass, to their option's own check, as do
    values with a space after a dash (argparse's rule, a prompt "-x y"); the ``=`` form passes
    anything."""
    how = f"to give it as the value, write {name}={word}"
    if word.partition("=")[0] in options or word in ctx.help_option_names:
        what = f"{word} is an option of {ctx.command_path}"
    elif word[:2] == "--" and word[2:3].isalpha() or _looks_like_a_short_option(word):
        what = f"{word} looks like an option, but {ctx.command_path} has no such option" \
            if word.partition("=")[0] not in GLOBAL_OPTIONS else \
            f"{word} is kiln's own option, which goes before the command"
    else:
        return
    raise click.BadOptionUsage(name, f"Option {name!r} requires an argument: {what} ({how})",
                               ctx)


def _one_line(message: str) -> str:
    """click's message on one line: a required choice left out lists its choices one a line
    (a retest's kiln quantize without --qformat printed six lines)."""
    return " ".join(message.split())


def _listed(commands: list[str]) -> str:
    """["kiln bench", "kiln build", "kiln run"] -> "kiln bench, build and run"."""
    names = [c.removeprefix("kiln ") for c in commands]
    return "kiln " + " and ".join([", ".join(names[:-1]), names[-1]] if names[:-1] else names)


def _looks_like_a_short_option(word: str) -> bool:
    """``-`` and a letter, one word, not a number (``-o``, ``-vv``, ``-ofile``; not ``-3``,
    ``-inf``, ``-x y``)."""
    if word[:1] != "-" or not word[1:2].isalpha() or any(c.isspace() for c in word):
        return False
    try:
        float(word)
    except ValueError:
        return True
    return False


def _stop(ctx: click.Context, interrupt: KeyboardInterrupt) -> NoReturn:
    # on a terminal, streamed text or a progress bar may have left the cursor mid-line
    fresh = "\n" if sys.stderr.isatty() else ""
    click.echo(f"{fresh}interrupted ({signal_name(interrupt)})", err=True)
    global _interrupted
    _interrupted = True
    code = exit_code(interrupt)
    # What was written is cleaned up and said; from here to the exit (milliseconds, see run())
    # another signal ends the process at once, silently: a retest's second Ctrl-C 0.1 s after
    # the first had raised in logging.shutdown() (a traceback, exit -2) or in a tqdm __del__.
    # Only in the console command, which exits next: main() called from Python (click's test
    # runner, a script) returns to a process that goes on, whose later Ctrl-C this would end.
    if _console and threading.current_thread() is threading.main_thread():
        def exit_now(signum: int, frame: Any) -> None:
            _flush_standard_streams()  # (a write it interrupted is refused, not waited for)
            os._exit(code)

        for number in catchable((signal.SIGINT, *TERMINATING)):
            signal.signal(number, exit_now)
    ctx.exit(code)


def _heavy_imports_first(invoke: Callable[[click.Context], Any]) -> Callable[[click.Context], Any]:
    """Run a command after importing torch (and numpy), a signal meanwhile ending the process
    at once (:func:`_exit_now`): nothing has been written yet. A KeyboardInterrupt inside those
    imports had left numpy half-initialised (later AttributeErrors, a second import refused, or
    the interrupt lost: a new-user trial, Ctrl-C 0.25-0.35 s into ``kiln run``), and deferring
    it to the import's end had taken up to 1.5 s on a loaded 2-core machine (another trial).
    Parsing, ``--help`` and usage errors come first, so they still import nothing heavy."""

    def invoke_after_imports(ctx: click.Context) -> Any:
        with _signals_exit_now():
            import torch  # noqa: F401
        return invoke(ctx)

    return invoke_after_imports


def _exit_now(signum: int, frame: Any) -> None:
    """A signal handler for where nothing is left to clean up: one line, then exit 130 / 143 /
    129 without the interpreter's teardown."""
    interrupt = KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)
    with contextlib.suppress(OSError):  # os.write: no buffered writer to re-enter here
        os.write(2, f"interrupted ({signal_name(interrupt)})\n".encode())
    os._exit(exit_code(interrupt))


@contextlib.contextmanager
def _signals_exit_now() -> Iterator[None]:
    """:func:`_exit_now` handles SIGINT, SIGTERM and SIGHUP in the body (those not ignored:
    :func:`~kiln.interrupts.catchable`), the handlers before it restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are delivered to the main thread only
        return
    previous = {s: signal.signal(s, _exit_now) for s in catchable((signal.SIGINT, *TERMINATING))}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class LazyCommand(click.Command):
    """A subcommand known by name and short help until it is resolved; then the module that
    defines it (as a module attribute of the same name) is imported. A command that is not
    ``heavy`` (``kiln cache``: listing and pruning need no torch) is run without importing
    torch first; its own parts that need it import it (kiln.cli.cache)."""

    def __init__(self, name: str, module: str, short_help: str, heavy: bool = True) -> None:
        super().__init__(name, help=short_help)  # help, not short_help: truncated like the real
        self.module = module
        self.heavy = heavy

    def load(self) -> click.Command:
        return getattr(importlib.import_module(self.module), self.name)


@click.group(cls=KilnGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kiln.__version__, prog_name="kiln")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug logs).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """kiln: compile Hugging Face LLM checkpoints into engines, and run them."""
    if quiet and verbose:  # a trial's `kiln -q -v run`: -q had won silently
        raise click.UsageError("-q (only errors) and -v (more logging) contradict each other; "
                               "give one", ctx)
    verbosity = -1 if quiet else verbose
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = CliContext(debug=debug, verbosity=verbosity)


def _convert_option(name: str) -> dict:
    """Default and help of a ConvertOptions field (the API takes the same options)."""
    field = next(f for f in dataclasses.fields(ConvertOptions) if f.name == name)
    return {"default": field.default, "help": field.metadata["help"]}


@main.command("convert_checkpoint")
@click.option("--model_dir", required=True,
              help="HF checkpoint: a local directory or a hub id (org/name).")
@click.option("--output_dir", required=True, type=PathArg(file_okay=False),
              help="Where to write the kiln checkpoint (must not exist unless --overwrite).")
@click.option("--revision", **_convert_option("revision"))
@click.option("--dtype", type=click.Choice(("auto", *DTYPES)), show_default=True,
              **_convert_option("dtype"))
@click.option("--tp_size", type=IntRange(min=1), show_default=True,
              **_convert_option("tp_size"))
@click.option("--pp_size", type=IntRange(min=1), show_default=True,
              **_convert_option("pp_size"))
@click.option("--overwrite", is_flag=True, **_convert_option("overwrite"))
@click.option("--allow-pickle", "--allow_pickle", "allow_pickle", is_flag=True,
              **_convert_option("allow_pickle"))
@click.pass_obj
def convert_checkpoint(obj: CliContext, **options) -> None:
    """Convert a Hugging Face checkpoint into a sharded kiln checkpoint."""
    out = kiln.convert_checkpoint(**options, progress=obj.progress)
    click.echo(str(out))


# as the lazy commands' (KilnGroup.resolve_command): a Ctrl-C 0.27-0.5 s in had been lost (the
# checkpoint written, exit 0) or ended in a traceback of numpy's import, in a retest trial
convert_checkpoint.invoke = _heavy_imports_first(convert_checkpoint.invoke)


def _register_subcommands() -> None:
    # name, module defining the click command of that name, its short help (a test keeps each
    # equal to the command's own).
    for name, module, short_help in (
            ("build", "kiln.cli.build", "Build an engine dir from a kiln checkpoint."),
            ("run", "kiln.cli.run", "Generate text with an engine; prints the text (stdout), "
                                    "then TTFT, TPOT, tokens/s (stderr)."),
            ("bench", "kiln.cli.bench", "Benchmark an engine with a synthetic workload (in the "
                                        "manner of trtllm-bench)."),
            ("verify", "kiln.cli.verify", "Check an engine dir against its manifest: files, "
                                          "sizes and checksums of every rank."),
            ("quantize", "kiln.cli.quantize", "Quantize a kiln checkpoint (fp8, int8_sq, "
                                              "int8_wo, int4_wo, int4_awq), with calibration "
                                              "and an accuracy gate."),
            ("serve", "kiln.cli.serve", "Serve an engine over HTTP with the OpenAI API "
                                        "(completions, chat, streaming)."),
            ("eval", "kiln.cli.eval", "Perplexity of an engine on a text dataset (sliding "
                                      "windows, as Hugging Face's).")):
        main.add_command(LazyCommand(name, module, short_help))
    main.add_command(LazyCommand("cache", "kiln.cli.cache", "The build cache of engines made "
                                 "from Hugging Face checkpoints: list, prune, build.",
                                 heavy=False))
    main.add_command(LazyCommand("bench_serve", "kiln.cli.bench_serve", "Benchmark a running "
                                 "OpenAI-compatible server (in the manner of vllm bench serve).",
                                 heavy=False))  # an HTTP client: no torch, no engine


_register_subcommands()


# Set when a command ends on a signal: the console entry point then skips the interpreter's
# teardown (see run()).
_interrupted = False
_console = False  # run() is the process's command (kiln's console entry point), not a call


def run(args: list[str] | None = None) -> None:
    """``kiln`` (the console entry point; ``args``: the command line's). A command that ends
    on a signal has removed what it was writing and said so by the time it exits; the
    interpreter's teardown of torch, ONNX Runtime and the objects a
    build or run left (0.5-1 s on 2 cores, measured at Ctrl-C during ``kiln run --model_dir``'s
    build) would then push the exit past the second a Ctrl-C may take, so the process exits at
    once, after flushing the logs and standard streams. Other threads (a prefetching reader,
    a hashing pool) end with it instead of being waited for."""
    global _console
    _console = True
    try:
        main(args, prog_name="kiln")
    except SystemExit as e:
        if not _interrupted:
            _signals_end_the_teardown()
            raise
        logging.shutdown()
        _flush_standard_streams()
        os._exit(e.code if isinstance(e.code, int) else 1)


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()


def _signals_end_the_teardown() -> None:
    """The command is done: a Ctrl-C, SIGTERM or SIGHUP from now on, in the interpreter's
    teardown (torch's and ONNX Runtime's exit hooks), ends the process at once as one in the
    middle of a command does: one line and 130 / 143 / 129 (a trial's Ctrl-C right after
    ``kiln cache build`` printed its engine had shown a traceback from an exit hook, exit 0).
    What the command wrote is flushed first, so nothing is lost."""
    _flush_standard_streams()
    if threading.current_thread() is threading.main_thread():
        for number in catchable((signal.SIGINT, *TERMINATING)):
            signal.signal(number, _exit_now)


if __name__ == "__main__":  # pragma: no cover
    run()
