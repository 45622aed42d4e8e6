"""Which kiln packages may import which (docs: ARCHITECTURE.md, "Contracts between stages").

Arrows point down the pipeline only: the builder imports the plugins, the plugins import the
graph emitter (``kiln/graph/``), and nothing below imports back up. Checked on the source
with :mod:`ast`, so lazy imports inside functions and ``TYPE_CHECKING`` blocks count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KILN = Path(__file__).resolve().parents[1] / "kiln"


def imported_modules(path: Path, root: Path = KILN) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative ones resolved."""
    package = ".".join(path.parent.relative_to(root.parent).parts)  # what "." means here
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found += [(node.lineno, base)]
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(package: str, forbidden: str, root: Path = KILN) -> list[str]:
    """``file:line imports module`` for every import of ``forbidden`` (or below) in
    ``kiln/<package>/**``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        for line, module in imported_modules(path, root):
            if module == forbidden or module.startswith(forbidden + "."):
                where = f"{path.relative_to(root.parent)}:{line}"
                out[where] = min(out.get(where, module), module, key=len)  # one per import
    return [f"{where} imports {module}" for where, module in out.items()]


@pytest.mark.parametrize("package", ["plugins", "graph"])
def test_plugins_and_emitter_never_import_the_builder(package):
    assert violations(package, "kiln.builder") == []


def test_emitter_never_imports_the_plugins():
    assert violations("graph", "kiln.plugins") == []


def test_runtime_never_imports_the_builder():
    assert violations("runtime", "kiln.builder") == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "kiln" / "plugins" / "demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from ...builder import graph\n")
    (pkg / "onnx.py").write_text("def f():\n    import kiln.builder.graph.decoder\n")
    (pkg / "spec.py").write_text("from kiln import builder\nfrom kiln import graph\n")
    assert violations("plugins", "kiln.builder", tmp_path / "kiln") == [
        "kiln/plugins/demo/__init__.py:1 imports kiln.builder",
        "kiln/plugins/demo/onnx.py:2 imports kiln.builder.graph.decoder",
        "kiln/plugins/demo/spec.py:1 imports kiln.builder",
    ]
