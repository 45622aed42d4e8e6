"""Test helper: run built rank graphs with ONNX Runtime over steps of chunks (docs/engine.md).

:class:`StepRunner` keeps contiguous per-slot KV caches per tensor-parallel rank and layer,
right-pads each step's chunks into ``[B, S]`` rows (padding tokens 0, their positions continue
``start + j``), feeds every graph the inputs it declares, chains graphs in order
(``hidden_out`` -> ``hidden_in``) and returns the float32 logits of each chunk's last token.

Tensor parallelism: ONNX Runtime has no collective op (the graph's ``DistCollective`` is a
function with an Identity body), so a tp group runs through :class:`TpGroup`: each rank's
graph is cut at its collectives into segments; segment k runs on every rank, the collective
is done here exactly as NCCL does it (all_reduce: sum; all_gather: concatenate on axis 0),
and its result feeds segment k + 1 of every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from kiln.config import DecoderConfig, Mapping

NP_DTYPES = {"float32": np.float32, "float16": np.float16}
Chunk = tuple[int, Sequence[int], int]  # (slot, tokens, start)


def session(model: str | Path | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    # ONNX Runtime rewrites DequantizeLinear(int4 blocks) -> MatMul (the tensorrt form) into
    # MatMulNBits that quantizes its input to int8 (accuracy level 4) by default: keep the
    # graph's float activations, as TensorRT does.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    # int8 activations stay int8, as in kiln's sessions (onnx_executor.session_options): ONNX
    # Runtime's uint8 rewrite saturates on CPUs without VNNI
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class Single:
    """One rank's graph (tp 1)."""

    def __init__(self, path: Path):
        self.sess = session(path)
        self.inputs = {i.name for i in self.sess.get_inputs()}
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        (f,) = feeds
        out = self.sess.run(None, {k: v for k, v in f.items() if k in self.inputs})
        return [dict(zip(self.output_names, out, strict=True))]


class TpGroup:
    """The tp ranks' graphs of one chain position, run in lockstep (module docstring)."""

    def __init__(self, paths: Sequence[Path], elem_type: int):
        self.ranks = [_Segmented(onnx.load(str(p)), elem_type) for p in paths]

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        values = [dict(f) for f in feeds]
        for k, (operation, _, out) in enumerate(self.ranks[0].collectives):
            parts = [r.segments[k].run(v) for r, v in zip(self.ranks, values, strict=True)]
            if operation == "all_reduce":
                result = np.sum(np.stack([p[0] for p in parts]), axis=0).astype(parts[0][0].dtype)
            else:
                result = np.concatenate([p[0] for p in parts], axis=0)
            for v in values:
                v[out] = result
        return [dict(zip(r.output_names, r.segments[-1].run(v), strict=True))
                for r, v in zip(self.ranks, values, strict=True)]


class _Segment:
    def __init__(self, model: onnx.ModelProto, inputs: set[str], outputs: list[str],
                 elem_type: int):
        graph = model.graph
        producers = {o: n for n in graph.node for o in n.output}
        needed, stack = set(), list(outputs)
        while stack:
            name = stack.pop()
            node = producers.get(name)
            if name in inputs or node is None or id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
        nodes = [n for n in graph.node if id(n) in needed]
        used = {i for n in nodes for i in n.input} | set(outputs)
        types = {v.name: v for v in [*graph.input, *graph.output]}

        def info(name: str) -> onnx.ValueInfoProto:  # collective values carry the model dtype
            return types.get(name) or helper.make_tensor_value_info(name, elem_type, None)

        sub = helper.make_graph(nodes, "segment", [info(n) for n in sorted(inputs & used)],
                                [info(o) for o in outputs],
                                [t for t in graph.initializer if t.name in used])
        sub_model = helper.make_model(sub, opset_imports=list(model.opset_import),
                                      functions=list(model.functions), ir_version=model.ir_version)
        self.sess = session(sub_model.SerializeToString())
        self.inputs = {i.name for i in self.sess.get_inputs()}

    def run(self, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None, {k: v for k, v in values.items() if k in self.inputs})


