"""The app in-process over mock executors (as test_app.py): what a new-user trial found to
differ from OpenAI's and vLLM's servers. Streams against the same request unstreamed, JSON
nulls, vLLM's extras, auth, /v1/models/{id}, chat roles, messages in the request's terms."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import pytest
import torch
from fastapi.testclient import TestClient

from kiln.runtime import LLM, AsyncLLM
from kiln.runtime.executor import SequenceChunk, StepLogits
from kiln.runtime.tokenizer import load_tokenizer
from kiln.serve import create_app
from tests.runtime.mocks import HashExecutor, ScriptedExecutor
from tests.serve.test_app import LIMITS

PROMPT = "The capital of France is"


class _ContextExecutor(HashExecutor):
    """A HashExecutor that returns context logits (an engine built --gather_context_logits)."""

    gathers_context_logits = True

    def step_logits(self, chunks: Sequence[SequenceChunk], pending=None) -> StepLogits:
        starts = [c.start for c in chunks]
        last = self.step(chunks)
        context = {i: torch.stack([self.logits(self.history[c.slot][:start + j + 1])
                                   for j in range(len(c.tokens))])
                   for i, (c, start) in enumerate(zip(chunks, starts, strict=True))
                   if c.context_logits}
        return StepLogits(last, context)


@pytest.fixture
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture
def open_engines():
    engines = []
    yield engines
    for engine in engines:
        engine.close()


@pytest.fixture
def make_client(tokenizer, open_engines):
    """A TestClient over a new engine on ``executor`` (default: a context-logits one)."""
    def make(executor=None, **options) -> TestClient:
        executor = executor or _ContextExecutor(LIMITS, tokenizer.vocab_size)
        engine = AsyncLLM(LLM.from_executor(executor, tokenizer))
        open_engines.append(engine)
        return TestClient(create_app(engine, "m", **options))
    return make


def _events(out) -> list[dict]:
    assert out.status_code == 200, out.text
    lines = [line[len("data: "):] for line in out.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _merged_logprobs(chunks: list[dict]) -> dict[str, list]:
    merged: dict[str, list] = {}
    for chunk in chunks:
        for key, values in (chunk["choices"][0]["logprobs"] or {}).items():
            merged.setdefault(key, []).extend(values)
    return merged


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_whole_responses(make_client, echo):
    """A trial's streamed chunks each had text_offset [0] (unstreamed: [0, 6, 7]); with echo,
    the first chunk had the prompt's text but not its logprobs."""
    client = make_client()
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1,
            "ignore_eos": True, "echo": echo}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert _merged_logprobs(chunks) == whole["logprobs"]
    offsets = whole["logprobs"]["text_offset"]
    assert len(set(offsets)) == len(offsets) > 1
    first = chunks[0]["choices"][0]
    assert first["text"].startswith(PROMPT) == echo
    # with echo, the prompt's tokens in the first chunk, the first one unscored
    assert (len(first["logprobs"]["tokens"]) > 1) == echo
    assert (first["logprobs"]["token_logprobs"][0] is None) == echo


def test_streamed_echo_scoring_without_generation(make_client):
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 0, "logprobs": 0, "echo": True}
    client = make_client()
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert len(chunks) == 1 and chunks[0]["choices"][0]["text"] == PROMPT
    assert chunks[0]["choices"][0]["logprobs"] == whole["logprobs"]
    assert chunks[0]["choices"][0]["finish_reason"] == "length"


