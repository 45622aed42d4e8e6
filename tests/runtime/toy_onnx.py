"""A toy engine dir whose graph follows docs/engine.md's I/O contract exactly, for testing the
onnx executor without the builder: per layer, token + position embeddings, GQA-free attention
over a TensorScatter-updated cache with an explicit position mask, a residual; the head gathers
``last_index`` and projects to the vocabulary. Small random weights; optionally split into
two parts chained through ``hidden_out`` -> ``hidden_in``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import kiln
from kiln.config import DecoderConfig, Mapping
from kiln.engine import BuildLimits, EngineManifest, sha256_file
from kiln.hashing import DIGEST_KEY, manifest_digest

HEADS, HEAD_DIM = 2, 8
HIDDEN = HEADS * HEAD_DIM


def _part(first: bool, last: bool, layers: list[int], vocab: int, smax: int,
          rng: np.random.Generator) -> onnx.ModelProto:
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    inputs = [helper.make_tensor_value_info("position_ids", T.INT64, ["B", "S"]),
              helper.make_tensor_value_info("past_len", T.INT64, ["B"])]
    outputs = []
    if first:
        inputs.insert(0, helper.make_tensor_value_info("input_ids", T.INT64, ["B", "S"]))
        x = node("Gather", [const("embed", rng.normal(0, 1, (vocab, HIDDEN)).astype(np.float32)),
                            "input_ids"], "x_embed")
    else:
        inputs.insert(0, helper.make_tensor_value_info("hidden_in", T.FLOAT, ["B", "S", HIDDEN]))
        x = "hidden_in"
    if last:
        inputs.append(helper.make_tensor_value_info("last_index", T.INT64, ["B"]))
    kpos = const("kpos", np.arange(smax, dtype=np.int64).reshape(1, 1, 1, smax))
    qpos = node("Unsqueeze", ["position_ids", const("ax13", np.array([1, 3]))], "qpos")
    mask = node("LessOrEqual", [kpos, qpos], "mask")  # [B, 1, S, Smax]
    heads = const("heads_shape", np.array([0, 0, HEADS, HEAD_DIM]))
    merge = const("merge_shape", np.array([0, 0, HIDDEN]))
    for i in layers:
        pos = node("Gather", [const(f"pos_{i}", rng.normal(0, 1, (smax, HIDDEN)).astype(np.float32)),
                              "position_ids"], f"pos_emb_{i}")
        x = node("Add", [x, pos], f"x_pos_{i}")
        proj = {}
        for name in "qkv":
            w = const(f"w{name}_{i}", rng.normal(0, 0.5, (HIDDEN, HIDDEN)).astype(np.float32))
            y = node("Reshape", [node("MatMul", [x, w], f"{name}_{i}"), heads], f"{name}4_{i}")
            proj[name] = node("Transpose", [y], f"{name}t_{i}", perm=[0, 2, 1, 3])
        for kind, src in (("key", "k"), ("value", "v")):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", T.FLOAT,
                                                        ["B", HEADS, smax, HEAD_DIM]))
            node("TensorScatter", [f"past_{kind}_{i}", proj[src], "past_len"],
                 f"present_{kind}_{i}", axis=-2, mode="linear")
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", T.FLOAT,
                                                         ["B", HEADS, smax, HEAD_DIM]))
        att = node("Attention", [proj["q"], f"present_key_{i}", f"present_value_{i}", mask],
                   f"att_{i}", scale=HEAD_DIM ** -0.5, is_causal=0)
        att = node("Reshape", [node("Transpose", [att], f"att_t_{i}", perm=[0, 2, 1, 3]), merge],
                   f"att_m_{i}")
        x = node("Tanh", [node("Add", [x, att], f"res_{i}")], f"h_{i}")
    if last:
        idx = node("Unsqueeze", ["last_index", const("ax12", np.array([1, 2]))], "idx")
        idx = node("Expand", [idx, const("idx_shape", np.array([1, 1, HIDDEN]))], "idx_e")
        h = node("Squeeze", [node("GatherElements", [x, idx], "h_last", axis=1),
                             const("ax1", np.array([1]))], "h_sq")
        node("MatMul", [h, const("head", rng.normal(0, 2, (HIDDEN, vocab)).astype(np.float32))],
             "logits")
        outputs.insert(0, helper.make_tensor_value_info("logits", T.FLOAT, ["B", vocab]))
    else:
        node("Identity", [x], "hidden_out")
        outputs.insert(0, helper.make_tensor_value_info("hidden_out", T.FLOAT,
                                                        ["B", "S", HIDDEN]))
    graph = helper.make_graph(nodes, "toy", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def toy_engine_dir(out: Path, limits: BuildLimits, vocab: int = 64, parts: int = 1,
                   tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Write an onnx engine dir (manifest + rank0 part graphs [+ tokenizer files])."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    layer_sets = [[0, 1]] if parts == 1 else [[0], [1]]
    files = []
    for p, layers in enumerate(layer_sets):
        name = "rank0.onnx" if parts == 1 else f"rank0.part{p}.onnx"
        model = _part(p == 0, p == len(layer_sets) - 1, layers, vocab, limits.max_seq_len, rng)
        onnx.save(model, out / name)
        files.append(name)
    decoder = DecoderConfig(architecture="Toy", vocab_size=vocab, hidden_size=HIDDEN,
                            num_layers=2, num_heads=HEADS, num_kv_heads=HEADS,
                            head_dim=HEAD_DIM, intermediate_size=HIDDEN,
                            max_position_embeddings=limits.max_seq_len)
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(tokenizer_dir / f, out / f)
    EngineManifest(backend="onnx", backend_version={"onnxruntime": onnxruntime.__version__},
                   targets=("cpu",), decoder=decoder, mapping=Mapping(), dtype="float32",
                   limits=limits, rank_files={0: tuple(files)},
                   checksums={f: sha256_file(out / f) for f in files},
                   kiln_version=kiln.__version__).write(out)
    return out


def rewrite_manifest(engine_dir: Path, **changes) -> None:
    """Change the manifest as a build would have written it: its digest follows (an edit the
    runtime warns of is made by hand, in the tests of that warning)."""
    path = engine_dir / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    if DIGEST_KEY in data:
        data[DIGEST_KEY] = manifest_digest(data)
    path.write_text(json.dumps(data))
