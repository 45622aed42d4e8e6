"""Every architecture variant converts at several splits, and the oracle matches HF."""

from __future__ import annotations

import pytest
import torch

from kiln.reference import ReferenceDecoder
from tests.helpers import hf_step_logits, max_abs_diff, ref_step_logits
from tests.models import PROMPT, VARIANTS, hf_model, kiln_checkpoint, model_class, tp_sizes


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    name = request.param
    return name, hf_model(name, tmp_path_factory.mktemp(name))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
def test_reference_matches_hf(variant, tmp_path, tp, pp):
    name, src = variant
    if tp not in tp_sizes(name):
        pytest.skip(f"{name}: tp {tp} does not divide its heads")
    out = kiln_checkpoint(src, tmp_path / "ckpt", tp=tp, pp=pp)
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == \
        sorted(f"rank{r}.safetensors" for r in range(tp * pp))
    model = model_class(name).from_pretrained(src, dtype=torch.float32).eval()
    want, tokens = hf_step_logits(model, PROMPT, steps=8)
    got = ref_step_logits(ReferenceDecoder.from_checkpoint(out), PROMPT, tokens)
    assert max_abs_diff(got, want) <= 1e-4
