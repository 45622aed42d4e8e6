"""`LLM.close()` from another thread on a torch engine: CUDA graphs, the paged cache and the
sampler's device buffers are freed only after the step under way (a trial's close under a
running onnx generate had exited 139); the running call and one waiting for it end with
EngineClosedError, and the GPU is usable afterwards."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kiln.builder import build
from kiln.runtime import LLM, SamplingParams
from kiln.runtime.errors import EngineClosedError
from tests.models import hf_model_with_tokenizer, kiln_checkpoint

pytestmark = pytest.mark.gpu
PROMPT = [1, 5, 9, 13, 17, 21]
LONG = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)


def test_close_from_another_thread_ends_running_and_waiting_calls(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    engine = tmp_path / "engine"
    ckpt = kiln_checkpoint(hf_model_with_tokenizer("llama-gqa", tmp_path / "hf"), tmp_path / "ckpt")
    build(ckpt, engine, backend="torch", max_batch_size=4, max_seq_len=64, dtype="bfloat16")
    llm = LLM(engine)
    want = llm.generate(PROMPT, LONG)[0].token_ids
    outcomes: dict[str, object] = {}
    stepped = threading.Event()
    step = llm._step

    def counted_step():
        stepped.set()
        return step()

    llm._step = counted_step

    def call(name):
        try:
            while True:  # generates until the LLM is closed under it
                outcomes[name] = llm.generate([PROMPT] * 4, LONG)
        except Exception as e:  # noqa: BLE001 - kept for the assertions
            outcomes[name] = e

    threads = [threading.Thread(target=call, args=(name,)) for name in ("running", "waiting")]
    for thread in threads:
        thread.start()
    assert stepped.wait(30)
    time.sleep(0.2)
    started = time.perf_counter()
    llm.close()
    closed_in = time.perf_counter() - started
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert all(isinstance(outcomes[n], EngineClosedError) for n in ("running", "waiting")), \
        outcomes
    assert closed_in < 2, f"close() took {closed_in:.2f} s"
    torch.cuda.synchronize()  # no fault left queued on the device
    with LLM(engine) as again:  # the memory the closed engine held is back
        assert again.generate(PROMPT, LONG)[0].token_ids == want
