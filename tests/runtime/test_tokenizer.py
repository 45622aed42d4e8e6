"""ModelTokenizer on the real SmolLM2 tokenizer: what a server needs of its encoding."""

from __future__ import annotations

import itertools
import threading
import time


def test_encoding_a_long_text_lets_other_threads_run(tokenizer):
    """A server encodes a long prompt in a worker thread so that its event loop goes on; that
    helps only if the encoding lets go of the GIL (the tokenizers library's ``encode`` holds it:
    a 3.6 MB text stopped every other thread for 2.3 s)."""
    text = "The quick brown fox jumps over the lazy dog. " * 20_000  # 900 KB, about 0.5 s
    ids: list[int] = []
    worker = threading.Thread(target=lambda: ids.extend(tokenizer.encode(text)))
    ticks = [time.perf_counter()]
    worker.start()
    while worker.is_alive():  # this thread needs the GIL for every tick
        time.sleep(0.001)
        ticks.append(time.perf_counter())
    took = ticks[-1] - ticks[0]
    longest = max(b - a for a, b in itertools.pairwise(ticks))
    assert longest < took / 2, f"this thread stood still {longest:.3f} s of the {took:.3f} s"
    assert ids == tokenizer.tokenizer.encode(text).ids  # the same ids as encode's
