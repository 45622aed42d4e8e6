"""The real model: SmolLM2-135M-Instruct quantized with int8_wo, int4_wo and int4_awq on real
English text (kiln.testing.english; evaluation text calibration never saw). int8_wo stays within
1% perplexity; AWQ's perplexity increase is smaller than plain INT4's at the same group size."""

from __future__ import annotations

import pytest

import kiln
from kiln.checkpoint import load_config
from kiln.datasets import load_texts
from kiln.testing.english import english_file
from kiln.testing.smollm2 import smollm2_hf_dir

pytestmark = pytest.mark.slow

EVAL_PARAGRAPHS = 10  # the evaluation set's first paragraphs: about 400 tokens


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return kiln.convert_checkpoint(smollm2_hf_dir(), tmp_path_factory.mktemp("smollm2") / "c",
                                   dtype="float32", progress=False)


def test_int8_wo_within_one_percent_and_awq_beats_int4_wo(smollm2, tmp_path):
    evaluation = tmp_path / "evaluation.txt"
    evaluation.write_text("\n\n".join(load_texts(english_file("evaluation")).texts
                                      [:EVAL_PARAGRAPHS]) + "\n")
    common = dict(calib_dataset=str(english_file("calibration")), calib_size=2,
                  calib_max_seq_length=128, eval_dataset=str(evaluation), progress=False)
    accuracy = {}
    for qformat in ("int8_wo", "int4_wo", "int4_awq"):
        group = 64 if qformat.startswith("int4") else None  # 128 does not divide hidden 576
        out = kiln.quantize(smollm2, tmp_path / qformat, qformat=qformat, group_size=group,
                            no_accuracy_gate=True, **common)
        accuracy[qformat] = load_config(out).quantization.accuracy
    assert accuracy["int8_wo"]["tokens"] >= 250
    # int8's rounding moves the figure either way (0.9989 on these tokens)
    assert 0.99 <= accuracy["int8_wo"]["ppl_ratio"] <= 1.01
    increase = {q: a["perplexity_quantized"] - a["perplexity_source"] for q, a in accuracy.items()}
    assert 0 < increase["int4_awq"] < increase["int4_wo"], accuracy
    assert accuracy["int4_awq"]["kl_divergence"] < accuracy["int4_wo"]["kl_divergence"]