def _scripted(tokenizer, prompt: list[int], text: str) -> tuple[ScriptedExecutor, list[int]]:
    script = tokenizer.encode(text, add_special_tokens=False)
    eos = tokenizer.eos_token_ids[0]
    return ScriptedExecutor(LIMITS, tokenizer.vocab_size, len(prompt), script, eos), script


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_stop_token_ids_end_the_request_and_streams_say_stop_reason(make_client, tokenizer,
                                                                    endpoint):
    """stop_token_ids had been ignored; stream chunks had no stop_reason (vLLM's, which the
    unstreamed response has): null but in the chunk with the finish_reason."""
    if endpoint == "/v1/completions":
        prompt = [5, 6, 7]
        body = {"prompt": prompt}
    else:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        prompt = tokenizer.encode("<hi>", add_special_tokens=False)
    executor, script = _scripted(tokenizer, prompt, " one two three four")
    client = make_client(executor, chat_template="{% for m in messages %}<{{ m.content }}>"
                                                 "{% endfor %}")
    body = {"model": "m", "max_tokens": 10, "stop_token_ids": [script[2]], **body}
    whole = client.post(endpoint, json=body).json()
    assert whole["usage"]["completion_tokens"] == 3
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["choices"][0]["stop_reason"] == script[2]
    chunks = [c["choices"][0] for c in _events(client.post(endpoint, json={**body,
                                                                           "stream": True}))]
    assert all("stop_reason" in c for c in chunks), chunks
    assert [c["stop_reason"] for c in chunks if c["finish_reason"] is None] \
        == [None] * (len(chunks) - 1)
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["stop_reason"] == script[2]


@pytest.mark.parametrize("include, text", [(False, " one two"), (True, " one two three")])
def test_include_stop_str_in_output(make_client, tokenizer, include, text):
    executor, _ = _scripted(tokenizer, [5, 6, 7], " one two three four")
    client = make_client(executor)
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 10, "stop": " three",
            "include_stop_str_in_output": include}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == text and choice["stop_reason"] == " three"
    chunks = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == text


@pytest.mark.parametrize("skip", [True, False, None])
def test_skip_special_tokens_is_sampling_params(make_client, tokenizer, skip):
    """vLLM's skip_special_tokens false keeps a special token in the text (it had been refused
    as an extra kiln does not implement; SamplingParams has it); true or absent leaves it out."""
    special = tokenizer.encode("<|im_start|>", add_special_tokens=False)
    assert len(special) == 1, special  # SmolLM2's: one special token
    script = (tokenizer.encode(" one", add_special_tokens=False) + special
              + tokenizer.encode(" two", add_special_tokens=False))
    executor = ScriptedExecutor(LIMITS, tokenizer.vocab_size, 3, script,
                                tokenizer.eos_token_ids[0])
    client = make_client(executor)
    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": len(script)}
    if skip is not None:
        body["skip_special_tokens"] = skip
    out = client.post("/v1/completions", json=body)
    assert out.status_code == 200, out.text
    want = " one<|im_start|> two" if skip is False else " one two"
    assert out.json()["choices"][0]["text"] == want
    chunks = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == want


def test_stop_token_ids_outside_the_vocabulary_are_400_naming_them(make_client, tokenizer):
    """By the entry at fault, as the other stop_token_ids refusals (param had been the list)."""
    out = make_client().post("/v1/completions", json={
        "model": "m", "prompt": "a", "stop_token_ids": [0, tokenizer.vocab_size]})
    assert out.status_code == 400 and out.json()["error"]["param"] == "stop_token_ids[1]"
    out = make_client().post("/v1/completions", json={
        "model": "m", "prompt": "a", "stop_token_ids": [1e300]})  # a whole float: an id
    assert out.status_code == 400 and out.json()["error"]["param"] == "stop_token_ids[0]"
    assert out.json()["error"]["message"].startswith(
        "stop_token_ids[0]: a token id, an integer of about 301 digits, is outside")


