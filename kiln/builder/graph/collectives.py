"""Tensor-parallel collectives as ``DistCollective`` nodes (see TENSORRT_NOTES.md).

TensorRT's parser turns ``DistCollective`` (1 input, 1 output; lowercase string attributes
``collective_operation``, ``reduce_op``; ``root=-1``, ``group_size=0``, ``nb_rank=tp``) into a
DIST_COLLECTIVE layer; the engine all-reduces through the NCCL communicator the runtime sets.
ONNX Runtime has no such op, so the graph carries a model-local function of the same name
whose body is Identity: each rank's graph runs, computing its own partial values. Checking
numerics of a tp > 1 graph therefore means running the ranks segment by segment and doing the
collectives outside (tests do this), or checking the tp = 1 graph.

``all_gather`` concatenates the ranks' tensors along axis 0 (NCCL's layout:
rank r's block at rows ``[r * n, (r + 1) * n)``).
"""

from __future__ import annotations

from onnx import FunctionProto, helper

from kiln.graph.emitter import OPSET, GraphEmitter

DOMAIN = "trt"
OP = "DistCollective"
ATTRIBUTES = ("collective_operation", "reduce_op", "root", "group_size", "nb_rank")


def _function() -> FunctionProto:
    return helper.make_function(DOMAIN, OP, ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                                [helper.make_opsetid("", OPSET)], attributes=list(ATTRIBUTES))


def _collective(g: GraphEmitter, x: str, tp: int, operation: str, reduce_op: str,
                name: str) -> str:
    g.add_function(_function())
    return g.op(OP, x, name=name, domain=DOMAIN, collective_operation=operation,
                reduce_op=reduce_op, root=-1, group_size=0, nb_rank=tp)


def all_reduce(g: GraphEmitter, x: str, tp: int) -> str:
    """Sum over the tp ranks (after a row-parallel MatMul)."""
    return _collective(g, x, tp, "all_reduce", "sum", "all_reduce")


def all_gather(g: GraphEmitter, x: str, tp: int) -> str:
    """Concatenate the tp ranks' tensors along axis 0."""
    return _collective(g, x, tp, "all_gather", "none", "all_gather")
