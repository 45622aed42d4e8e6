"""``kiln serve`` on a GPU: a real server process on a bfloat16 torch engine (CUDA graphs,
on-device sampling, the async engine loop), in the server's process and with
``--engine_process``, driven by the official openai client. What the server answers must be
what the same engine generates in this process: greedy text, stop strings cut where the text
first holds them, seeded sampling, and requests sent at once (decode graphs of several rows).

The CPU tests (tests/serve) run all of this on an onnx engine; no test had served a torch
engine on a GPU (the thirty-third session's list of GPU paths no GPU test reached).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kiln.builder import build
from kiln.runtime import LLM, SamplingParams
from tests.models import hf_model_with_tokenizer, kiln_checkpoint

pytestmark = pytest.mark.gpu
PROMPTS = ["Hello, GPU", "The quick brown fox", "kiln serve", "0123456789", "a", "Zz" * 20]
MAX_TOKENS = 24
IGNORE_EOS = {"ignore_eos": True}  # a random model's EOS would end some texts early


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    root = tmp_path_factory.mktemp("serve_gpu")
    ckpt = kiln_checkpoint(hf_model_with_tokenizer("llama-gqa", root / "hf"), root / "ckpt")
    build(ckpt, root / "engine", backend="torch", max_batch_size=8, max_seq_len=64,
          dtype="bfloat16")
    return root / "engine"


@pytest.fixture(scope="module")
def local(engine):
    """Greedy texts and seeded samples of the engine in this process, on the same GPU."""
    with LLM(engine) as llm:
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        texts = [r.text for r in llm.generate(PROMPTS, greedy)]
        seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=MAX_TOKENS,
                                ignore_eos=True)
        sampled = llm.generate([PROMPTS[0]], seeded)[0].text
    assert all(len(t) >= 8 for t in texts), texts  # enough text to cut with a stop string
    return texts, sampled


@pytest.fixture(scope="module", params=[False, True], ids=["in-server", "engine-process"])
def client(request, engine):
    import openai

    from tests.serve.conftest import API_KEY, ServerProcess

    args = ["--device", "cuda", "--max_queue", "16"]
    server = ServerProcess(engine, *args, *(["--engine_process"] if request.param else []))
    try:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    finally:
        assert server.stop() == 0


def _complete(client, prompt: str, **kwargs):
    from tests.serve.conftest import MODEL

    ask = dict(temperature=0, max_tokens=MAX_TOKENS, extra_body=IGNORE_EOS) | kwargs
    return client.completions.create(model=MODEL, prompt=prompt, **ask)


def test_greedy_text_is_the_engines_whole_and_streamed(client, local):
    texts, _ = local
    for prompt, want in zip(PROMPTS, texts, strict=True):
        out = _complete(client, prompt)
        assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == MAX_TOKENS
    chunks = list(_complete(client, PROMPTS[1], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == texts[1]


def test_requests_at_once_equal_each_alone(client, local):
    """Eight requests at once: prefills beside decodes, decode graphs of several rows."""
    texts, _ = local
    prompts = PROMPTS + PROMPTS[:2]
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda p: _complete(client, p).choices[0].text, prompts))
    assert outs == texts + texts[:2]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_cuts_the_text_where_it_first_appears(client, local, stream):
    texts, _ = local
    text = texts[1]
    start = next(i for i in range(2, len(text) - 2) if text.index(text[i:i + 2]) == i)
    stop = text[start:start + 2]
    out = _complete(client, PROMPTS[1], stop=[stop], stream=stream)
    if stream:
        chunks = list(out)
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        got, reason = out.choices[0].text, out.choices[0].finish_reason
    assert (got, reason) == (text[:start], "stop")


def test_seeded_sampling_is_the_engines(client, local):
    _, sampled = local
    out = _complete(client, PROMPTS[0], temperature=1.0, seed=11, n=2)
    assert out.choices[0].text == sampled  # the first choice takes the request's seed
    again = _complete(client, PROMPTS[0], temperature=1.0, seed=11, n=2)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