NULLS = {"n": None, "stream": None, "stream_options": None, "max_tokens": None,
         "temperature": None, "top_p": None, "top_k": None, "min_p": None, "stop": None,
         "seed": None, "presence_penalty": None, "frequency_penalty": None,
         "repetition_penalty": None, "ignore_eos": None, "stop_token_ids": None,
         "include_stop_str_in_output": None, "logit_bias": None, "user": None}


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "a", "echo": None, "logprobs": None, "best_of": None,
                         "suffix": None, **NULLS}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "logprobs": None, "top_logprobs": None,
                              "max_completion_tokens": None, "add_generation_prompt": None,
                              "tools": None, "response_format": None, **NULLS}),
])
def test_null_is_the_default(make_client, endpoint, body):
    """OpenAI's API takes null for optional fields (the default): "n": null had been a 400."""
    client = make_client(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    out = client.post(endpoint, json={"model": "m", **body})
    assert out.status_code == 200, out.text
    assert len(out.json()["choices"]) == 1 and out.json()["choices"][0]["logprobs"] is None
    out = client.post(endpoint, json={"model": "m", **body, "stream": True,
                                      "stream_options": {"include_usage": None}})
    assert out.status_code == 200 and out.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "a"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
])
@pytest.mark.parametrize("stream", [{}, {"stream": False}, {"stream": None}])
@pytest.mark.parametrize("options", [{"include_usage": True}, {}])
def test_stream_options_without_stream_is_400(make_client, endpoint, body, stream, options):
    """OpenAI's 400; a retest's had been taken and ignored (no usage chunk: no stream)."""
    client = make_client(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    out = client.post(endpoint, json={"model": "m", "max_tokens": 1, **body, **stream,
                                      "stream_options": options})
    assert out.status_code == 400
    assert out.json()["error"] == {
        "message": "stream_options is only allowed with stream: true; set stream: true, or "
                   "send the request without stream_options",
        "type": "invalid_request_error", "param": "stream_options", "code": None}


STREAM_OPTIONS = 'stream_options must be an object like {"include_usage": true}'


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "a"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
])
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("options, param, message", [
    (5, "stream_options", STREAM_OPTIONS + ", found a number 5"),
    ([], "stream_options", STREAM_OPTIONS + ", found an array []"),
    ("include_usage", "stream_options", STREAM_OPTIONS + ', found a string "include_usage"'),
    ({"include_usage": "yes"}, "stream_options.include_usage",
     'stream_options.include_usage is a string "yes"; give true or false'),
    ({"include_usage": 1}, "stream_options.include_usage",
     "stream_options.include_usage is a number 1; give true or false"),
])
def test_stream_options_of_the_wrong_form_are_told_in_kilns_words(make_client, endpoint, body,
                                                                 stream, options, param,
                                                                 message):
    """A retest: these were told pydantic's "stream_options: Input should be a valid dictionary
    or instance of StreamOptions" and "stream_options.include_usage: Input should be a valid
    boolean", with the param stream_options for both."""
    out = make_client().post(endpoint, json={"model": "m", "max_tokens": 1, **body,
                                             "stream": stream, "stream_options": options})
    assert out.status_code == 400
    assert out.json()["error"] == {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": None}


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "a"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
])
@pytest.mark.parametrize("options, message", [
    ({"continuous_usage_stats": True}, "stream_options.continuous_usage_stats is not supported "
     "by kiln serve (it takes include_usage: true, the usage in a last chunk); send the "
     "request without it"),
    ({"include_usage": True, "continuous_usage_stats": "yes"},
     'stream_options.continuous_usage_stats is a string "yes"; give true or false'),
])
def test_continuous_usage_stats_is_refused_by_name(make_client, endpoint, body, options,
                                                   message):
    """vLLM's usage in every chunk: a retest's had been taken, and no chunk carried usage."""
    out = make_client().post(endpoint, json={"model": "m", "max_tokens": 1, **body,
                                             "stream": True, "stream_options": options})
    assert out.status_code == 400
    assert out.json()["error"] == {"message": message, "type": "invalid_request_error",
                                   "param": "stream_options.continuous_usage_stats",
                                   "code": None}


