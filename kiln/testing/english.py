"""Real English prose for tests and benchmarks, from what every Python installation ships.

The text: the docstrings (module, class, function and method docstrings, in source order) of
two fixed lists of pure-Python standard-library modules, read from their source files with
``ast`` (nothing is imported), cleaned to prose paragraphs:

- a docstring is split into paragraphs at blank lines (after ``inspect.cleandoc``);
- a paragraph is kept if none of its lines is indented (code, option tables) or starts with
  ``>>>``/``...`` (doctests), it has at least 12 words, at least 75% of its characters are
  letters or spaces, and it ends with a period; its lines are joined with single spaces;
- a paragraph seen before (in either set) is dropped.

Two disjoint sets, :data:`SETS`: ``calibration`` (argparse, logging, email, ...) and
``evaluation`` (pickle, tarfile, unittest, ...). On Python 3.11: 731 paragraphs, 21,005 words,
29,930 SmolLM2 tokens, and 609 paragraphs, 16,952 words, 24,445 tokens. No paragraph is in
both. :func:`english_file` writes a set once to
``<cache root>/english/<name>-py<major>.<minor>.txt`` (one paragraph per blank-line-separated
block, the form :func:`kiln.datasets.load_texts` reads back paragraph by paragraph; cache root:
:func:`kiln.build_cache.cache_root`), atomically, and returns the path: tests and benchmarks
pass it to ``--dataset`` / ``--calib_dataset``.

Stability: the docstrings are CPython's and change a little between Python versions (3.11,
3.12 and 3.13 differ in a few paragraphs), hence the version in the file name; within one
Python version the text is fixed. A module missing from an installation is skipped with a
warning. ``python -m kiln.testing.english NAME`` prints the file's path.

Non-goals: a balanced corpus (this is technical English about Python), other languages.
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from kiln.build_cache import cache_root
from kiln.testing import print_path

logger = logging.getLogger(__name__)

SETS: dict[str, tuple[str, ...]] = {
    "calibration": (
        "argparse.py", "logging/__init__.py", "logging/handlers.py", "email/message.py",
        "email/utils.py", "configparser.py", "collections/__init__.py", "dataclasses.py",
        "difflib.py", "functools.py", "heapq.py", "http/client.py", "http/server.py",
        "inspect.py", "pathlib.py", "csv.py", "_pydecimal.py", "asyncio/events.py",
        "asyncio/tasks.py",
    ),
    "evaluation": (
        "pickle.py", "shutil.py", "statistics.py", "string.py", "subprocess.py", "tarfile.py",
        "textwrap.py", "threading.py", "typing.py", "unittest/case.py", "urllib/parse.py",
        "zipfile/__init__.py", "zipfile.py", "fractions.py", "random.py", "socket.py", "enum.py",
        "imaplib.py", "smtplib.py", "ftplib.py", "calendar.py", "gettext.py",
    ),
}
_MOVED = {"zipfile.py", "zipfile/__init__.py"}  # zipfile is a package from 3.12: one exists
MIN_WORDS = 12
MIN_LETTERS = 0.75


def english_file(name: str, cache_dir: Path | None = None) -> Path:
    """Path of set ``name``'s text file, written on first use (module docstring)."""
    if name not in SETS:
        raise ValueError(f"unknown English text set {name!r}; choose one of {', '.join(SETS)}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    target = root / "english" / f"{name}-{version}.txt"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(english_paragraphs(name)) + "\n"
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, target)  # concurrent writers write the same bytes
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    logger.info("wrote English text set %s (%d characters) to %s", name, len(text), target)
    return target


def english_paragraphs(name: str) -> tuple[str, ...]:
    """Set ``name``'s paragraphs (without the ones the sets before it hold: disjoint sets)."""
    seen: set[str] = set()
    for other in SETS:
        paragraphs = _unique(_set_paragraphs(other), seen)
        if other == name:
            return paragraphs
    raise ValueError(f"unknown English text set {name!r}; choose one of {', '.join(SETS)}")


def _unique(paragraphs: list[str], seen: set[str]) -> tuple[str, ...]:
    out = []
    for paragraph in paragraphs:
        if paragraph not in seen:
            seen.add(paragraph)
            out.append(paragraph)
    return tuple(out)


def _set_paragraphs(name: str) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for module in SETS[name]:
        path = stdlib / module
        if not path.is_file():
            if module not in _MOVED:
                logger.warning("English text set %s: %s is not in this Python's standard "
                               "library; skipped", name, module)
            continue
        out.extend(_prose(doc) for doc in _docstrings(path))
    return [p for doc in out for p in doc]


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                docs.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return docs


def _prose(doc: str) -> list[str]:
    kept = []
    for block in inspect.cleandoc(doc).split("\n\n"):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or any(line[:1].isspace() or line.lstrip().startswith((">>>", "..."))
                            for line in lines):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        letters = sum(c.isalpha() or c == " " for c in paragraph)
        if len(paragraph.split()) >= MIN_WORDS and letters >= MIN_LETTERS * len(paragraph) \
                and paragraph.endswith("."):
            kept.append(paragraph)
    return kept


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.testing.english NAME``: print the path of set NAME's text file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in SETS:
        print(f"usage: python -m kiln.testing.english {{{','.join(SETS)}}}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return print_path(english_file(args[0]))


if __name__ == "__main__":
    sys.exit(main())
