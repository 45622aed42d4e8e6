"""The Llama/Mistral converter: settings read as transformers' modeling code reads them."""

from __future__ import annotations

import json

import pytest

import kiln
from kiln.converters.llama import LlamaConverter


def _hf_config(architecture: str, **settings) -> dict:
    from tests.models import LLAMA_BASE

    return {"architectures": [architecture], **LLAMA_BASE, **settings}


@pytest.mark.parametrize("architecture,settings,window", [
    ("MistralForCausalLM", {}, 4096),  # MistralConfig's default
    ("MistralForCausalLM", {"sliding_window": None}, None),
    ("MistralForCausalLM", {"sliding_window": 8}, 8),
    ("MistralForCausalLM", {"sliding_window": 8, "use_sliding_window": False}, 8),
    ("LlamaForCausalLM", {}, None),
    ("LlamaForCausalLM", {"sliding_window": 64}, None),  # covers max_position_embeddings
])
def test_the_window_is_the_one_transformers_applies(architecture, settings, window, caplog):
    with caplog.at_level("INFO", logger="kiln.converters.llama"):
        config = LlamaConverter.config_from_hf(_hf_config(architecture, **settings))
    assert config.sliding_window == window
    ignored = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage().partition(" is ignored")[0] for r in ignored] == \
        (["config.json: use_sliding_window false"] if "use_sliding_window" in settings else [])


def test_a_llama_window_that_transformers_applies_only_when_decoding_is_refused(tmp_path):
    """transformers' LlamaForCausalLM masks no window in a prompt but caches only the window's
    positions for decoding; converting it either way would leave HF's tokens somewhere."""
    from click.testing import CliRunner

    from kiln.cli.main import main
    from tests.models import hf_model

    src = hf_model("llama-gqa", tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    result = CliRunner().invoke(main, ["convert_checkpoint", "--model_dir", str(src),
                                       "--output_dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    line, = result.output.strip().splitlines()
    assert "sliding_window 4 on LlamaForCausalLM" in line and "fix it in config.json" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_cls,settings", [
    ("MistralForCausalLM", {"sliding_window": 4, "use_sliding_window": False}),
    ("LlamaForCausalLM", {"sliding_window": 64, "use_sliding_window": True}),
])
def test_ignored_window_settings_give_transformers_logits(tmp_path, model_cls, settings):
    """A trial: Mistral with "use_sliding_window": false beside a window had converted without
    the window (the switch is Qwen2's; MistralForCausalLM ignores it), and its greedy tokens
    left HF's at the first or second. A Llama window over every position changes nothing."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from kiln.reference import ReferenceDecoder
    from tests.helpers import hf_step_logits, max_abs_diff, ref_step_logits, save_hf_model
    from tests.models import LLAMA_BASE, PROMPT

    config_cls = getattr(transformers, model_cls.replace("ForCausalLM", "Config"))
    src = save_hf_model(getattr(transformers, model_cls), config_cls(**LLAMA_BASE),
                        tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **settings}))
    out = kiln.convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want, tokens = hf_step_logits(model, PROMPT, steps=8)  # 19 positions: past the window of 4
    got = ref_step_logits(ReferenceDecoder.from_checkpoint(out), PROMPT, tokens)
    assert max_abs_diff(got, want) <= 1e-4



def test_swish_is_silu_and_gives_transformers_logits(tmp_path):
    """Retest 48: hidden_act "swish" was refused, and transformers runs the very SiLU of
    "silu" for it (ACT2FN). Another activation is still refused in one line."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from kiln.errors import ConfigError
    from kiln.reference import ReferenceDecoder
    from tests.helpers import hf_step_logits, max_abs_diff, ref_step_logits, save_hf_model
    from tests.models import LLAMA_BASE, PROMPT

    src = save_hf_model(LlamaForCausalLM, LlamaConfig(**LLAMA_BASE, hidden_act="swish"),
                        tmp_path / "hf")
    out = kiln.convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want, tokens = hf_step_logits(model, PROMPT, steps=4)
    got = ref_step_logits(ReferenceDecoder.from_checkpoint(out), PROMPT, tokens)
    assert max_abs_diff(got, want) <= 1e-4
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported for "
                                          "Llama/Mistral"):
        LlamaConverter.config_from_hf(_hf_config("LlamaForCausalLM", hidden_act="gelu"))


def test_heads_that_do_not_divide_the_width_are_named():
    """5 heads of a 64-wide model had been refused as a weight-shape mismatch."""
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^config.json: hidden_size 64 is not a multiple of "
                                          r"num_attention_heads 5; fix it in config.json"):
        LlamaConverter.config_from_hf(_hf_config("LlamaForCausalLM", num_attention_heads=5,
                                                 num_key_value_heads=5))
    # read from a checkpoint's file, the converter names it (plan_conversion had rewritten
    # "config.json: " into the path; the build cache's reads had kept the bare name)
    from kiln.converters.base import reading_config

    with reading_config("/m/config.json"), pytest.raises(
            ConfigError, match=r"^/m/config.json: hidden_size 64 is not a multiple of "):
        LlamaConverter.config_from_hf(_hf_config("LlamaForCausalLM", num_attention_heads=5,
                                                 num_key_value_heads=5))
    with reading_config("/m/config.json"), pytest.raises(
            ConfigError, match=r"^/m/config.json: max_position_embeddings must be a positive "
                               r"integer, found '64'; fix it in config.json$"):
        LlamaConverter.max_positions({"max_position_embeddings": "64"})
    config = LlamaConverter.config_from_hf(_hf_config(  # an explicit head_dim: HF's too
        "LlamaForCausalLM", num_attention_heads=5, num_key_value_heads=5, head_dim=16))
    assert (config.num_heads, config.head_dim) == (5, 16)


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 4.0},
                                     {"rope_type": "linear", "factor": 4.0}])
def test_rope_scaling_in_either_spelling_of_its_type_gives_transformers_logits(tmp_path,
                                                                                scaling):
    """A trial: {"type": "linear"} (older hub configs' spelling) beside the default
    rope_parameters transformers 5 writes had converted unscaled, and the tokens differed."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from kiln.checkpoint import load_config
    from kiln.reference import ReferenceDecoder
    from tests.helpers import hf_step_logits, max_abs_diff, ref_step_logits, save_hf_model
    from tests.models import LLAMA_BASE, PROMPT

    src = save_hf_model(LlamaForCausalLM, LlamaConfig(**LLAMA_BASE), tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "default"  # what transformers 5 writes
    (src / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling}))
    out = kiln.convert_checkpoint(src, tmp_path / "ckpt", progress=False)
    assert load_config(out).decoder.rope_scaling.factor == 4.0
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want, tokens = hf_step_logits(model, PROMPT, steps=8)
    got = ref_step_logits(ReferenceDecoder.from_checkpoint(out), PROMPT, tokens)
    assert max_abs_diff(got, want) <= 1e-4


def test_an_older_spelled_llama3_scaling_still_needs_its_factors():
    """{"type": "llama3", "factor": 8} had converted with no scaling (transformers refuses it)."""
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="rope_scaling of rope type 'llama3' has no "):
        LlamaConverter.config_from_hf(_hf_config(
            "LlamaForCausalLM", rope_scaling={"type": "llama3", "factor": 8.0}))