@pytest.mark.parametrize("options, usage", [
    ({"include_usage": True, "continuous_usage_stats": False}, True),
    ({"continuous_usage_stats": None}, False),
    # unknown keys are ignored, as unknown request fields are, with a warning (OpenAI's newer
    # include_obfuscation; a misspelt include_usage asks for nothing: test_app.py)
    ({"include_usage": True, "include_obfuscation": True}, True),
    ({"include_usge": True}, False),
])
def test_stream_options_that_ask_nothing_kiln_lacks_are_taken(make_client, options, usage):
    out = make_client().post("/v1/completions", json={
        "model": "m", "prompt": "a", "max_tokens": 2, "stream": True, "stream_options": options})
    chunks = _events(out)
    assert ("usage" in chunks[-1] and chunks[-1]["choices"] == []) == usage


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "a", "logit_bias": {}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": [],
                              "tool_choice": "none", "response_format": {"type": "text"},
                              "function_call": "none", "parallel_tool_calls": False,
                              "echo": False, "continue_final_message": False, "best_of": 1}),
])
def test_unsupported_fields_that_ask_nothing_are_taken(make_client, endpoint, body):
    """A client library's defaults (logit_bias {}, response_format text) had been 400s."""
    client = make_client(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    out = client.post(endpoint, json={"model": "m", "max_tokens": 2, **body})
    assert out.status_code == 200, out.text


@pytest.mark.parametrize("field, value", [("logit_bias", []), ("tools", {}),
                                          ("response_format", {"type": "json_object"}),
                                          ("tool_choice", "auto"), ("logit_bias", {"5": 1})])
def test_unsupported_fields_of_another_type_or_value_stay_400s(make_client, field, value):
    out = make_client().post("/v1/completions", json={"model": "m", "prompt": "a",
                                                      field: value})
    assert out.status_code == 400 and out.json()["error"]["param"] == field, out.text


@pytest.mark.parametrize("field, value", [
    ("min_tokens", 10), ("bad_words", ["x"]), ("allowed_token_ids", [1, 2]),
    ("allowed_token_ids", []), ("logprob_token_ids", [1]), ("logits_processors", ["m.f"]),
    ("truncate_prompt_tokens", 5), ("truncate_prompt_tokens", -1), ("use_beam_search", True),
    ("add_special_tokens", False), ("priority", 1),
    ("return_tokens_as_token_ids", True), ("return_token_ids", True),
    ("repetition_detection", {"max_pattern_size": 4}), ("thinking_token_budget", 100),
    ("watermarking", True), ("vllm_xargs", {"k": 1})])
def test_vllms_extras_kiln_does_not_implement_are_refused_by_name(make_client, field, value):
    """vLLM's sampling extras had been ignored with a warning: a min_tokens 10 got fewer."""
    client = make_client(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    for endpoint, body in [("/v1/completions", {"prompt": "a"}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "a"}]})]:
        if field == "add_special_tokens" and endpoint == "/v1/chat/completions":
            value = True  # (chat's default is false: the template adds them)
        out = client.post(endpoint, json={"model": "m", "max_tokens": 1, **body, field: value})
        error = out.json()["error"]
        assert out.status_code == 400 and error["param"] == field, error
        assert error["message"] == f"{field} is not supported by kiln serve; send the request " \
                                   f"without it", error


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "a", "add_special_tokens": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "add_special_tokens": False, "chat_template_kwargs": {},
                              "documents": []}),
])
def test_vllms_extras_at_their_defaults_are_taken_unwarned(make_client, caplog, endpoint, body):
    """What vLLM's own clients send as defaults asks for nothing: taken, and not warned of."""
    defaults = {"min_tokens": 0, "bad_words": [], "allowed_token_ids": None,
                "logits_processors": [], "truncate_prompt_tokens": None,
                "use_beam_search": False, "skip_special_tokens": True, "priority": 0,
                "return_tokens_as_token_ids": False, "return_token_ids": None,
                "thinking_token_budget": -1, "watermarking": False, "vllm_xargs": {},
                "spaces_between_special_tokens": False}
    client = make_client(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    with caplog.at_level(logging.WARNING, logger="kiln.serve.render"):
        out = client.post(endpoint, json={"model": "m", "max_tokens": 1, **body, **defaults})
    assert out.status_code == 200, out.text
    assert caplog.records == []


@pytest.mark.parametrize("field, value", [("chat_template_kwargs", {"enable_thinking": False}),
                                          ("documents", [{"title": "a", "text": "b"}]),
                                          ("add_special_tokens", True)])
def test_vllms_chat_template_extras_are_refused_by_name(make_client, field, value):
    """vLLM gives them to the chat template (documents: a RAG template's); kiln's does not."""
    out = make_client(chat_template="{{ messages[0].content }}").post(
        "/v1/chat/completions", json={"model": "m", "max_tokens": 1, field: value,
                                      "messages": [{"role": "user", "content": "a"}]})
    assert out.status_code == 400 and out.json()["error"]["param"] == field, out.text


def test_a_required_field_stays_required(make_client):
    out = make_client().post("/v1/completions", json={"model": "m", "prompt": None})
    assert out.status_code == 400 and out.json()["error"]["param"] == "prompt"


def test_top_k_minus_1_is_off_as_0(make_client):
    """vLLM's "off" is -1: it had been a 400."""
    client = make_client()
    body = {"model": "m", "prompt": "a", "max_tokens": 4, "seed": 3, "temperature": 1}
    texts = {client.post("/v1/completions", json={**body, "top_k": k}).json()["choices"][0]
             ["text"] for k in (-1, 0)}
    assert len(texts) == 1
    out = client.post("/v1/completions", json={**body, "top_k": -2})
    assert out.status_code == 400 and out.json()["error"]["param"] == "top_k"
    assert "or 0 or -1 (off), found a number -2" in out.json()["error"]["message"]


@pytest.mark.parametrize("header, status", [
    ("Bearer key", 200), ("bearer key", 200), ("BEARER key", 200), ("Bearer  key ", 200),
    ("Bearer wrong", 401), ("Basic key", 401), ("key", 401), ("", 401), ("bearer", 401)])
def test_the_auth_scheme_is_case_insensitive(make_client, header, status):
    out = make_client(api_key="key").get("/v1/models", headers={"Authorization": header})
    assert out.status_code == status, out.text


def test_models_retrieve(make_client):
    """GET /v1/models/{id} (the openai client's models.retrieve) had been a 404."""
    client = make_client(api_key="key")
    auth = {"Authorization": "Bearer key"}
    listed = client.get("/v1/models", headers=auth).json()["data"][0]
    one = client.get("/v1/models/m", headers=auth)
    assert one.status_code == 200
    assert {**one.json(), "created": 0} == {**listed, "created": 0}
    out = client.get("/v1/models/org/other", headers=auth)
    error = out.json()["error"]
    assert out.status_code == 404 and error["code"] == "model_not_found", error
    assert error["type"] == "not_found_error" and "'org/other'" in error["message"]
    assert client.get("/v1/models/m").status_code == 401


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "a"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
])
def test_a_request_without_model_is_for_the_served_one(make_client, endpoint, body):
    """vLLM's server takes a request without model; kiln's had said "model is required" (and
    ``"model": ""`` is vLLM's served model too: it had been a 404)."""
    client = make_client(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    body = {"max_tokens": 1, **body}
    for given in ({}, {"model": None}, {"model": ""}):
        out = client.post(endpoint, json={**body, **given})
        assert out.status_code == 200, out.text
        assert out.json()["model"] == "m"
    chunks = _events(client.post(endpoint, json={**body, "stream": True}))
    assert {chunk["model"] for chunk in chunks} == {"m"}
    out = client.post(endpoint, json={**body, "model": "other"})
    assert out.status_code == 404 and out.json()["error"]["code"] == "model_not_found"


def test_the_model_dir_as_typed_is_the_served_model_too(make_client):
    """kiln serve --model_dir hf/ serves "hf"; a client sending "hf/", as typed (vLLM's name),
    had got a 404, and "./hf" still did (retest 48). Any spelling of the same path is answered
    as the served name; another name stays a 404."""
    client = make_client(also_named=("m/",))
    for model in ("m", "m/", "./m", "m//", "m/."):
        out = client.post("/v1/completions", json={"model": model, "prompt": "a",
                                                   "max_tokens": 1})
        assert out.status_code == 200 and out.json()["model"] == "m", out.text
    for model in ("m/x", "../m", "/m", "mm"):
        out = client.post("/v1/completions", json={"model": model, "prompt": "a",
                                                   "max_tokens": 1})
        assert out.status_code == 404, model
    assert [card["id"] for card in client.get("/v1/models").json()["data"]] == ["m"]


CALL = {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}


@pytest.mark.parametrize("calls", [{"tool_calls": [CALL]},
                                   {"function_call": {"name": "w", "arguments": "{}"}}])
def test_a_replayed_tool_call_reaches_the_template_as_given(make_client, tokenizer, caplog,
                                                            calls):
    """A trial: an assistant message of tool_calls and "content": null (what a client replays
    of a conversation that called a tool) was a 400. Its content is "" to the template, as
    vLLM's; its calls, and the tool message's tool_call_id, reach it as given, unwarned."""
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments }}"
                "{% endfor %}{{ m.function_call.name if m.function_call }}"
                "{{ m.tool_call_id or '' }};{% endfor %}")
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": None, **calls},
                {"role": "tool", "tool_call_id": "c1", "content": "b"}]
    with caplog.at_level(logging.WARNING, logger="kiln.serve.render"):
        out = make_client(chat_template=template).post("/v1/chat/completions", json={
            "model": "m", "max_tokens": 1, "messages": messages})
    assert out.status_code == 200, out.text
    rendered = "user:a;assistant:w" + ("{}" if "tool_calls" in calls else "") + ";tool:bc1;"
    assert out.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered, False))
    assert caplog.records == []


