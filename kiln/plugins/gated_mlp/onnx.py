"""ONNX forms of the gated MLP plugin (see :mod:`.spec`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import FunctionProto, helper

from kiln.graph.emitter import OPSET
from kiln.plugins.gated_mlp.spec import DOMAIN, GatedMlpAttrs

if TYPE_CHECKING:
    from kiln.graph.emitter import GraphEmitter, Projection


def emit(g: GraphEmitter, x: str, gate_up: Projection, b_gate_up: str | None, down: Projection,
         attrs: GatedMlpAttrs, fused: bool) -> str:
    """The gated MLP over projections whose weight side is emitted. The fused form (a function
    of the [in, out] weights) needs float projections (``weight`` set); the builder turns the
    plugin off for quantized checkpoints (their projections are not one MatMul)."""
    if fused:
        if gate_up.weight is None or down.weight is None:
            raise ValueError("the fused gated_mlp form takes float projections; emit a "
                             "quantized MLP with fused=False")
        name = "GatedMLPBias" if b_gate_up else "GatedMLP"
        g.add_function(_function(name, b_gate_up is not None))
        inputs = [x, gate_up.weight] + ([b_gate_up] if b_gate_up else []) + [down.weight]
        return g.op(name, *inputs, domain=DOMAIN)
    return _decomposed(g, x, gate_up, b_gate_up, down, attrs)


def _decomposed(g: GraphEmitter, x: str, gate_up_proj: Projection, b_gate_up: str | None,
                down: Projection, attrs: GatedMlpAttrs) -> str:
    """
    x ─► gate_up ─► (Add b) ─► Split ─► gate ─► Sigmoid ─► Mul gate ─► Mul up ─► down
                                    └─► up ────────────────────────────┘
    """
    gate_up = gate_up_proj(x, "gate_up")
    if b_gate_up:
        gate_up = g.op("Add", gate_up, b_gate_up, name="gate_up_bias")
    i = attrs.intermediate_size
    gate, up = g.op("Split", gate_up, g.int64s(i, i), name="gate_up_split", axis=-1, outputs=2)
    silu = g.op("Mul", gate, g.op("Sigmoid", gate, name="silu"), name="silu")
    return down(g.op("Mul", silu, up, name="gate"), "down")


def _function(name: str, bias: bool) -> FunctionProto:
    """The model-local function: the decomposed ops over its formal inputs."""
    inputs = ["x", "w_gate_up"] + (["b_gate_up"] if bias else []) + ["w_down"]
    matmul_out = "gate_up_raw" if bias else "gate_up"
    nodes = [helper.make_node("MatMul", ["x", "w_gate_up"], [matmul_out])]
    if bias:
        nodes.append(helper.make_node("Add", [matmul_out, "b_gate_up"], ["gate_up"]))
    nodes += [
        helper.make_node("Split", ["gate_up"], ["gate", "up"], axis=-1, num_outputs=2),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["act"]),
        helper.make_node("MatMul", ["act", "w_down"], ["y"]),
    ]
    return helper.make_function(DOMAIN, name, inputs, ["y"], nodes,
                                [helper.make_opsetid("", OPSET)])
