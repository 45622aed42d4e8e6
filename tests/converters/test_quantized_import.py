"""convert_checkpoint on HF checkpoints that are already quantized (kiln/converters/quantized.py).

A tiny random Llama is written to disk by hand in each FP8 format, as the real checkpoints lay
it out (nvidia/Llama-3.1-8B-Instruct-FP8: ModelOpt; RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8:
compressed-tensors), then converted. The oracle is HF's LlamaForCausalLM with the dequantized
FP8 weights, each linear's input fake-quantized with its input_scale (forward pre-hooks) and,
with a quantized KV cache, the keys after the rotary embedding and the values fake-quantized
with k_scale / v_scale: code independent of kiln's reference decoder.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

import kiln
from kiln.checkpoint import load_config, load_merged, load_rank
from kiln.cli.main import main
from kiln.errors import CheckpointError, ConfigError
from kiln.quantization.config import Granularity
from kiln.reference import ReferenceDecoder
from tests.helpers import hf_step_logits, max_abs_diff, ref_step_logits, with_bom
from tests.models import PROMPT, hf_model

FP8_MAX = 448.0
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Max |logit difference| of the imported checkpoint (kiln's reference decoder) vs the HF
# oracle, float32 both. Both round the same values to FP8, so they differ only where float32
# op order moves an activation across an FP8 rounding boundary (measured: 0.0 on this model).
# Dropping only the activation fake-quant moves the logits by ~2e-2 (checked below: > 10 TOL).
TOL = 1e-3
STEPS = 3


def _fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Fake-quantize (the formats' definition, written independently of kiln)."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def amax(hf_dir):
    """|max| of every linear's input and of each layer's k (after rotary) and v: calibration."""
    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    seen: dict[str, float] = {}

    def keep(name, x):
        seen[name] = max(seen.get(name, 0.0), float(x.abs().max()))

    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: keep(n, a[0]))
             for n, m in model.named_modules() if n.endswith(LINEARS)]
    hooks += [m.register_forward_hook(lambda m, a, out, n=n: keep(n + ".out", out))
              for n, m in model.named_modules() if n.endswith(("k_proj", "v_proj"))]
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    for h in hooks:
        h.remove()
    return seen


def write_fp8(hf_dir: Path, out: Path, amax: dict[str, float], fmt: str, *, channel: bool = False,
              kv: bool = True, shared: bool = False, record: str = "both",
              skip: tuple[str, ...] = ()) -> Path:
    """``hf_dir`` quantized to FP8 in ``fmt`` (modelopt | compressed-tensors) at ``out``.

    Per-tensor weight scales are each tensor's amax / 448 (q, k, v differ), or with ``shared``
    one per fused group (ModelOpt's requantize_resmooth_fused_llm_layers); ``channel``: one per
    output row. ``skip``: linears left unquantized (and listed in the ignore list).
    """
    out.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    state = load_file(hf_dir / "model.safetensors")
    scale_dtype = torch.bfloat16 if fmt == "compressed-tensors" else torch.float32  # model dtype
    tensors = {}
    for name, w in state.items():
        prefix = name.removesuffix(".weight")
        if not prefix.endswith(LINEARS) or prefix in skip:
            tensors[name] = w
            continue
        group = prefix.rsplit(".", 1)[0] if shared else prefix
        if channel:
            scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).to(scale_dtype)
        else:
            peers = [state[k] for k in state if k.startswith(group) and k.endswith("proj.weight")
                     and _fused_with(k, name)] if shared else [w]
            scale = (max(float(p.abs().max()) for p in peers) / FP8_MAX * torch.ones(1)).to(scale_dtype)
        tensors[name] = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        tensors[prefix + ".weight_scale"] = scale if channel or fmt != "modelopt" else scale.reshape(())
        in_scale = torch.tensor([amax[prefix] / FP8_MAX]).to(scale_dtype)
        tensors[prefix + ".input_scale"] = in_scale if fmt != "modelopt" else in_scale.reshape(())
    if kv:
        for layer in range(2):
            attn = f"model.layers.{layer}.self_attn"
            for kind in "kv":
                # Keys are scaled after the rotary embedding, which can grow an element: margin 2.
                value = torch.tensor([2 * amax[f"{attn}.{kind}_proj.out"] / FP8_MAX]).to(scale_dtype)
                where = f"{attn}.{kind}_proj.{kind}_scale" if fmt == "modelopt" else f"{attn}.{kind}_scale"
                tensors[where] = value.reshape(()) if fmt == "modelopt" else value
    save_file(tensors, out / "model.safetensors")
    _write_record(out, fmt, channel=channel, kv=kv, record=record, ignore=["lm_head", *skip])
    return out


def _fused_with(a: str, b: str) -> bool:
    fused = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
    pa, pb = a.split(".")[-2], b.split(".")[-2]
    return pa == pb or any(pa in f and pb in f for f in fused)


FP8_ARGS = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
            "num_bits": 8, "observer": "minmax", "observer_kwargs": {}, "strategy": "tensor",
            "symmetric": True, "type": "float"}


def _write_record(out: Path, fmt: str, *, channel: bool, kv: bool, record: str,
                  ignore: list[str]) -> None:
    """config.json's quantization_config (and ModelOpt's hf_quant_config.json) as the real
    exporters write them: ModelOpt export_hf_checkpoint + convert_hf_quant_config_format;
    llm-compressor's compressed-tensors QuantizationConfig."""
    config = json.loads((out / "config.json").read_text())
    kv_scheme = {**FP8_ARGS, "observer": None} if kv else None
    if fmt == "modelopt":
        hqc = {"producer": {"name": "modelopt", "version": "0.19.0"},
               "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv else None,
                                "exclude_modules": ignore}}
        (out / "hf_quant_config.json").write_text(json.dumps(hqc, indent=4))
        if record == "both":
            short = {"dynamic": False, "num_bits": 8, "type": "float"}
            config["quantization_config"] = {
                "config_groups": {"group_0": {"input_activations": short, "weights": short,
                                              "targets": ["Linear"]}},
                "ignore": ignore, "quant_algo": "FP8", "producer": hqc["producer"],
                "quant_method": "modelopt",
                **({"kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}} if kv else {})}
    else:
        weights = {**FP8_ARGS, "strategy": "channel" if channel else "tensor"}
        config["quantization_config"] = {
            "config_groups": {"group_0": {"input_activations": dict(FP8_ARGS),
                                          "output_activations": None, "targets": ["Linear"],
                                          "weights": weights}},
            "format": "float-quantized", "global_compression_ratio": 1.24, "ignore": ignore,
            "kv_cache_scheme": kv_scheme, "quant_method": "compressed-tensors",
            "quantization_status": "compressed"}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def oracle(fp8_dir: Path) -> LlamaForCausalLM:
    """HF Llama running the FP8 checkpoint's numerics (see the module docstring)."""
    config = LlamaConfig.from_pretrained(fp8_dir)
    model = LlamaForCausalLM(config).float().eval()
    state = load_file(fp8_dir / "model.safetensors")
    dense = {}
    for name, t in state.items():
        if name.endswith(".weight"):
            scale = state.get(name.removesuffix("weight") + "weight_scale")
            dense[name] = t.float() if scale is None else t.float() * scale.float().reshape(-1, 1)
    model.load_state_dict(dense, strict=False)
    for name, module in model.named_modules():
        scale = state.get(f"{name}.input_scale")
        if scale is not None:
            scale = scale.float()
            module.register_forward_pre_hook(lambda m, a, s=scale: (_fp8(a[0], s),))
    model.kv_scales = _kv_scales(state)
    return model


def _kv_scales(state: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    scales = {}
    for layer in range(2):
        attn = f"model.layers.{layer}.self_attn"
        k = state.get(f"{attn}.k_scale", state.get(f"{attn}.k_proj.k_scale"))
        v = state.get(f"{attn}.v_scale", state.get(f"{attn}.v_proj.v_scale"))
        if k is not None:
            scales[layer] = (k.float(), v.float())
    return scales


@pytest.fixture
def kv_patch(monkeypatch):
    """Fake-quantize HF Llama's cached keys (after rotary) and values with a model's kv_scales."""
    state = {"layer": None, "scales": {}}
    rope = modeling_llama.apply_rotary_pos_emb

    def patched(q, k, cos, sin, *args, **kwargs):
        q, k = rope(q, k, cos, sin, *args, **kwargs)
        scales = state["scales"].get(state["layer"])
        return (q, k) if scales is None else (q, _fp8(k, scales[0]))

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", patched)

    def install(model):
        state["scales"] = model.kv_scales
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: state.update(layer=i))
            if i in model.kv_scales:
                s = model.kv_scales[i][1]
                layer.self_attn.v_proj.register_forward_hook(lambda m, a, out, s=s: _fp8(out, s))
        return model
    return install


def _convert(src: Path, out: Path, **kw) -> Path:
    return kiln.convert_checkpoint(src, out, progress=False, **kw)


@pytest.mark.parametrize("fmt,channel,kv,record", [
    ("modelopt", False, True, "both"),
    ("modelopt", False, False, "file"),  # older releases: hf_quant_config.json only
    ("compressed-tensors", True, True, "both"),
    ("compressed-tensors", False, False, "both"),
])
def test_import_matches_hf_oracle(hf_dir, amax, kv_patch, tmp_path, fmt, channel, kv, record):
    src = write_fp8(hf_dir, tmp_path / "src", amax, fmt, channel=channel, kv=kv, record=record)
    out = _convert(src, tmp_path / "ckpt")
    ckpt = load_config(out)
    quant = ckpt.quantization
    assert (quant.qformat, quant.source_format, quant.kv_cache_dtype) == \
        ("fp8", fmt, "fp8" if kv else None)
    assert quant.weight_scales is Granularity.PER_CHANNEL  # q, k, v scales differ (or channel)
    assert quant.calibration is None and quant.accuracy is None
    assert "quantization_config" not in ckpt.decoder.extra
    rank0 = load_rank(out, 0, ckpt)
    assert rank0["layers.0.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert rank0["layers.0.attn.qkv.weight_scale"].shape == (128,)  # 64 q + 2 * 32 kv rows
    assert rank0["layers.0.mlp.down.input_scale"].dtype == torch.float32
    assert rank0["lm_head.weight"].dtype == rank0["embed.weight"].dtype == torch.float32
    ref = ReferenceDecoder.from_checkpoint(out)
    hf_logits, tokens = hf_step_logits(kv_patch(oracle(src)), PROMPT, STEPS)
    assert max_abs_diff(ref_step_logits(ref, PROMPT, tokens), hf_logits) < TOL
    # The tolerance tells the numerics apart: without activation fake-quant HF is far off.
    plain = LlamaForCausalLM(LlamaConfig.from_pretrained(hf_dir)).eval()
    plain.load_state_dict(oracle(src).state_dict())
    far, _ = hf_step_logits(plain, PROMPT, 0)
    assert max_abs_diff(ref_step_logits(ref, PROMPT, [])[:1], far[:1]) > 10 * TOL


def test_a_quant_record_with_a_utf8_bom_is_read(hf_dir, amax, tmp_path):
    """hf_quant_config.json saved by a Windows editor (a byte-order mark) had been
    "unreadable (Unexpected UTF-8 BOM ...); re-download the checkpoint"."""
    src = write_fp8(hf_dir, tmp_path / "src", amax, "modelopt", kv=False, record="file")
    plain = _convert(src, tmp_path / "plain")
    with_bom(src / "hf_quant_config.json")
    out = _convert(src, tmp_path / "out")
    assert load_config(out).quantization == load_config(plain).quantization
    assert (out / "rank0.safetensors").read_bytes() == (plain / "rank0.safetensors").read_bytes()


def test_fusion_is_lossless(hf_dir, amax, tmp_path):
    """Different per-tensor scales of q/k/v become per-row scales, bytes copied as they are;
    a shared scale per fused group stays per-tensor."""
    src = write_fp8(hf_dir, tmp_path / "src", amax, "modelopt")
    state = load_file(src / "model.safetensors")
    merged = load_merged(_convert(src, tmp_path / "ckpt"))
    attn = "model.layers.1.self_attn"
    parts = [f"{attn}.{p}_proj" for p in "qkv"]
    assert torch.equal(merged["layers.1.attn.qkv.weight"].view(torch.uint8),
                       torch.cat([state[p + ".weight"] for p in parts]).view(torch.uint8))
    rows = torch.cat([state[p + ".weight_scale"].expand(n) for p, n in zip(parts, (64, 32, 32), strict=True)])
    assert len(set(rows.tolist())) == 3
    assert torch.equal(merged["layers.1.attn.qkv.weight_scale"], rows)
    assert merged["layers.1.attn.k_scale"].shape == ()

    shared = write_fp8(hf_dir, tmp_path / "shared", amax, "modelopt", shared=True)
    out = _convert(shared, tmp_path / "ckpt-shared")
    assert load_config(out).quantization.weight_scales is Granularity.PER_TENSOR
    merged = load_merged(out)
    state = load_file(shared / "model.safetensors")
    assert merged["layers.1.mlp.gate_up.weight_scale"].shape == ()
    assert merged["layers.1.mlp.gate_up.weight_scale"] == state["model.layers.1.mlp.up_proj.weight_scale"]


def test_fused_input_scales_that_differ_take_the_largest(hf_dir, amax, tmp_path, caplog):
    src = write_fp8(hf_dir, tmp_path / "src", amax, "modelopt", kv=False)
    state = load_file(src / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.input_scale"
    state[key] = state[key] * 2
    save_file(state, src / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="kiln.converters.quantized"):
        merged = load_merged(_convert(src, tmp_path / "ckpt"))
    assert merged["layers.0.attn.qkv.input_scale"] == state[key]
    assert merged["layers.1.attn.qkv.input_scale"] == \
        state["model.layers.1.self_attn.q_proj.input_scale"]
    # (it had named the role's method: "layers.0 <bound method Role.name of ...>")
    assert ("1 fused linears have parts with different input scales (largest ratio 2, "
            "layers.0.attn.qkv.weight)" in caplog.text), caplog.text
    assert "quantizes once" in caplog.text


@pytest.mark.parametrize("fmt,channel", [("modelopt", False), ("compressed-tensors", True)])
def test_sharded_import_equals_whole(hf_dir, amax, tmp_path, fmt, channel):
    """tp 4 (2 KV heads: replicated, with their per-row scales) x pp 2 merges back to tp 1."""
    src = write_fp8(hf_dir, tmp_path / "src", amax, fmt, channel=channel)
    whole = load_merged(_convert(src, tmp_path / "tp1"))
    sharded_dir = _convert(src, tmp_path / "tp4", tp_size=4, pp_size=2)
    rank1 = load_rank(sharded_dir, 1)
    assert rank1["layers.0.attn.qkv.weight_scale"].shape == (48,)  # one q, k and v head of 16
    sharded = load_merged(sharded_dir)
    assert sorted(sharded) == sorted(whole)
    for name, tensor in whole.items():
        assert sharded[name].dtype == tensor.dtype, name
        assert torch.equal(sharded[name].reshape(-1).view(torch.uint8),
                           tensor.reshape(-1).view(torch.uint8)), name


def test_dtype_applies_to_unquantized_tensors_only(hf_dir, amax, tmp_path):
    src = write_fp8(hf_dir, tmp_path / "src", amax, "compressed-tensors")
    out = _convert(src, tmp_path / "ckpt", dtype="bfloat16")
    rank0 = load_rank(out, 0)
    assert load_config(out).dtype == "bfloat16"
    assert rank0["embed.weight"].dtype == rank0["layers.0.attn_norm.weight"].dtype == torch.bfloat16
    assert rank0["layers.0.mlp.gate_up.weight"].dtype == torch.float8_e4m3fn
    assert rank0["layers.0.mlp.gate_up.weight_scale"].dtype == torch.float32


def _with_quant_config(hf_dir: Path, out: Path, qc: dict) -> Path:
    out.mkdir()
    (out / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return out


def _ct(weights: dict, acts: dict | None, fmt: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": acts}}}


INT4 = {**FP8_ARGS, "type": "int", "num_bits": 4, "strategy": "group", "group_size": 128}
INT8 = {**FP8_ARGS, "type": "int", "strategy": "channel"}
TOKEN = {**FP8_ARGS, "strategy": "token", "dynamic": True}

REFUSED = {
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
             "zero_point": True}, r"awq \(bits 4, group_size 128, version gemm\)"),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
             r"gptq \(bits 4, group_size 128\)"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True,
                      "bnb_4bit_quant_type": "nf4"}, r"bitsandbytes \(load_in_4bit True, bnb_4bit_quant_type nf4\)"),
    "fbgemm_fp8": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
                   r"fbgemm_fp8 \(no details\)"),
    "fp8-block": ({"quant_method": "fp8", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128]},
                  r"fp8 \(weight_block_size \[128, 128\], activation_scheme dynamic\)"),
    "ct-w4a16": (_ct(INT4, None, "pack-quantized"),
                 r"compressed-tensors \(int4 \(group 128\) weights, no activation quantization, "
                 r"format pack-quantized\)"),
    "ct-w8a8-int8": (_ct(INT8, {**TOKEN, "type": "int"}, "int-quantized"),
                     r"compressed-tensors \(int8 \(channel\) weights, dynamic int8 \(token\) "
                     r"activations, format int-quantized\)"),
    "modelopt-nvfp4": ({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16},
                       r"modelopt \(quant_algo NVFP4\)"),
    "modelopt-int4-awq": ({"quant_method": "modelopt", "quant_algo": "W4A16_AWQ"},
                          r"modelopt \(quant_algo W4A16_AWQ\)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_other_quantizations_are_refused_by_name(hf_dir, tmp_path, case):
    qc, detail = REFUSED[case]
    src = _with_quant_config(hf_dir, tmp_path / "src", qc)
    with pytest.raises(ConfigError, match=f"^HF checkpoint quantized with {detail}: kiln imports "
                       f"FP8 checkpoints in ModelOpt or compressed-tensors format only; convert "
                       f"the unquantized model and use kiln quantize$"):
        _convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qc,why", [
    (_ct({**FP8_ARGS, "strategy": "channel"}, TOKEN, "float-quantized"),
     r"\(float8 \(channel\) weights, dynamic float8 \(token\) activations, format "
     r"float-quantized\): kiln's fp8 format has static per-tensor activation scales only, not "
     r"dynamic ones"),
    ({"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"},
     r"\(quant_algo FP8_PER_CHANNEL_PER_TOKEN\): kiln's fp8 format has static per-tensor "
     r"activation scales only, not dynamic per-token ones"),
    (_ct({**FP8_ARGS, "strategy": "channel"}, None, "float-quantized"),
     r"no activation quantization, format float-quantized\): kiln's fp8 format needs static "
     r"per-tensor activation scales \(input_scale\) and this checkpoint has none"),
], ids=["ct-fp8-dynamic", "modelopt-fp8-per-token", "ct-fp8-weight-only"])
def test_fp8_without_static_activation_scales_is_refused(hf_dir, tmp_path, qc, why):
    src = _with_quant_config(hf_dir, tmp_path / "src", qc)
    with pytest.raises(ConfigError, match=why + r"; convert the unquantized model and use kiln "
                       r"quantize --qformat fp8 \(it calibrates static scales\)$"):
        _convert(src, tmp_path / "out")


def test_refusal_is_one_line_exit_2(hf_dir, tmp_path):
    src = _with_quant_config(hf_dir, tmp_path / "src", REFUSED["awq"][0])
    result = CliRunner().invoke(main, ["convert_checkpoint", "--model_dir", str(src),
                                       "--output_dir", str(tmp_path / "out")], prog_name="kiln")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "HF checkpoint quantized with awq" in lines[0]


def _drop(src: Path, *names: str) -> None:
    state = load_file(src / "model.safetensors")
    for name in names:
        del state[name]
    save_file(state, src / "model.safetensors")


def test_fp8_weight_without_its_scale_is_refused(hf_dir, amax, tmp_path):
    src = write_fp8(hf_dir, tmp_path / "src", amax, "modelopt")
    _drop(src, "model.layers.1.mlp.up_proj.weight_scale")
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight is FP8 but "
                       r"model.layers.1.mlp.up_proj.weight_scale is missing"):
        _convert(src, tmp_path / "out")