@pytest.mark.parametrize("arguments, rendered, warned", [
    ('{"city": "Paris", "days": [1, 2]}', '{"city": "Paris", "days": [1, 2]}', None),
    ({"city": "Paris"}, '{"city": "Paris"}', None),  # (vLLM takes an object as it is)
    ("", "{}", None), (None, "{}", None), (..., "{}", None),
    ("{'city': 'Paris'}", "{}", "is not JSON"), ("[1]", "{}", "is an array in JSON"),
    ("42", "{}", "is a number in JSON")])
def test_a_tool_calls_arguments_reach_the_template_parsed(make_client, tokenizer, caplog,
                                                          arguments, rendered, warned):
    """As vLLM's chat_utils (_postprocess_messages): OpenAI's JSON string of arguments is an
    object to the template, for ``arguments | tojson`` (it had been the string, written again
    as a JSON string); what is no JSON object is {} (with a WARNING), as vLLM's."""
    template = ("{% for m in messages %}{{ m.content }}{% for c in m.tool_calls or [] %}"
                "{{ c.function.arguments | tojson }}{% endfor %};{% endfor %}")
    function = {"name": "weather"} if arguments is ... else \
        {"name": "weather", "arguments": arguments}
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": function}]}]
    with caplog.at_level(logging.WARNING, logger="kiln.serve.render"):
        out = make_client(chat_template=template).post("/v1/chat/completions", json={
            "model": "m", "max_tokens": 1, "messages": messages})
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(f"a;{rendered};", False))
    said = [r.getMessage() for r in caplog.records]
    if warned is None:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith(
            f'messages[1].tool_calls[0].function.arguments (of tool "weather") {warned}'), said


