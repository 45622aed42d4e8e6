"""Plugin switches resolve to forms: enable errors where impossible, auto picks and logs."""

from __future__ import annotations

import logging

import pytest

from kiln.builder.options import BuildOptions
from kiln.config import DecoderConfig, MlpType, PositionType
from kiln.errors import ConfigError, options_as_flags
from kiln.plugins import PLUGINS, PluginContext, resolve_plugins

BASE = dict(architecture="x", vocab_size=16, hidden_size=64, num_layers=1, num_heads=4,
            num_kv_heads=2, head_dim=16, intermediate_size=32, max_position_embeddings=32)


def ctx(backend="onnx", dtype="float16", targets=("cpu",), **kw) -> PluginContext:
    return PluginContext(DecoderConfig(**{**BASE, **kw}), dtype, backend, targets)


def test_every_plugin_has_all_parts():
    import importlib
    for name in PLUGINS:
        for part in ("spec", "reference", "onnx"):
            importlib.import_module(f"kiln.plugins.{name}.{part}")


def test_auto_enables_everything_that_occurs():
    assert resolve_plugins({}, ctx()) == dict.fromkeys(PLUGINS, True)


def test_auto_logs_its_choice(caplog):
    with caplog.at_level(logging.INFO, logger="kiln.plugins.registry"):
        chosen = resolve_plugins({}, ctx(backend="tensorrt", dtype="float32"))
    assert chosen["attention"] is False
    assert "attention plugin: auto chose the decomposed form (TensorRT has no fused" in caplog.text


def test_absent_operations():
    alibi = ctx(position_type=PositionType.ALIBI, alibi_slopes=[0.5, 0.25, 0.125, 0.0625],
                mlp_type=MlpType.GELU)
    chosen = resolve_plugins({}, alibi)
    assert chosen["rotary"] is False and chosen["gated_mlp"] is False
    with pytest.raises(ConfigError, match=r"plugins\['rotary'\]='enable': the model uses alibi"):
        resolve_plugins({"rotary": "enable"}, alibi)


def test_disable_and_bad_values():
    assert resolve_plugins({"norm": "disable"}, ctx())["norm"] is False
    with pytest.raises(ConfigError,
                       match=r"plugins\['norm'\] must be one of auto, enable, disable"):
        resolve_plugins({"norm": "yes"}, ctx())
    with pytest.raises(ConfigError, match=r"unknown plugins \['flash'\]"):
        resolve_plugins({"flash": "auto"}, ctx())


@pytest.mark.parametrize("modes,message", [
    ({"bogus": True}, "unknown plugins ['bogus']; known: "),  # its name first, not its mode
    ({"Attention": "enable"}, "unknown plugins ['Attention'] (did you mean 'Attention' -> "
                              "'attention'?); known: "),
])
def test_an_unknown_plugin_is_told_first_with_the_one_meant(modes, message):
    """A retest: {"bogus": True} was told its mode, then, mended, its name; no did-you-mean."""
    for check in (lambda: resolve_plugins(modes, ctx()),
                  lambda: BuildOptions("c", "e", plugins=modes)):
        with pytest.raises(ConfigError) as error:
            check()
        assert str(error.value).startswith(message)


def test_tensorrt_head_limits():
    few_heads = PluginContext(DecoderConfig(**BASE), "float16", "tensorrt", tp_size=2)
    with pytest.raises(ConfigError, match="2 query heads per rank"):
        resolve_plugins({"attention": "enable"}, few_heads)
    odd_dim = ctx(backend="tensorrt", head_dim=8)
    with pytest.raises(ConfigError, match="head_dim 8"):
        resolve_plugins({"attention": "enable"}, odd_dim)


def test_onnxruntime_cpu_forms_only_for_onnx_cpu():
    for other in (ctx(backend="tensorrt", targets=("sm86",)), ctx(targets=("cuda",))):
        chosen = resolve_plugins({}, other)
        assert chosen["gqa"] is False and chosen["residual_norm"] is False
    with pytest.raises(ConfigError, match=r"plugins\['gqa'\]='enable': an ONNX Runtime CPU op; "
                                          "this build is for tensorrt sm86"):
        resolve_plugins({"gqa": "enable"}, ctx(backend="tensorrt", targets=("sm86",)))


@pytest.mark.parametrize("kw,reason", [
    (dict(position_type=PositionType.ALIBI, alibi_slopes=[0.5, 0.25, 0.125, 0.0625]),
     "no alibi position bias"),
    (dict(head_dim=24), "head_dim % 16 == 0, found 24"),
    (dict(qk_norm=True), "qk_norm"),
])
def test_gqa_model_limits(kw, reason):
    assert resolve_plugins({}, ctx(**kw))["gqa"] is False
    with pytest.raises(ConfigError, match=reason):
        resolve_plugins({"gqa": "enable"}, ctx(**kw))


@pytest.mark.parametrize("replaced", ["attention", "rotary", "kv_cache"])
def test_gqa_yields_to_a_disabled_plugin_it_replaces(replaced):
    chosen = resolve_plugins({replaced: "disable"}, ctx())
    assert chosen["gqa"] is False and chosen[replaced] is False
    with pytest.raises(ConfigError) as python:  # named as its user gave it (a retest)
        resolve_plugins({replaced: "disable", "gqa": "enable"}, ctx())
    with options_as_flags(), pytest.raises(ConfigError) as cli:
        resolve_plugins({replaced: "disable", "gqa": "enable"}, ctx())
    assert str(python.value) == f"plugins['gqa']='enable': plugins[{replaced!r}]='disable' " \
                                f"asks for the standard decomposed forms; use auto or disable"
    assert str(cli.value) == f"--gqa_plugin enable: --{replaced}_plugin disable asks for the " \
                             f"standard decomposed forms; use auto or disable"


def info_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "kiln.plugins.registry" and r.levelno >= logging.INFO]


def test_one_info_line_says_what_the_graph_holds(caplog):
    with caplog.at_level(logging.DEBUG, logger="kiln.plugins.registry"):
        chosen = resolve_plugins({}, ctx())
    assert chosen == dict.fromkeys(PLUGINS, True)  # the manifest's switches: unchanged
    assert info_lines(caplog) == ["plugins fused: gated_mlp, gqa, norm, residual_norm; "
                                  "replaced by gqa: attention, kv_cache, rotary"]
    assert "attention plugin: replaced by gqa" in caplog.text
    assert "attention plugin: auto enabled" not in caplog.text


def test_summary_groups_decomposed_and_absent_plugins(caplog):
    alibi = ctx(backend="tensorrt", targets=("sm86",), position_type=PositionType.ALIBI,
                alibi_slopes=[0.5, 0.25, 0.125, 0.0625], mlp_type=MlpType.GELU)
    with caplog.at_level(logging.INFO, logger="kiln.plugins.registry"):
        resolve_plugins({"norm": "disable"}, alibi)
    lines = info_lines(caplog)
    assert lines[-1] == ("plugins fused: attention, kv_cache; decomposed: gqa, norm, "
                         "residual_norm; not in the model: gated_mlp, rotary")
    assert [line.split(":")[0] for line in lines[:-1]] == ["gqa plugin", "residual_norm plugin"]