def test_fp8_weights_without_a_quantization_record_are_refused(hf_dir, amax, tmp_path):
    """Before the importer these were silently upcast: a wrong model."""
    src = write_fp8(hf_dir, tmp_path / "src", amax, "modelopt", record="file", kv=False)
    (src / "hf_quant_config.json").unlink()
    _drop(src, *[n for n in load_file(src / "model.safetensors") if n.endswith("_scale")])
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight is "
                       r"float8_e4m3fn but config.json has no quantization_config \(nor "
                       r"hf_quant_config.json\), so its scales are unknown"):
        _convert(src, tmp_path / "out")


def test_an_ignored_decoder_linear_is_refused(hf_dir, amax, tmp_path):
    src = write_fp8(hf_dir, tmp_path / "src", amax, "compressed-tensors",
                    skip=("model.layers.1.mlp.down_proj",))
    with pytest.raises(ConfigError, match=r"^model.layers.1.mlp.down_proj is float32, not FP8 "
                       r"e4m3, while other linears are .*'model.layers.1.mlp.down_proj'.*kiln's "
                       r"fp8 format quantizes every decoder linear"):
        _convert(src, tmp_path / "out")


def test_a_quantized_lm_head_is_refused(hf_dir, amax, tmp_path):
    src = write_fp8(hf_dir, tmp_path / "src", amax, "modelopt")
    state = load_file(src / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"].to(torch.float8_e4m3fn)
    save_file(state, src / "model.safetensors")
    with pytest.raises(ConfigError, match=r"^lm_head.weight is FP8 in the source"):
        _convert(src, tmp_path / "out")


@pytest.mark.parametrize("target", ["scale", "weight"])
def test_nan_is_refused(hf_dir, amax, tmp_path, target):
    src = write_fp8(hf_dir, tmp_path / "src", amax, "compressed-tensors", channel=True)
    state = load_file(src / "model.safetensors")
    name = f"model.layers.0.self_attn.v_proj.weight{'_scale' if target == 'scale' else ''}"
    bad = state[name].clone()
    if target == "scale":
        bad[3, 0] = float("nan")
    else:
        bad.view(torch.uint8)[3, 0] = 0x7F  # NaN in float8_e4m3fn
    state[name] = bad
    save_file(state, src / "model.safetensors")
    match = "not a finite positive number" if target == "scale" else r"holds NaN/Inf values " \
        r"\(first at row 3\)"
    with pytest.raises(CheckpointError, match=f"{name}.*{match}"):
        _convert(src, tmp_path / "out")