@pytest.mark.parametrize("depth", [513, 990, 5000])
@pytest.mark.parametrize("kind", ["object", "array"])
def test_tool_call_arguments_nested_too_deeply_are_400(make_client, depth, kind):
    """JSON in a string, past the body's own depth check: 5000 levels had been a 500 (Python's
    json out of recursion), as a template's tojson would be nearer its limit; arrays alike (a
    retest's 513-600 levels of them had been taken, as {})."""
    arguments = ('{"a": ' * depth + "1" + "}" * depth if kind == "object"
                 else "[" * depth + "1" + "]" * depth)
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "f", "arguments": arguments}}]}]
    out = make_client(chat_template="{{ messages[0].content }}").post(
        "/v1/chat/completions", json={"model": "m", "max_tokens": 1, "messages": messages})
    error = out.json()["error"]
    path = "messages[1].tool_calls[0].function.arguments"
    assert out.status_code == 400 and error["param"] == path, error
    assert error["message"].startswith(f"{path} is JSON nested deeper than 512 levels"), error


def test_an_empty_tool_calls_is_dropped_as_vllm_drops_it(make_client):
    """vLLM keeps the template on its plain assistant path; the template had seen []."""
    template = ("{% for m in messages %}{{ m.content }}{% if 'tool_calls' in m %}the calls "
                "are these{% endif %};{% endfor %}")
    client = make_client(chat_template=template)
    tokens = {}
    for calls in ({}, {"tool_calls": []}):
        out = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 1,
                                                        "messages": [{"role": "user",
                                                                      "content": "a"},
                                                                     {"role": "assistant",
                                                                      "content": "b", **calls}]})
        assert out.status_code == 200, out.text
        tokens[len(calls)] = out.json()["usage"]["prompt_tokens"]
    assert tokens[0] == tokens[1]


