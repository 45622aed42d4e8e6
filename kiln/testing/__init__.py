"""Test helpers: real-model fixtures that need no Hugging Face hub access."""

from __future__ import annotations

import os
import signal
import sys


def print_path(text: object) -> int:
    """Print a module tool's result (``python -m kiln.testing.english evaluation``) and return
    its exit status: 0, or 141 with nothing said when stdout's reader is gone (``| true``; a
    BrokenPipeError traceback before), as kiln's own commands do."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # the interpreter flushes stdout again at exit: point it where that cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return 0
