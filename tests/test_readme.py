"""README.md's code blocks run as written, and print what the README says they print.

Conventions in README.md's source (also described in its "README test" section):

- A ```` ```bash ```` or ```` ```python ```` block runs. All of them run in document order in one
  empty working directory, so later blocks use what earlier ones wrote (the main job's
  ``models/``, ``ckpt/`` and ``engines/``). ``kiln`` and ``python`` resolve to this interpreter's
  environment (its bin directory first on ``PATH``).
  - bash: command by command (backslash continuations joined, comment lines skipped), each with
    ``bash -c``; each must exit 0.
  - python: the whole block as one script, run with this interpreter; it must exit 0 (a claim
    about a value is written as an ``assert`` in the block).
- A ```` ```text ```` block right after a run block (only blank lines between) is the output of
  that block's last command: stdout and stderr as one stream, as on a terminal. Line by line,
  decimal numbers (timings such as ``92.6``) match any number and ``...`` any text (a cache
  path, an age); the rest, integers included, must match exactly.
- The blocks run with ``KILN_CACHE_DIR`` set to an empty build cache inside the working
  directory, so the main job's first ``kiln run --model_dir`` builds and says so, whatever the
  user's cache holds, and nothing is written into it. The shared SmolLM2 checkpoint is linked
  into that cache's ``fixtures/``, so ``python -m kiln.testing.smollm2`` finds it built.
- ``<!-- not run: REASON -->`` on the line right before a block's opening fence: the block is
  illustrative (needs a GPU, the hub, minutes; a synopsis with ``[optional]`` flags) and is
  skipped. The reason is required.

``test_every_block_runs_or_says_why_not`` checks the conventions (instant);
``test_readme_blocks_run`` runs the blocks on the real SmolLM2 (CPU; about a minute, most of it
converting and building twice: through the build cache and step by step). The SmolLM2 HF
checkpoint comes from the kiln cache shared with the other real-model tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUN_LANGUAGES = ("bash", "python")
FENCE = re.compile(r"^```(\S*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->\s*$")
DECIMAL = re.compile(r"\d+\.\d+")
ANY = "..."
TIMEOUT_S = 600
CACHE = "kiln-cache"  # the blocks' KILN_CACHE_DIR, inside their working directory


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the reason, when marked
    follows_block: bool  # only blank lines between the previous block's closing fence and this

    def where(self) -> str:
        return f"README.md line {self.line} (```{self.language})"


def parse(text: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a markdown text, and the problems found (stray or empty markers)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    marker: tuple[int, str] | None = None  # (line index, reason) of the previous line's marker
    last_close: int | None = None
    i = 0
    while i < len(lines):
        opening, not_run = FENCE.match(lines[i]), NOT_RUN.match(lines[i])
        if marker and not opening:
            problems.append(f"README.md line {marker[0] + 1}: 'not run' marker not right "
                            f"before a code block")
            marker = None
        if not_run:
            if not not_run.group(1):
                problems.append(f"README.md line {i + 1}: 'not run' marker without a reason")
            marker = (i, not_run.group(1))
        elif opening:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                problems.append(f"README.md line {i + 1}: unclosed code block")
                break
            follows = last_close is not None and not "".join(lines[last_close + 1:i]).strip()
            blocks.append(Block(i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n",
                                marker[1] if marker else None, follows))
            marker, last_close, i = None, end, end
        i += 1
    if marker:
        problems.append(f"README.md line {marker[0] + 1}: 'not run' marker at the end")
    return blocks, problems


def classify(blocks: list[Block]) -> list[tuple[Block, str]]:
    """(block, 'run' | 'output' | 'skip' | problem message) for each block."""
    out: list[tuple[Block, str]] = []
    for block in blocks:
        previous = out[-1][1] if out else None
        if block.not_run is not None:
            kind = "skip"
        elif block.language in RUN_LANGUAGES:
            kind = "run"
        elif block.language == "text" and block.follows_block and previous == "run":
            kind = "output"
        else:
            kind = (f"{block.where()} neither runs nor carries <!-- not run: REASON --> "
                    f"(run: {', '.join(RUN_LANGUAGES)}; text only right after a run block)")
        out.append((block, kind))
    return out


def commands(code: str) -> list[str]:
    """The commands of a bash block: continuations joined, blank and comment lines skipped."""
    joined = code.replace("\\\n", " ")
    return [c.strip() for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]


def matches(expected: str, actual: str) -> bool:
    """Line by line; in ``expected``, a decimal number stands for any decimal number and
    ``...`` for any text."""
    exp, act = expected.rstrip("\n").splitlines(), actual.rstrip("\n").splitlines()
    patterns = [".*".join(r"\d+\.\d+".join(re.escape(part) for part in DECIMAL.split(text))
                          for text in line.split(ANY))
                for line in exp]
    return len(exp) == len(act) and all(re.fullmatch(p, a) for p, a in zip(patterns, act, strict=True))


def test_every_block_runs_or_says_why_not():
    blocks, problems = parse(README.read_text())
    kinds = classify(blocks)
    problems += [kind for _, kind in kinds if kind not in ("run", "output", "skip")]
    assert not problems, "\n".join(problems)
    ran = {b.language for b, kind in kinds if kind == "run"}
    assert ran == set(RUN_LANGUAGES) and any(kind == "output" for _, kind in kinds)


def test_the_conventions_on_a_small_text():
    text = ("```bash\necho 1.5 \\\n  done  # x\n# a comment\n```\n\n```text\n2.25 done\n```\n"
            "<!-- not run: needs a GPU -->\n```bash\nmake test-gpu\n```\n"
            "```json\n{}\n```\n<!-- not run: -->\ntext\n<!-- not run: x -->\n\n```bash\n```\n")
    blocks, problems = parse(text)
    kinds = [kind for _, kind in classify(blocks)]
    assert kinds[:3] == ["run", "output", "skip"] and "```json" in kinds[3]
    assert commands(blocks[0].code) == ["echo 1.5    done  # x"]
    assert blocks[2].not_run == "needs a GPU"
    assert len(problems) == 3 and "without a reason" in problems[0]
    assert "not right before" in problems[1] and "not right before" in problems[2]
    assert blocks[4].not_run is None
    assert matches("TTFT 92.6 ms (8 tokens)\n", "TTFT 1234.0 ms (8 tokens)\n")
    assert not matches("TTFT 92.6 ms (8 tokens)\n", "TTFT 92.6 ms (9 tokens)\n")
    assert not matches("a\n", "a\nb\n")
    assert matches("cached engine ... (built ... ago)\n", "cached engine /a/b (built 3 s ago)\n")
    assert not matches("cached engine ... (built ... ago)\n", "cached engine /a/b (built)\n")
    assert not matches("a ... b\n", "a x c\n") and matches("(a.b)\n", "(a.b)\n")


def test_the_readme_awaits_async_llm_s_coroutines_and_only_those():
    """A trial's README had `engine.abort(request_id)` in a comment: AsyncLLM.abort is a
    coroutine, so called so nothing was aborted; and `await engine.close()` is a TypeError."""
    import inspect

    from kiln.runtime import AsyncLLM

    text = README.read_text()
    for name, method in inspect.getmembers(AsyncLLM, inspect.isfunction):
        for call in re.finditer(rf"(await )?engine\.{name}\(", text):
            awaited = call.group(1) is not None
            line = text.count("\n", 0, call.start()) + 1
            assert awaited == inspect.iscoroutinefunction(method), \
                f"README.md:{line}: {call.group(0)}: " + \
                ("awaited, and not a coroutine" if awaited else "a coroutine, not awaited")


@pytest.fixture
def workdir(tmp_path):
    """An empty working directory, removed afterwards (the job leaves ~1.8 GB there)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def _run(args: list[str], cwd: Path, where: str) -> str:
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                 os.environ.get("PATH", "")]),
               KILN_CACHE_DIR=str(cwd / CACHE))
    proc = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{args[-1]}\n{proc.stdout}"
    return proc.stdout


@pytest.mark.slow
def test_readme_blocks_run(workdir):
    from kiln.testing.smollm2 import smollm2_hf_dir

    hf_dir = smollm2_hf_dir()  # build the shared cache under its lock first (a no-op when cached)
    linked = workdir / CACHE / hf_dir.relative_to(hf_dir.parents[1])  # fixtures/<name>
    linked.parent.mkdir(parents=True)
    linked.symlink_to(hf_dir, target_is_directory=True)
    last_output, last_command = "", ""
    for block, kind in classify(parse(README.read_text())[0]):
        if kind == "run" and block.language == "bash":
            for command in commands(block.code):
                last_output, last_command = _run(["bash", "-c", command], workdir,
                                                 block.where()), command
        elif kind == "run":
            script = workdir / f"readme_line{block.line}.py"
            script.write_text(block.code)
            last_output = _run([sys.executable, script.name], workdir, block.where())
            last_command = script.name
        elif kind == "output":
            assert matches(block.code, last_output), (
                f"{block.where()}: `{last_command}` printed\n{last_output}\n"
                f"README says\n{block.code}")
