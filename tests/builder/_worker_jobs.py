"""Jobs for tests/builder/test_runner.py, importable by spawned build workers."""

from __future__ import annotations

import os
import time

from tqdm import tqdm


def bar_then_wait() -> None:
    """What a TensorRT part build does first (a live progress bar), then a long build."""
    with open(os.devnull, "w") as sink:
        tqdm(total=1, file=sink).close()
    time.sleep(60)
