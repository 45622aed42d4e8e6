"""The object every kiln subcommand receives through ``@click.pass_obj``."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click


@dataclass
class CliContext:
    debug: bool
    verbosity: int  # -1 quiet, 0 default, 1+ verbose

    @property
    def progress(self) -> bool:
        """Show progress bars: not under --quiet, and only on a terminal."""
        return self.verbosity >= 0 and sys.stderr.isatty()


def executor_options(func):
    """The options every command that loads an engine shares (device, threads, spin-wait)."""
    options = [
        click.option("--device", default="auto", show_default=True,
                     type=click.Choice(("auto", "cpu", "cuda")),
                     help="Where the onnx backend runs."),
        click.option("--num_threads", default=None, type=click.IntRange(min=1),
                     help="CPU threads [default: all cores]."),
        click.option("--cpu_spin_wait/--no_cpu_spin_wait", default=True, show_default=True,
                     help="Let idle CPU threads busy-wait between operators (ONNX Runtime's "
                          "default; turn off on a machine shared with other busy processes)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
