"""kiln.testing.english: two disjoint, deterministic sets of English prose, cached as files
that kiln.datasets reads back paragraph by paragraph."""

from __future__ import annotations

import pytest

from kiln.datasets import load_texts
from kiln.testing.english import SETS, english_file, english_paragraphs


def test_sets_are_disjoint_prose_and_read_back(tmp_path):
    calibration, evaluation = (english_paragraphs(name) for name in ("calibration", "evaluation"))
    assert not set(calibration) & set(evaluation)
    for paragraphs in (calibration, evaluation):
        words = sum(len(p.split()) for p in paragraphs)
        assert words > 15_000 and all(p.endswith(".") and "\n" not in p for p in paragraphs)
    path = english_file("evaluation", tmp_path)
    assert path.parent == tmp_path / "english" and path.name.startswith("evaluation-py3.")
    assert load_texts(path).texts == evaluation
    before = path.read_bytes()
    assert english_file("evaluation", tmp_path) == path and path.read_bytes() == before
    assert english_paragraphs("evaluation") == evaluation  # deterministic
    assert set(SETS) == {"calibration", "evaluation"}
    with pytest.raises(ValueError, match="unknown English text set 'wiki'"):
        english_file("wiki", tmp_path)


def test_the_module_tool_into_a_closed_pipe_exits_141_quietly(tmp_path):
    """`python -m kiln.testing.english evaluation | true` had ended in a BrokenPipeError
    traceback, exit 1."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "KILN_CACHE_DIR": str(tmp_path)}
    command = f"{sys.executable} -m kiln.testing.english evaluation | true; " \
              "echo ${PIPESTATUS[0]} >&2"
    # the reader exits before the tool prints: reading the stdlib's docstrings takes seconds
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.stderr.splitlines()[-1] == "141", done.stderr
    assert "Traceback" not in done.stderr
