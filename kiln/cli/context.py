"""The object every kiln subcommand receives through ``@click.pass_obj``."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class CliContext:
    debug: bool
    verbosity: int  # -1 quiet, 0 default, 1+ verbose

    @property
    def progress(self) -> bool:
        """Show progress bars: not under --quiet, and only on a terminal."""
        return self.verbosity >= 0 and sys.stderr.isatty()
