"""kiln quantize on the GPU (``--device cuda``, what ``auto`` picks where torch sees one)
against the same run on the CPU: same source, same text, same options.

Both devices compute in float32; only the order of their sums differs (~1e-7 relative), and
a division by a number (a scale's amax / 127) may run on the GPU as a product with its
reciprocal, one ulp off. So:
- weight-only formats without calibration: the quantized weights bit for bit (rounding a
  weight by its row's or group's extreme involves no sum), their scales within an ulp;
- calibrated formats (activation ranges, smoothing, AWQ's search): the same tensors by name,
  dtype and shape, and the two checkpoints' logits (the float32 reference decoder, on the CPU)
  closer to each other than a tenth of what quantizing moved them: a value that sits on a
  rounding tie may round the other way, one step;
- the accuracy gate's perplexities within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.checkpoint import load_config, load_merged
from kiln.reference import ReferenceDecoder
from tests.models import PROMPT

pytestmark = pytest.mark.gpu

CASES = [("int8_wo", {"quantize_lm_head": True}), ("int4_wo", {"group_size": 32}),
         ("fp8", {"kv_cache_dtype": "fp8"}), ("int8_sq", {"kv_cache_dtype": "int8"}),
         ("int4_awq", {"group_size": 32})]


@pytest.mark.parametrize("qformat,extra", CASES, ids=str)
def test_the_gpu_writes_the_cpus_checkpoint(checkpoint, texts, tmp_path, qformat, extra):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    src = checkpoint("llama-gqa")
    outs = {device: kiln.quantize(src, tmp_path / device, qformat=qformat, device=device,
                                  calib_dataset=str(texts["calib"]), calib_size=8,
                                  calib_max_seq_length=36, no_accuracy_gate=True,
                                  progress=False, **extra)
            for device in ("cpu", "cuda")}
    cpu, gpu = (load_merged(outs[d]) for d in ("cpu", "cuda"))
    assert cpu.keys() == gpu.keys()
    assert all(cpu[n].dtype == gpu[n].dtype and cpu[n].shape == gpu[n].shape for n in cpu)
    quant = load_config(outs["cuda"]).quantization
    if not quant.info.needs_calibration and quant.kv_cache_dtype is None:
        differ = [n for n in cpu if not (torch.equal(cpu[n], gpu[n]) if not n.endswith(
            "_scale") else torch.allclose(cpu[n], gpu[n], rtol=2.5e-7, atol=0))]
        assert not differ, f"{qformat}: tensors the GPU wrote otherwise: {differ}"
    prompt = torch.tensor([PROMPT])
    source, on_cpu, on_gpu = (ReferenceDecoder.from_checkpoint(p).forward(prompt)
                              for p in (src, outs["cpu"], outs["cuda"]))
    assert torch.isfinite(on_gpu).all()
    moved = (on_cpu - source).abs().max().item()
    apart = (on_gpu - on_cpu).abs().max().item()
    assert 0 < moved and apart <= moved / 10, f"{qformat}: devices {apart}, quantizing {moved}"
    gates = [load_config(outs[d]).quantization.accuracy for d in ("cpu", "cuda")]
    for key in ("perplexity_source", "perplexity_quantized"):
        assert gates[1][key] == pytest.approx(gates[0][key], rel=1e-4), key