class _Segmented:
    """A rank graph cut at its DistCollective nodes."""

    def __init__(self, model: onnx.ModelProto, elem_type: int):
        graph = model.graph
        self.output_names = [o.name for o in graph.output]
        self.collectives = []
        for node in graph.node:
            if node.op_type == "DistCollective":
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                self.collectives.append((attrs["collective_operation"].decode(), node.input[0],
                                         node.output[0]))
        known = {i.name for i in graph.input}
        self.segments = []
        for _, inp, out in self.collectives:
            self.segments.append(_Segment(model, set(known), [inp], elem_type))
            known.add(out)
        self.segments.append(_Segment(model, known, self.output_names, elem_type))


class StepRunner:
    """Steps of chunks through a chain of graph groups (see the module docstring).

    ``chain[k]`` lists the graphs of chain position k, one per tp rank (pipeline stages and
    a rank's parts in order). ``gqa``: the graphs use GroupQueryAttention, which takes decodes,
    prompts from position 0, and a continued prefill in separate runs (kiln/plugins/gqa); a
    step then runs as one run per such group.
    """

    def __init__(self, chain: Sequence[Sequence[Path]], decoder: DecoderConfig, mapping: Mapping,
                 dtype: str, max_slots: int, max_seq_len: int, gqa: bool = False):
        self.gqa = gqa
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(NP_DTYPES[dtype]))
        self.groups = [Single(g[0]) if len(g) == 1 else TpGroup(g, elem) for g in chain]
        self.tp = mapping.tp_size
        shape = (max_slots, mapping.local_kv_heads(decoder), max_seq_len, decoder.head_dim)
        self.caches = [{f"past_{kind}_{i}": np.zeros(shape, NP_DTYPES[dtype])
                        for i in range(decoder.num_layers) for kind in ("key", "value")}
                       for _ in range(self.tp)]

    def step(self, chunks: Sequence[Chunk]) -> np.ndarray:
        """float32 logits [len(chunks), vocab] of each chunk's last token."""
        if not self.gqa:
            return self._run(chunks)
        decodes = [b for b, c in enumerate(chunks) if len(c[1]) == 1]
        prompts = [b for b, c in enumerate(chunks) if len(c[1]) > 1 and c[2] == 0]
        groups = [g for g in (decodes, prompts) if g] + \
            [[b] for b, c in enumerate(chunks) if len(c[1]) > 1 and c[2] > 0]
        out = [None] * len(chunks)
        for group in groups:
            for b, logits in zip(group, self._run([chunks[b] for b in group]), strict=True):
                out[b] = logits
        return np.stack(out)

    def _run(self, chunks: Sequence[Chunk]) -> np.ndarray:
        slots = [c[0] for c in chunks]
        width = max(len(c[1]) for c in chunks)
        ids = np.zeros((len(chunks), width), np.int64)
        for b, (_, tokens, _) in enumerate(chunks):
            ids[b, :len(tokens)] = tokens
        starts = np.array([c[2] for c in chunks], np.int64)
        common = {"position_ids": starts[:, None] + np.arange(width, dtype=np.int64)[None],
                  "past_len": starts,
                  "last_index": np.array([len(c[1]) - 1 for c in chunks], np.int64)}
        x = {"input_ids": ids}
        for group in self.groups:
            feeds = [{**common, **x, **{k: v[slots] for k, v in cache.items()}}
                     for cache in self.caches]
            outs = group.run(feeds)
            for cache, out in zip(self.caches, outs, strict=True):
                for name, value in out.items():
                    if name.startswith("present_"):
                        cache[name.replace("present_", "past_")][slots] = value
            x = {"hidden_in": outs[0]["hidden_out"]} if "hidden_out" in outs[0] else {}
        logits = outs[0]["logits"]
        assert all(np.array_equal(o["logits"], logits) for o in outs), "tp ranks disagree"
        return logits
