"""``kiln serve --model_dir HF_DIR`` as a real process (issue 16): the engine is built through
the build cache with the build options given, served under the model dir's name, held while
serving (a prune leaves it) and let go when the server stops."""

from __future__ import annotations

import json

import openai
import pytest

from kiln.build_cache.store import EngineCache
from kiln.runtime import LLM
from tests.models import hf_model_with_tokenizer
from tests.serve.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow


def test_a_model_dir_is_built_served_and_held(tmp_path, monkeypatch):
    hf = hf_model_with_tokenizer("llama-gqa", tmp_path / "model")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))  # the server inherits it
    cache = EngineCache()
    # given as a shell completes a dir (a trial's clients had to send the slash too)
    process = ServerProcess(f"{hf}/", "--max_batch_size", "2", source="--model_dir", name=None)
    try:
        client = openai.OpenAI(base_url=f"{process.url}/v1", api_key=API_KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == [str(hf)]
        text = client.completions.create(model=str(hf), prompt="Hello", max_tokens=6,
                                         temperature=0).choices[0].text
        as_typed = client.completions.create(model=f"{hf}/", prompt="Hello", max_tokens=6,
                                             temperature=0)  # (a 404 before)
        assert as_typed.model == str(hf) and as_typed.choices[0].text == text
        (entry,) = cache.entries()
        limits = json.loads((entry.engine_dir / "config.json").read_text())["limits"]
        assert limits["max_batch_size"] == 2
        pruned = cache.prune(everything=True)
        assert pruned.removed == [] and [e.name for e in pruned.in_use] == [entry.name]
    finally:
        assert process.stop() == 0
    with LLM(entry.engine_dir) as llm:
        assert llm.generate("Hello", llm.default_params.replace(
            temperature=0, max_tokens=6))[0].text == text
    assert [e.name for e in cache.prune(everything=True).removed] == [entry.name]
