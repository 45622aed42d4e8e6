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
    """The options every command that loads an engine shares (ExecutorOptions' fields: device,
    threads, spin-wait, checksums)."""
    options = [
        click.option("--device", default="auto", show_default=True,
                     type=click.Choice(("auto", "cpu", "cuda")),
                     help="Where the engine runs. auto: onnx engines on CUDA when ONNX Runtime "
                          "has it, else the CPU; torch engines need a CUDA GPU (cpu runs their "
                          "slow PyTorch reference kernels)."),
        click.option("--num_threads", default=None, type=click.IntRange(min=1),
                     help="CPU threads [default: all cores]."),
        click.option("--cpu_spin_wait/--no_cpu_spin_wait", default=True, show_default=True,
                     help="Let idle CPU threads busy-wait between operators (ONNX Runtime's "
                          "default; turn off on a machine shared with other busy processes)."),
        click.option("--verify_checksums", is_flag=True,
                     help="sha256 the engine files before loading (reads every byte; by default "
                          "only their presence and sizes are checked). See also kiln verify."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