def test_a_chat_role_openai_does_not_know_is_400(make_client):
    client = make_client(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    body = {"model": "m", "max_tokens": 1}
    out = client.post("/v1/chat/completions", json={**body, "messages": [
        {"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]})
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == "messages[1].role", error
    assert error["message"] == ('messages[1].role "wizard" is not a chat role; use one of '
                                "system, developer, user, assistant, tool, function")
    out = client.post("/v1/chat/completions", json={**body, "messages": [
        {"role": "developer", "content": "a"}, {"role": "user", "content": "b"}]})
    assert out.status_code == 200, out.text


TEXT = "a" + " a" * 29  # 30 tokens


def _context_error(prompt_tokens: int, asked: int, label: str = "") -> str:
    """vLLM's (and OpenAI's) words; LIMITS' context (max_model_len) is max_seq_len + 1."""
    return (f"{label}This model's maximum context length is 65 tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the "
            f"completion). Please reduce the length of the messages or completion.")


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": [1] * 30, "max_tokens": 36}, "max_tokens", _context_error(30, 36)),
    ({"prompt": [1] * 30, "max_tokens": 36, "n": 2, "stream": True}, "max_tokens",
     _context_error(30, 36)),
    ({"prompt": [1] * 2, "max_tokens": 1e30}, "max_tokens", _context_error(2, int(1e30))),
    ({"prompt": [[1], [1] * 30], "max_tokens": 36}, "max_tokens",
     _context_error(30, 36, "prompt[1]: ")),
    ({"prompt": ["a", TEXT], "max_tokens": 36, "n": 2}, "max_tokens",
     _context_error(30, 36, "prompt[1]: ")),
    ({"messages": [{"role": "user", "content": TEXT}], "max_tokens": 36}, "max_tokens",
     _context_error(30, 36)),
    ({"messages": [{"role": "user", "content": TEXT}], "max_completion_tokens": 36,
      "max_tokens": 1}, "max_completion_tokens", _context_error(30, 36)),
])
def test_a_max_tokens_the_prompt_leaves_no_room_for_is_400(make_client, tokenizer, open_engines,
                                                           body, param, message):
    """As vLLM and OpenAI refuse it: kiln had run it to the end of the context, finish_reason
    length (``"max_tokens": 1e30`` too). Each prompt of a list is checked, named; none of the
    request's engine requests is left running."""
    assert len(tokenizer.encode(TEXT)) == 30  # (the text's length, as the messages say)
    client = make_client(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    out = client.post(endpoint, json={"model": "m", **body})
    assert out.status_code == 400, out.text
    assert out.json()["error"] == {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": "context_length_exceeded"}
    assert not open_engines[0].llm.core.requests


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": [1] * 30, "max_tokens": 35}),  # to the context's end
    ("/v1/completions", {"prompt": [[1], [1] * 30], "max_tokens": 35, "n": 2}),
    ("/v1/completions", {"prompt": [1] * 32}),  # the default max_tokens: cut to the room
    # scoring: nothing generated, the prompt as long as the engine takes
    ("/v1/completions", {"prompt": [1] * 32, "max_tokens": 0, "echo": True, "logprobs": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TEXT}],
                              "max_completion_tokens": 35}),
])
def test_a_max_tokens_that_fits_or_the_default_is_taken(make_client, endpoint, body):
    client = make_client(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    out = client.post(endpoint, json={"model": "m", **body})
    assert out.status_code == 200, out.text


def test_a_prompt_alone_too_long_keeps_the_engines_refusal(make_client):
    """The prompt is at fault, whatever max_tokens asks: the engine's message, naming it."""
    out = make_client().post("/v1/completions", json={"model": "m", "prompt": [1] * 33,
                                                      "max_tokens": 40})
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == "prompt", error
    assert error["message"].startswith("prompt of 33 tokens exceeds the engine's max_input_len "
                                       "32"), error


@pytest.mark.parametrize("endpoint, body, param, message", [
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens",
     "max_tokens must be an integer >= 1 (0 only with echo: true and logprobs, to score the "
     "prompt), found a number -1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": -1},
     "max_tokens", "max_tokens must be an integer >= 1, found a number -1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "max_completion_tokens": -3},
     "max_completion_tokens", "max_completion_tokens must be an integer >= 1, found a number -3"),
])
def test_negative_max_tokens_is_400_in_the_requests_terms(make_client, endpoint, body, param,
                                                           message):
    """The message had spoken of prompt_logprobs, a Python-API name no request has."""
    out = make_client(chat_template="{{ messages[0].content }}").post(
        endpoint, json={"model": "m", **body})
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == param and error["message"] == message
