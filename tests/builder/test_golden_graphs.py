"""Golden graphs: the node list of one tiny model's graph per backend/plugin combination.

Each ``golden/<combo>.txt`` holds the raw graph kiln emits (before ONNX Runtime optimizes
it: that step is ONNX Runtime's) as text: the resolved plugins, opset imports, graph inputs and
outputs (type, shape), one line per node (``[domain:]op_type name``) and the op types of each
model-local function. No weights or constants. A change to the emitted graph shows up in
review as a diff of these files.

Regenerate after an intended change, and review the diff::

    KILN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/builder/test_golden_graphs.py
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from kiln.builder.api import make_plan
from kiln.builder.graph.context import RankWeights
from kiln.builder.graph.decoder import emit_part
from kiln.builder.options import BuildOptions
from kiln.builder.plan import plan_rank
from kiln.checkpoint import load_config, rank_file
from kiln.graph.emitter import MemorySink
from kiln.plugins import PLUGINS
from tests.builder.conftest import LIMITS

GOLDEN = Path(__file__).with_name("golden")
UPDATE = os.environ.get("KILN_UPDATE_GOLDEN") == "1"

# combo -> (variant, build options). tensorrt: the graph its backend parses (build_part ->
# emit_part with a MemorySink), for the target and precision of the tensorrt tests.
COMBOS = {
    "onnx-cpu-default-llama-gqa": ("llama-gqa", dict(backend="onnx", targets=("cpu",))),
    "onnx-cpu-plugins-disabled-llama-gqa": (
        "llama-gqa", dict(backend="onnx", targets=("cpu",),
                          plugins=dict.fromkeys(PLUGINS, "disable"))),
    "tensorrt-sm86-float16-default-llama-gqa": (
        "llama-gqa", dict(backend="tensorrt", targets=("sm86",), dtype="float16")),
    "onnx-cpu-default-falcon-rw-alibi": ("falcon-rw-alibi",
                                         dict(backend="onnx", targets=("cpu",))),
}


@dataclass(frozen=True)
class NamedBackend:
    """The graph depends on the backend only through its name (the plugins' choice), so the
    plan is made without loading the backend's library (targets are given: no defaults)."""

    name: str


def emit_graphs(ckpt: Path, options: dict) -> tuple[dict[str, bool], list[onnx.ModelProto]]:
    """The resolved plugins and every part's raw graph, as ``kiln build`` would emit them."""
    config = load_config(ckpt)
    opts = BuildOptions(checkpoint_dir=ckpt, output_dir=ckpt.parent / "unused", **LIMITS,
                        **options)
    plan = make_plan(opts, config, NamedBackend(opts.backend))
    models = []
    for rank in range(config.mapping.world_size):
        weights = RankWeights(ckpt / rank_file(rank), plan.dtype)
        for part in plan_rank(config, rank, weights, None, 1.0, 0):
            models.append(emit_part(plan.graph, part, weights, MemorySink()))
    return plan.graph.plugins, models


def describe(combo: str, plugins: dict[str, bool], models: list[onnx.ModelProto]) -> str:
    variant, options = COMBOS[combo]
    lines = [f"# {combo}: {variant}, {options}",
             "# regenerate: KILN_UPDATE_GOLDEN=1 pytest tests/builder/test_golden_graphs.py",
             "plugins " + " ".join(f"{k}={'on' if v else 'off'}" for k, v in sorted(plugins.items()))]
    for model in models:
        graph = model.graph
        lines.append(f"graph {graph.name}")
        lines.append("opset " + " ".join(f"{o.domain or 'ai.onnx'}:{o.version}"
                                         for o in model.opset_import))
        lines += [f"input {v.name} {_type(v)}" for v in graph.input]
        lines += [f"output {v.name} {_type(v)}" for v in graph.output]
        lines += [f"{_op(node)} {node.name}" for node in graph.node]
        for function in model.functions:
            lines.append(f"function {function.domain}:{function.name} "
                         f"({', '.join(function.input)}) -> ({', '.join(function.output)})")
            lines += [f"  {_op(node)}" for node in function.node]
    return "\n".join(lines) + "\n"


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _type(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in tensor.shape.dim]
    return f"{onnx.TensorProto.DataType.Name(tensor.elem_type).lower()} [{', '.join(dims)}]"


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_graph_matches_golden(checkpoint, combo):
    variant, options = COMBOS[combo]
    ckpt = checkpoint(variant)
    text = describe(combo, *emit_graphs(ckpt, options))
    assert describe(combo, *emit_graphs(ckpt, options)) == text, "the graph is not deterministic"
    path = GOLDEN / f"{combo}.txt"
    if UPDATE:
        path.write_text(text)
        return
    if not path.is_file():
        pytest.fail(f"{path} is missing; generate it with KILN_UPDATE_GOLDEN=1")
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True),
                                            text.splitlines(keepends=True),
                                            f"golden/{combo}.txt", "emitted"))
        pytest.fail(f"the emitted graph differs from {path.name} (if intended, regenerate "
                    f"with KILN_UPDATE_GOLDEN=1 and review the diff):\n{diff}", pytrace=False)


def test_golden_files_match_the_combos():
    """No stale golden file is left behind when a combo is renamed or removed."""
    assert sorted(p.stem for p in GOLDEN.glob("*.txt")) == sorted(COMBOS)
