"""The app in-process (fastapi's TestClient) over a mock executor with the real SmolLM2
tokenizer: request validation, body limits, echo on an engine without context logits, custom
chat templates, health, error shapes. No model runs, so these take milliseconds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import re
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from kiln.engine import BuildLimits
from kiln.errors import ConfigError
from kiln.runtime import LLM, AsyncLLM, SamplingParams
from kiln.runtime.async_llm import INLINE_ENCODE_CHARS
from kiln.runtime.errors import WorkerError
from kiln.runtime.tokenizer import NOT_UTF8, load_tokenizer
from kiln.serve import create_app
from kiln.serve.app import MAX_JSON_DEPTH
from kiln.serve.state import Job
from tests.runtime.mocks import CapacityExecutor, HashExecutor, SlowExecutor

LIMITS = BuildLimits(max_batch_size=2, max_input_len=32, max_seq_len=64, max_num_tokens=32)
FORMS = ("prompt must be a string, a list of strings, a list of token ids (integers) or a list "
         "of such lists")


@pytest.fixture
def engine(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    llm = LLM.from_executor(HashExecutor(LIMITS, tokenizer.vocab_size), tokenizer)
    engine = AsyncLLM(llm)
    yield engine
    engine.close()


def _client(engine, **options) -> TestClient:
    return TestClient(create_app(engine, "m", **options))


def test_an_integer_is_a_float(engine):
    out = _client(engine).post("/v1/completions", json={"model": "m", "prompt": "a",
                                                        "max_tokens": 2, "temperature": 1,
                                                        "top_p": 1})
    assert out.status_code == 200, out.text


def test_completion_and_chat(engine):
    client = _client(engine, chat_template="{% for m in messages %}<{{ m.content }}>{% endfor %}")
    out = client.post("/v1/completions", json={"model": "m", "prompt": [5, 6, 7],
                                               "max_tokens": 3, "temperature": 0})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    chat = client.post("/v1/chat/completions", json={
        "model": "m", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert chat.status_code == 200
    assert chat.json()["usage"]["prompt_tokens"] == len(engine.llm.tokenizer.encode("<hi>", False))
    stream = client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 2,
                                                  "stream": True})
    assert stream.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "stop": [""]}, "stop[0]"),
    ({"prompt": "a", "echo": True, "logprobs": 1, "max_tokens": 0}, "echo"),
    # strict types, as OpenAI's (a trial's "5", true and "yes" were taken as 5, 1 and true)
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "seed": 1e30}, "seed"),
])
def test_invalid_parameter_is_400_naming_it(engine, body, param):
    out = _client(engine).post("/v1/completions", json={"model": "m", **body})
    assert out.status_code == 400, out.text
    error = out.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


STOP = "stop must be a string or a list of strings"


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stop, param, message", [
    ([None], "stop[0]", "stop[0] is null; " + STOP),
    (["x", 5], "stop[1]", "stop[1] is a number 5; " + STOP),
    (5, "stop", STOP + ", found a number 5"),
    ({"a": "b"}, "stop", STOP + ', found an object {"a": "b"}'),
    # trial 38: [""] had the param stop, and "" was told of an index it had not
    (["x", ""], "stop[1]", "stop has an empty string at index 1; each stop must be a non-empty "
                           "string"),
    ("", "stop", "stop is an empty string; give the text to stop at, or leave stop out"),
    # a retest's ["\udc80"] was told of the tuple SamplingParams holds, ('\udc80',), as stop
    (["x", "\udc80"], "stop[1]", 'stop[1] is a string "\\udc80"; ' + NOT_UTF8),
    ("a\udc80", "stop", 'stop is a string "a\\udc80"; ' + NOT_UTF8),
])
def test_a_stop_of_no_string_form_names_the_wrong_value(engine, endpoint, stop, param, message):
    """A retest: these were told pydantic's "stop.str: Input should be a valid string"."""
    body = ({"prompt": "a"} if endpoint == "/v1/completions"
            else {"messages": [{"role": "user", "content": "a"}]})
    out = _client(engine).post(endpoint, content=json.dumps({"model": "m", "stop": stop, **body}),
                               headers={"content-type": "application/json"})
    assert out.status_code == 400
    assert out.json()["error"] == {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": None}


IDS = "stop_token_ids must be a list of token ids (integers >= 0)"


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("ids, param, message", [
    ([None], "stop_token_ids[0]", "stop_token_ids[0] is null; " + IDS),
    ([1, "a"], "stop_token_ids[1]", 'stop_token_ids[1] is a string "a"; ' + IDS),
    ([1.5], "stop_token_ids[0]", "stop_token_ids[0] is a number 1.5; " + IDS),
    ([True], "stop_token_ids[0]", "stop_token_ids[0] is true; " + IDS),
    ([2, -1], "stop_token_ids[1]", "stop_token_ids[1] is a number -1; " + IDS),
    (5, "stop_token_ids", IDS + ", found a number 5"),
    ("a", "stop_token_ids", IDS + ', found a string "a"'),
])
def test_stop_token_ids_of_no_id_form_name_the_wrong_entry(engine, endpoint, ids, param,
                                                           message):
    """A retest: [null] was told pydantic's "stop_token_ids.0: Input should be a valid
    integer", and [2, -1] SamplingParams' message naming no entry, both as stop_token_ids."""
    body = ({"prompt": "a"} if endpoint == "/v1/completions"
            else {"messages": [{"role": "user", "content": "a"}]})
    out = _client(engine).post(endpoint, json={"model": "m", "stop_token_ids": ids, **body})
    assert out.status_code == 400
    assert out.json()["error"] == {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": None}


def test_echo_logprobs_needs_context_logits(engine):
    out = _client(engine).post("/v1/completions", json={
        "model": "m", "prompt": "a b", "echo": True, "logprobs": 0, "max_tokens": 0})
    assert "--gather_context_logits" in out.json()["error"]["message"]


def test_chat_parameter_errors(engine):
    client = _client(engine)
    out = client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert out.status_code == 400 and out.json()["error"]["param"] == "messages"
    out = client.post("/v1/chat/completions", json={
        "model": "m", "top_logprobs": 2, "messages": [{"role": "user", "content": "x"}]})
    assert out.json()["error"]["param"] == "top_logprobs"


def test_chunked_body_over_the_limit_is_413(engine):
    client = _client(engine, max_body_bytes=1024)
    out = client.post("/v1/completions", content=iter([b"{" + b" " * 600, b" " * 600 + b"}"]))
    assert out.status_code == 413 and out.json()["error"]["code"] == "request_too_large"
    # the size in the units --max_body_bytes takes (a retest's "limit of 4194304 bytes")
    assert "the server's limit of 1 KiB (1024 bytes)" in out.json()["error"]["message"]


def test_a_body_over_the_limit_by_its_length_is_413_and_one_at_it_is_read(engine):
    client = _client(engine, max_body_bytes="1KiB")  # a size as kiln's other size keywords
    body = json.dumps({"model": "m", "prompt": "a", "max_tokens": 1, "user": ""})
    at_limit = body.replace('"user": ""', '"user": "' + "x" * (1024 - len(body)) + '"')
    assert len(at_limit) == 1024
    assert client.post("/v1/completions", content=at_limit).status_code == 200
    out = client.post("/v1/completions", content=at_limit.replace('"x', '"xx'))
    assert out.status_code == 413 and out.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(("size", "shown"), [(100, "100 is 100 bytes,"),
                                            (1023, "1023 is 1023 bytes,"),
                                            ("0.5KiB", "'0.5KiB' is 512 bytes,"),
                                            (1, "1 is 1 byte,"), (0, "0 is 0 bytes,"),
                                            (-1, "-1 is")])
def test_a_max_body_bytes_no_request_fits_in_is_refused_naming_the_keyword(engine, size, shown):
    """create_app(max_body_bytes=100) had served only 413s, where kiln serve --max_body_bytes
    100 is refused (tests/serve/test_cli.py): one check, the keyword named as given."""
    with pytest.raises(ConfigError) as info:
        create_app(engine, "m", max_body_bytes=size)
    # 0 and -1 had been told "at least 1 byte", as if 1 would do
    assert str(info.value) == (f"max_body_bytes {shown} too small for any real request (a "
                               f"short chat request is some hundred bytes); give 1KiB or more, "
                               f"like the default 4MiB")


def test_the_least_max_body_bytes_is_told_from_its_one_figure(engine, monkeypatch):
    """body_limit's advice had stated MIN_BODY_BYTES's 1 KiB a second time, in its text."""
    from kiln.serve import app

    monkeypatch.setattr(app, "MIN_BODY_BYTES", 2048)
    monkeypatch.setattr(app, "DEFAULT_MAX_BODY_BYTES", 8 * 1024 * 1024)
    with pytest.raises(ConfigError) as info:
        create_app(engine, "m", max_body_bytes=1024)
    assert str(info.value).endswith("; give 2KiB or more, like the default 8MiB")


@pytest.mark.parametrize("size, expected", [
    ("lots", "'lots' is not a size like 20GB, 512MiB or 2000000000 (a string, or a number of "
             "bytes)"),
    # kiln's other size keywords' words for a fraction of a byte (kiln.sizes.parse_size)
    (1.5, "1.5 is not a whole number of bytes; give bytes (an integer), or a size with its "
          "unit such as 20GB or 512MiB"),
    ("1.5", "'1.5' is not a whole number of bytes; give bytes (an integer), or a size with its "
            "unit such as 20GB or 512MiB")])
def test_a_max_body_bytes_of_no_size_is_refused_naming_the_keyword(engine, size, expected):
    with pytest.raises(ConfigError) as info:
        create_app(engine, "m", max_body_bytes=size)
    assert str(info.value) == f"max_body_bytes {expected}"


def test_unknown_route_and_not_json(engine):
    client = _client(engine)
    out = client.get("/v1/nope")
    assert out.status_code == 404 and "error" in out.json()
    assert client.post("/v1/completions", content=b"[1]").status_code == 400


def test_health_is_503_once_the_engine_is_closed(engine):
    client = _client(engine)
    assert client.get("/health").status_code == 200
    engine.close()
    assert client.get("/health").status_code == 503


class _DyingExecutor(HashExecutor):
    def step(self, chunks):
        raise WorkerError("replica 0 (pid 12) died: killed by SIGKILL")


def test_health_names_the_engines_failure(smollm2_dir):
    """Retest 45: after a --dp replica died, each request's 500 named it and /health said
    only "the engine is not running"."""
    tokenizer = load_tokenizer(smollm2_dir)
    engine = AsyncLLM(LLM.from_executor(_DyingExecutor(LIMITS, tokenizer.vocab_size),
                                        tokenizer))
    try:
        client = _client(engine)
        out = client.post("/v1/completions", json={"model": "m", "prompt": "a",
                                                   "max_tokens": 2})
        assert out.status_code == 500
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["error"] == {
            "message": "the engine failed: replica 0 (pid 12) died: killed by SIGKILL",
            "type": "server_error", "param": None, "code": "engine_error"}
    finally:
        engine.close()


def test_a_body_still_arriving_when_the_server_stops_is_a_503(engine):
    """Retest 45: a client stuck in its upload held the shutdown for the grace period and
    5 s more, then uvicorn's traceback; it is answered as the drain begins."""
    app = create_app(engine, "m")
    sent = []

    async def request() -> None:
        parts = [{"type": "http.request", "body": b'{"model": "m", ', "more_body": True}]

        async def receive() -> dict:
            if parts:
                return parts.pop()
            await asyncio.Event().wait()  # the rest never comes
            raise AssertionError

        async def send(message: dict) -> None:
            sent.append(message)

        async def stop() -> None:
            await asyncio.sleep(0.1)
            app.state.kiln.draining = True  # as kiln serve's first signal does
            app.state.kiln.stopping.set()
        stopping = asyncio.ensure_future(stop())
        await asyncio.wait_for(app(_scope("/v1/completions", 1000), receive, send), 5)
        await stopping
    asyncio.run(request())
    assert sent[0]["status"] == 503
    assert b"the server is shutting down" in sent[1]["body"]
    assert TestClient(app).get("/health").json()["error"]["message"] == (
        "the server is shutting down")



def test_a_client_gone_before_its_body_is_whole_is_a_quiet_499(engine, caplog):
    """Retest 48: a client that disconnected while sending its body put starlette's
    ClientDisconnect in uvicorn's log, a 67-line traceback; now a 499 and no log."""
    app = create_app(engine, "m")
    sent = []
    parts = [{"type": "http.disconnect"},
             {"type": "http.request", "body": b'{"messages": [', "more_body": True}]

    async def receive() -> dict:
        return parts.pop()

    async def send(message: dict) -> None:
        sent.append(message)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(asyncio.wait_for(app(_scope("/v1/chat/completions", 1000), receive, send),
                                     5))
    assert sent[0]["status"] == 499 and b"the client disconnected" in sent[1]["body"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _scope(path: str, length: int) -> dict:
    """An ASGI request's scope: a POST of JSON to ``path`` (``length`` bytes)."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80), "headers": [(b"content-type", b"application/json"),
                                                     (b"content-length", str(length).encode())]}


class _GatedExecutor(HashExecutor):
    """A step waits while ``gate`` is shut: an engine thread stuck in a step (a hung kernel)."""

    def __init__(self, limits: BuildLimits, vocab_size: int):
        super().__init__(limits, vocab_size)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def step(self, chunks):
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return super().step(chunks)



class _CountingExecutor(HashExecutor):
    """Records each step's number of sequences; a step takes 20 ms, as a model's would."""

    def __init__(self, limits: BuildLimits, vocab_size: int):
        super().__init__(limits, vocab_size)
        self.sizes: list[int] = []

    def step(self, chunks):
        self.sizes.append(len(chunks))
        time.sleep(0.02)
        return super().step(chunks)


@pytest.mark.parametrize("body", [{"prompt": "a", "n": 4}, {"prompt": ["a", "b", "c", "d"]}])
def test_a_request_s_choices_and_prompts_start_in_one_step(smollm2_dir, body):
    """Retest 48: each of a request's engine requests was submitted after the one before had
    been taken, a step apart, so n 8 ran 2.0 s against 0.5-0.8 for 8 requests of one choice.
    They are taken together and start in the same step."""
    tokenizer = load_tokenizer(smollm2_dir)
    executor = _CountingExecutor(dataclasses.replace(LIMITS, max_batch_size=4),
                                 tokenizer.vocab_size)
    engine = AsyncLLM(LLM.from_executor(executor, tokenizer))
    try:
        out = _client(engine).post("/v1/completions", json={"model": "m", "max_tokens": 1,
                                                            **body})
    finally:
        engine.close()
    assert out.status_code == 200 and len(out.json()["choices"]) == 4
    assert executor.sizes == [4]


def _health_when(client: TestClient, status: int) -> dict | None:
    """Poll /health until it answers ``status`` (within seconds); its JSON body, if any."""
    deadline = time.monotonic() + 10
    while (out := client.get("/health")).status_code != status:
        assert time.monotonic() < deadline, (out.status_code, out.text)
        time.sleep(0.02)
    return out.json() if out.content else None


def test_health_is_503_naming_an_engine_stalled_with_work_and_200_once_it_steps(smollm2_dir,
                                                                                  caplog,
                                                                                  monkeypatch):
    """A trial's engine stopped mid-run and /health stayed 200 while requests hung. An idle
    engine is never stalled, however long it waits; one that steps again is healthy again,
    each change logged once."""
    tokenizer = load_tokenizer(smollm2_dir)
    executor = _GatedExecutor(LIMITS, tokenizer.vocab_size)
    engine = AsyncLLM(LLM.from_executor(executor, tokenizer))
    monkeypatch.setattr("kiln.serve.app.MIN_STALL_TIMEOUT", 0.1)  # a stall told in a test's time
    try:
        with _client(engine, stall_timeout=0.2) as client, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            time.sleep(0.3)  # idle for longer than the timeout
            assert client.get("/health").status_code == 200
            assert client.get("/metrics").text.count(
                "kiln:seconds_since_engine_progress 0.0\n") == 1
            executor.gate.clear()
            future = pool.submit(client.post, "/v1/completions", json={
                "prompt": [5, 6], "max_tokens": 3, "ignore_eos": True})
            assert executor.entered.wait(10)
            body = _health_when(client, 503)
            assert body["error"]["code"] == "engine_stalled", body
            assert re.fullmatch(r"the engine has stalled: the engine thread has made no "
                                r"progress for \d+\.\d s with requests outstanding \(over "
                                r"stall_timeout=0.2\)", body["error"]["message"]), body
            [stall] = body["stalled"]
            assert stall["engine"] == "the engine thread" and stall["seconds"] > 0.2, body
            gauge = client.app.state.kiln.metrics.registry.get_sample_value
            assert gauge("kiln:seconds_since_engine_progress") > 0.2
            executor.gate.set()
            assert future.result(10).status_code == 200
            _health_when(client, 200)
    finally:
        executor.gate.set()
        engine.close()
    state_log = [r for r in caplog.records if r.name == "kiln.serve.state"]
    assert [r.levelno for r in state_log] == [logging.WARNING] * 2, state_log
    assert state_log[0].getMessage().startswith("the engine thread has made no progress for ")
    assert state_log[0].getMessage().endswith(": /health answers 503 until it does")
    assert state_log[1].getMessage() == ("the engine thread makes progress again (or has no "
                                         "request outstanding): the stall is over")


def test_a_stall_is_logged_as_it_begins_and_ends_with_no_probe(smollm2_dir, caplog,
                                                               monkeypatch):
    """The log tells an operator of a stall whether or not anything probes /health."""
    tokenizer = load_tokenizer(smollm2_dir)
    executor = _GatedExecutor(LIMITS, tokenizer.vocab_size)
    engine = AsyncLLM(LLM.from_executor(executor, tokenizer))
    monkeypatch.setattr("kiln.serve.app.MIN_STALL_TIMEOUT", 0.1)  # a stall told in a test's time
    state = create_app(engine, "m", stall_timeout=0.1).state.kiln

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "kiln.serve.state"]

    async def stall_then_step() -> None:
        executor.gate.clear()
        submitted = await state.submit([Job(0, [5, 6], SamplingParams(max_tokens=2))],
                                       "prompt")
        deadline = time.monotonic() + 10
        while not said():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        executor.gate.set()
        async for _ in submitted.deltas():
            pass
        while len(said()) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    try:
        asyncio.run(stall_then_step())
    finally:
        executor.gate.set()
        engine.close()
    assert said()[0].startswith("the engine thread has made no progress for "), said()
    assert said()[1].endswith("the stall is over") and len(said()) == 2, said()


@pytest.mark.parametrize("timeout, why", [
    *((seconds, f"{seconds} is too short to tell a stall (a dp replica reports once a second)")
      for seconds in (0, 0.5, -1.0)), (float("nan"), "nan is not a number"),
    ("5", "'5' is not a number"), (True, "True is not a number")])
def test_a_stall_timeout_below_the_floor_is_refused_naming_the_keyword(engine, timeout, why):
    """0.5 had been taken, and a healthy --dp server (its replicas report once a second)
    flapped 503/200."""
    with pytest.raises(ConfigError) as info:
        create_app(engine, "m", stall_timeout=timeout)
    assert str(info.value) == (f"stall_timeout={why}; give 5 seconds or more (inf: never) "
                               f"that an engine with requests outstanding may go without "
                               f"progress before /health answers 503, like the default 300")


@pytest.mark.parametrize("timeout", [5, float("inf")])
def test_a_stall_timeout_of_the_floor_or_inf_is_taken(engine, timeout):
    assert create_app(engine, "m", stall_timeout=timeout).state.kiln.stall_timeout == timeout


def test_max_queue_0_refuses_only_what_would_wait(engine):
    """Free engine slots take requests at once: --max_queue counts those beyond them (a trial
    found a burst of 3 refused by --max_queue 1 on a 16-slot engine)."""
    app = create_app(engine, "m", max_queue=0)
    client = TestClient(app)
    out = client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1})
    assert out.status_code == 200  # a free slot: nothing waits
    state = app.state.kiln
    for i in range(state.free_slots()):  # submitted requests that will take every free slot
        state.live[f"fake-{i}"] = None
    out = client.post("/v1/completions", json={"model": "m", "prompt": "a"})
    assert out.status_code == 429 and out.headers["retry-after"] == "1"
    assert out.json()["error"]["message"] == (  # (retest 48c: "(0 waiting...)" had told
        "the server's queue is full: 1 completion would wait for an engine slot, this "
        "request's 1 included, past --max_queue 0; retry later")  # of nothing that waits)


def test_an_n_that_can_never_be_admitted_is_a_400_not_retry_later(engine):
    """A trial's n 10 on an idle 8-slot server with --max_queue 1: 429 'retry later'."""
    client = TestClient(create_app(engine, "m", max_queue=1))
    slots = engine.llm.core.scheduler.limits.max_batch_size
    out = client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1,
                                               "n": slots + 1})
    assert out.status_code == 200  # the slots and one waiting
    out = client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"],
                                               "max_tokens": 1, "n": slots // 2 + 1})
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == "n", out.text
    assert error["message"] == (f"this request asks for {2 * (slots // 2 + 1)} completions at "
                                f"once (n times the prompts), and the server admits at most "
                                f"{slots + 1} (the engine's max_batch_size running, --max_queue "
                                f"1 waiting); lower n or send fewer prompts")


@pytest.mark.parametrize("endpoint,body,param,message", [
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens",
     "max_tokens 0 only scores the prompt: set echo: true and logprobs (0-20) as well"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 0},
     "max_tokens", "chat needs max_tokens >= 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "max_completion_tokens": 0},
     "max_completion_tokens", "chat needs max_completion_tokens >= 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]},
     "messages[0].content", "messages[0].content is missing or null; give the user message's "
     "text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "response_format": {"type": "json_object"}}, "response_format",
     "response_format is not supported by kiln serve"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "tools": [{"type": "function"}]}, "tools",
     "tools is not supported by kiln serve"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 3}}, "logit_bias",
     "logit_bias is not supported by kiln serve"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "echo": True},
     "echo", "echo is not supported on /v1/chat/completions (/v1/completions takes it)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "echo": 0},
     "echo", "echo must be a boolean, found a number 0"),
    ("/v1/completions", {"prompt": "a", "logit_bias": []}, "logit_bias",
     "logit_bias must be an object, found an array []"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "best_of": 2.0},
     "best_of", "best_of is not supported by kiln serve"),  # as 2 (an integer field's 2.0 is)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "best_of": 2.5},
     "best_of", "best_of must be an integer, found a number 2.5"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "tool_choice": {"type": "function"}}, "tool_choice",
     "tool_choice is not supported by kiln serve"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "guided_json": {"type": "object"}}, "guided_json",
     "guided_json is not supported by kiln serve"),
    ("/v1/completions", {"prompt": "a", "guided_choice": ["x", "y"]}, "guided_choice",
     "guided_choice is not supported by kiln serve"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "continue_final_message": True}, "continue_final_message",
     "continue_final_message is not supported by kiln serve"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "best_of": 2},
     "best_of", "best_of is not supported by kiln serve"),
    # OpenAI's and vLLM's rule (retest 48c: best_of 4 with n 4 had been refused, 1 taken)
    ("/v1/completions", {"prompt": "a", "n": 4, "best_of": 1}, "best_of",
     "best_of must be >= n (4), found a number 1"),
    ("/v1/completions", {"prompt": "a", "n": 2, "best_of": 3}, "best_of",
     "best_of must be n (2) or left out (kiln serve generates no more candidates than it "
     "returns), found a number 3"),
    ("/v1/completions", {"prompt": "a", "prompt_logprobs": 1}, "prompt_logprobs",
     "prompt_logprobs is not supported by kiln serve"),
])
def test_requests_kiln_cannot_honour_are_refused_by_name(engine, endpoint, body, param, message):
    """Found by a trial: these answered 200 (JSON mode and tools silently ignored), or with
    the runtime's field names, or a template's internals."""
    out = _client(engine).post(endpoint, json={"model": "m", **body})
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == param, error
    assert error["message"].startswith(message), error



def test_best_of_equal_to_n_asks_for_nothing_more(engine):
    """Retest 48c: n 4 with best_of 4, a client's spelling of n candidates, had been a 400."""
    out = _client(engine).post("/v1/completions", json={"model": "m", "prompt": "a", "n": 2,
                                                        "best_of": 2, "max_tokens": 1})
    assert out.status_code == 200 and len(out.json()["choices"]) == 2, out.text


def test_omitted_fields_take_the_engines_defaults_not_openais(engine):
    """As README says: the engine's generation_config defaults (here greedy), so n > 1 without
    a temperature gives equal choices; a temperature given overrides the default."""
    from kiln.serve.protocol import CompletionRequest
    from kiln.serve.render import Renderer

    renderer = Renderer(engine.llm)
    engine.llm.default_params = engine.llm.default_params.replace(temperature=0.0, top_k=7)
    omitted = renderer.completion_params(CompletionRequest(model="m", prompt="a"))
    assert omitted.temperature == 0.0 and omitted.top_k == 7
    given = renderer.completion_params(CompletionRequest(model="m", prompt="a", temperature=1.0))
    assert given.temperature == 1.0 and given.top_k == 7
    out = _client(engine).post("/v1/completions", json={"model": "m", "prompt": "a",
                                                        "max_tokens": 4, "n": 3})
    assert out.status_code == 200
    assert len({c["text"] for c in out.json()["choices"]}) == 1


IGNORED = ("request fields kiln serve does not know were ignored: {} (each name is warned of "
           "once per server, later at DEBUG)")


def _said(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "kiln.serve.render" and r.levelno == level]


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "a"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
])
def test_unknown_fields_are_ignored_and_named_once_per_server(engine, caplog, endpoint, body):
    """A trial's "max_token": 5 and "stream_options": {"include_usages": true} lost what the
    client asked for without a word (vLLM warns of such fields). Each name is warned of once: a
    client that always sends one must not flood the log."""
    client = _client(engine, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    request = {"model": "m", **body, "max_tokens": 1, "max_token": 5, "stream": True,
               "stream_options": {"include_usages": True}}
    with caplog.at_level(logging.DEBUG, logger="kiln.serve.render"):
        assert client.post(endpoint, json=request).status_code == 200
        assert _said(caplog, logging.WARNING) == [
            IGNORED.format("max_token, stream_options.include_usages")]
        caplog.clear()
        for fields in ({}, {"foo": 3}):  # said: at DEBUG; a new name: at WARNING
            assert client.post(endpoint, json={**request, **fields}).status_code == 200
        assert _said(caplog, logging.WARNING) == [IGNORED.format("foo")]
        assert _said(caplog, logging.DEBUG) == [
            "request fields kiln serve does not know were ignored: max_token, "
            "stream_options.include_usages"] * 2
        caplog.clear()
        assert _client(engine).post(endpoint, json=request).status_code == 200  # another server
        assert _said(caplog, logging.WARNING) == [
            IGNORED.format("max_token, stream_options.include_usages")]


@pytest.mark.parametrize("endpoint, body", [
    ("/v1/completions", {"prompt": "a", "logit_bias": {}, "suffix": None}),
    ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a", "foo": None}], "mood": None},
        {"role": "assistant", "content": "b", "tool_calls": [], "refusal": None,
         "reasoning_content": "c"}, {"role": "tool", "content": "d", "tool_call_id": "e"}],
        "tools": [], "response_format": {"type": "text"}, "echo": False,
        "continue_final_message": False}),
])
def test_fields_kiln_takes_or_refuses_by_name_are_not_said_to_be_ignored(engine, caplog,
                                                                          endpoint, body):
    """``user`` (accepted, ignored), UNSUPPORTED fields of no-op values (they ask for nothing),
    a null (the default) and a message's keys OpenAI's API defines (the template reads them)."""
    client = _client(engine, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    with caplog.at_level(logging.DEBUG, logger="kiln.serve.render"):
        out = client.post(endpoint, json={"model": "m", **body, "max_tokens": 1, "user": "u",
                                          "foo": None, "stream": True,
                                          "stream_options": {"include_usage": True,
                                                             "bar": None}})
    assert out.status_code == 200, out.text
    assert _said(caplog, logging.WARNING) == _said(caplog, logging.DEBUG) == []


TEMPLATED = ("chat message fields kiln serve does not know were passed to the chat template, "
             "which may not read them: {} (each name is warned of once per server, later at "
             "DEBUG)")


def test_unknown_keys_of_messages_and_parts_are_named_once_per_server(engine, caplog):
    """A retest's misspelt ``"nmae"`` and a part's ``"foo"`` were taken without a word."""
    client = _client(engine, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    request = {"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": "a", "nmae": "x"},
        {"role": "assistant", "content": "b", "nmae": "y", "mood": "calm"},
        {"role": "user", "content": [{"type": "text", "text": "c", "foo": 1}]}]}
    with caplog.at_level(logging.DEBUG, logger="kiln.serve.render"):
        assert client.post("/v1/chat/completions", json=request).status_code == 200
        assert _said(caplog, logging.WARNING) == [IGNORED.format("messages[].content[].foo"),
                                                  TEMPLATED.format("messages[].nmae, "
                                                                   "messages[].mood")]
        caplog.clear()
        assert client.post("/v1/chat/completions", json=request).status_code == 200
    assert _said(caplog, logging.WARNING) == []
    assert [m.partition(":")[2] for m in _said(caplog, logging.DEBUG)] == [
        " messages[].content[].foo", " messages[].nmae, messages[].mood"]


def test_chat_only_fields_on_completions_are_said_to_be_ignored(engine, caplog):
    """continue_final_message is checked on chat (refused when true); completions ignore it."""
    with caplog.at_level(logging.WARNING, logger="kiln.serve.render"):
        out = _client(engine).post("/v1/completions", json={
            "model": "m", "prompt": "a", "max_tokens": 1, "continue_final_message": True})
    assert out.status_code == 200
    assert _said(caplog, logging.WARNING) == [IGNORED.format("continue_final_message")]


def test_ignored_field_names_are_escaped_and_bounded(engine, caplog):
    """A key's newline must not forge a log line; a client sending new names without end must
    not grow the log or the server's memory (past WARN_MOST names, DEBUG). A trial's 300
    unknown fields had been one line listing 98 of them, and a later typo was never warned of,
    without a word that new names had gone to DEBUG."""
    from kiln.serve.render import WARN_MOST

    client = _client(engine)
    with caplog.at_level(logging.DEBUG, logger="kiln.serve.render"):
        out = client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1,
                                                   "a\nWARNING forged": 1})
        assert out.status_code == 200
        assert _said(caplog, logging.WARNING) == [IGNORED.format("a\\nWARNING forged")]
        many = {f"f{i}": 1 for i in range(WARN_MOST + 200)}
        out = client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1,
                                                   **many})
        assert out.status_code == 200
        # every new name told, at once (a retest's 300 had been told as 100); the newline's key
        # was one of the WARN_MOST remembered
        assert _said(caplog, logging.WARNING)[-1] == IGNORED.format(
            ", ".join(f"f{i}" for i in range(10)) + f" and {WARN_MOST + 190} more").replace(
            "DEBUG)", f"DEBUG; this server remembers {WARN_MOST} names it warned of, its most: "
                      f"names new to it are logged at DEBUG from now on)")
        warnings = len(_said(caplog, logging.WARNING))
        out = client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1,
                                                   "tempreature": 1})
        assert out.status_code == 200
    assert len(_said(caplog, logging.WARNING)) == warnings  # said once, above
    assert _said(caplog, logging.DEBUG)[-1].endswith(": tempreature")


@pytest.mark.parametrize("endpoint,body", [
    ("/v1/chat/completions", {"messages": [{"role": "us\udc80er", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "\udc80", "text": "hi"}]}]}),
    ("/v1/completions", {"prompt": "a", "n": "\udc80"}),
    ("/v1/completions", {"prompt": "a", "max_tokens": "\udc80"}),
    ("/v1/completions", {"prompt": {"\udc80": 1}}),
])
def test_a_lone_surrogate_an_error_repeats_is_400_not_500(engine, endpoint, body):
    """A retest's lone surrogates in a role, an ``n``, a part's type...: the error that
    repeated them could not be written as UTF-8 JSON, and the client got a plain 500."""
    client = _client(engine)
    out = client.post(endpoint, content=json.dumps({"model": "m", **body}),
                      headers={"content-type": "application/json"})
    assert out.status_code == 400, out.text
    assert "\\udc80" in out.json()["error"]["message"]  # repeated, as its escape


@pytest.mark.parametrize("message,param,value", [
    ({"name": "\udc80"}, "messages[0].name", '"\\udc80"'),
    ({"nmae": "a\udc80"}, "messages[0].nmae", '"a\\udc80"'),
    ({"tool_calls": [{"function": {"name": "f", "arguments": "\udc80"}}]},
     "messages[0].tool_calls[0].function.arguments", '"\\udc80"'),
])
def test_a_lone_surrogate_in_a_message_value_is_named_by_its_path(engine, message, param,
                                                                   value):
    """A trial's ``name`` of a lone surrogate had been told "the text is not UTF-8" with param
    ``messages``, and only where the chat template read it."""
    client = _client(engine, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    for template_reads in (False, True):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi", **message}]}
        if template_reads:
            client = _client(engine, chat_template="{{ messages }}")
        out = client.post("/v1/chat/completions", content=json.dumps(body),
                          headers={"content-type": "application/json"})
        assert out.status_code == 400, out.text
        assert out.json()["error"]["message"] == f"{param} is a string {value}; {NOT_UTF8}"
        assert out.json()["error"]["param"] == param


def test_a_lone_surrogate_in_a_message_value_key_is_named_by_its_path(engine):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi",
                                        "meta": [{"\udc80": 1}]}]}
    out = _client(engine).post("/v1/chat/completions", content=json.dumps(body),
                               headers={"content-type": "application/json"})
    assert out.status_code == 400, out.text
    assert out.json()["error"]["param"] == "messages[0].meta[0].\\udc80"
    assert "the field's name is not UTF-8" in out.json()["error"]["message"]


@pytest.mark.parametrize("endpoint,body,param", [
    ("/v1/chat/completions", {"mess\udc80ages": [], "messages": [{"role": "user",
                                                                  "content": "hi"}]},
     "mess\\udc80ages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "x\udc80": 1}]},
     "messages[0].x\\udc80"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "text", "text": "hi", "x\udc80": 1}]}]},
     "messages[0].content[1].x\\udc80"),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": {"x\udc80": True}},
     "stream_options.x\\udc80"),
])
def test_a_lone_surrogate_in_a_field_name_is_named_by_its_path(engine, endpoint, body, param):
    """A retest's ``"mess\\udc80ages"`` had been told pydantic's ": Input should be a valid
    string, unable to parse raw data as a unicode string", param ":"."""
    out = _client(engine).post(endpoint, content=json.dumps({"model": "m", **body}),
                               headers={"content-type": "application/json"})
    assert out.status_code == 400, out.text
    assert out.json()["error"] == {
        "message": f"{param}: the field's name is not UTF-8: it holds a lone surrogate (a JSON "
                   f"\\udXXX escape of half a character); fix the name",
        "type": "invalid_request_error", "param": param, "code": None}


class _NanExecutor(HashExecutor):
    def logits(self, history: list[int]) -> torch.Tensor:
        return torch.full((self.vocab_size,), float("nan"))


@pytest.mark.parametrize("executor, status, param, start", [
    (lambda vocab: CapacityExecutor(LIMITS, vocab, capacity=8), 400, "max_tokens",
     "needs 20 tokens of KV cache, more than the executor can ever hold"),
    (lambda vocab: _NanExecutor(LIMITS, vocab), 500, None,
     "the request failed: the model's logits for output token 1 are not finite"),
])
def test_failed_requests_name_no_internal_request_id(smollm2_dir, executor, status, param,
                                                     start):
    """The runtime's messages start 'request kiln-N: ', an id the client never saw (a trial
    found them in error responses)."""
    tokenizer = load_tokenizer(smollm2_dir)
    engine = AsyncLLM(LLM.from_executor(executor(tokenizer.vocab_size), tokenizer))
    try:
        out = _client(engine).post("/v1/completions", json={
            "model": "m", "prompt": [5], "max_tokens": 20, "ignore_eos": True})
    finally:
        engine.close()
    error = out.json()["error"]
    assert out.status_code == status and error["param"] == param, error
    assert error["message"].startswith(start) and "kiln-" not in error["message"], error


def test_queue_time_metric_is_each_requests_wait_for_an_engine_slot(smollm2_dir):
    """One engine slot, two requests at once: the second waits for the whole run of the first.
    The histogram holds the engine's stamps (arrival to admission), observed once each."""
    step_s = 0.02
    tokenizer = load_tokenizer(smollm2_dir)
    llm = LLM.from_executor(SlowExecutor(dataclasses.replace(LIMITS, max_batch_size=1),
                                         tokenizer.vocab_size, step_s), tokenizer)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine = AsyncLLM(llm)
    state = create_app(engine, "m").state.kiln

    async def both():
        submitted = await state.submit([Job(0, [5, 6, 7], params), Job(1, [8, 9], params)],
                                       "prompt")
        return {d.index: d.result async for d in submitted.deltas() if d.result}

    try:
        results = asyncio.run(both())
    finally:
        engine.close()
    first, second = results[0].timings, results[1].timings
    assert first.queue_s < step_s and first.latency_s >= 5 * step_s
    # admitted as the first finished: it waited from its arrival (during the first's first
    # step: jobs are submitted one after the other) to the end of the first's run
    # (not before it; after it by one step at most, and a loaded CI machine's scheduling delay)
    assert first.finished - step_s / 2 <= second.admitted <= first.finished + 3 * step_s
    assert second.queue_s >= 3 * step_s
    sample = state.metrics.registry.get_sample_value
    assert sample("kiln:request_queue_time_seconds_count") == 2
    assert sample("kiln:request_queue_time_seconds_sum") == pytest.approx(
        first.queue_s + second.queue_s, abs=1e-9)


@pytest.mark.parametrize("endpoint,body", [
    ("/v1/completions", {"prompt": "\ud800"}),
    ("/v1/completions", {"prompt": ["fine", "\ud800"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udc80"}]}),
    ("/v1/chat/completions", {"messages": [
        {"role": "system", "content": "fine"},
        {"role": "user", "content": [{"type": "text", "text": "b"},
                                     {"type": "text", "text": "a\udc80"}]}]}),
])
def test_a_prompt_that_is_not_utf8_is_400_and_leaves_nothing_queued(engine, endpoint, body):
    """A trial's lone surrogate gave a 500 and kept a queue place for good: 17 of them and
    every request got 429."""
    app = create_app(engine, "m")
    client = TestClient(app)
    for _ in range(3):  # the JSON escape "\ud800", as a client sends it
        out = client.post(endpoint, content=json.dumps({"model": "m", "max_tokens": 2, **body}),
                          headers={"content-type": "application/json"})
        assert out.status_code == 400, out.text
        # the part at fault by its path (trial 40: a chat message's had the param messages)
        # and a prompt's by its name (a bare string's message had named nothing)
        among = "prompt[1]: " if isinstance(body.get("prompt"), list) else \
            "prompt: " if "prompt" in body else \
            "messages[0].content: " if len(body["messages"]) == 1 else \
            "messages[1].content[1].text: "
        assert out.json()["error"]["message"].startswith(f"{among}the text is not UTF-8")
        assert out.json()["error"]["param"] == among[:-2]
    deadline = time.monotonic() + 5  # a good prompt before the bad one is aborted, not awaited
    while app.state.kiln.live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.state.kiln.live == {}
    out = client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1})
    assert out.status_code == 200


def test_an_unexpected_submit_failure_leaves_nothing_queued(engine, monkeypatch):
    app = create_app(engine, "m")
    client = TestClient(app, raise_server_exceptions=False)

    async def fails(*args, **kwargs):
        raise TypeError("not a request error")
    monkeypatch.setattr(engine, "submit", fails)
    out = client.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1})
    assert out.status_code == 500
    assert app.state.kiln.live == {}


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_while_its_prompts_are_submitted_stops_the_submitting(engine, monkeypatch,
                                                                           stream):
    """Retest 45: a client that left one second into a request of 100 prompts had them all
    submitted (25 a second), some run to their end for nobody. The submitting stops at the
    disconnect, and nothing of the request stays queued."""
    app = create_app(engine, "m")
    submit, submitted, abort, aborted = engine.submit, [], engine.abort, set()

    async def slow(prompt, params, request_id):  # (as an engine in a long step takes them)
        await asyncio.sleep(0.5)
        submitted.append(await submit(prompt, params, request_id=request_id))
        return request_id

    async def recorded(request_id):
        aborted.add(request_id)
        await abort(request_id)
    monkeypatch.setattr(engine, "submit", slow)
    monkeypatch.setattr(engine, "abort", recorded)
    body = json.dumps({"model": "m", "prompt": ["a"] * 200, "max_tokens": 4,
                       "stream": stream}).encode()
    sent = []

    async def request() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.sleep(0.1)  # the client leaves a tenth of a second in
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
        await app(_scope("/v1/completions", len(body)), receive, send)
    asyncio.run(request())
    assert sent[0]["status"] == 499
    assert len(submitted) < 50, len(submitted)  # 200 without the watch
    assert set(submitted) <= aborted
    scheduler = engine.llm.core.scheduler
    deadline = time.monotonic() + 10
    while (scheduler.running or scheduler.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not scheduler.running and not scheduler.waiting
    assert app.state.kiln.live == {}


@pytest.mark.parametrize("body", [
    '{"model": "m", "prompt": "a", "seed": 1' + "0" * 5000 + "}",  # past int's digit limit
    '{"model": "m", "prompt": "a", "x": ' + "[" * 100000 + "]" * 100000 + "}",
])
def test_json_python_cannot_read_is_a_400(engine, body):
    """A trial's 5,000-digit number and 100,000-deep array: 500s with tracebacks."""
    out = _client(engine).post("/v1/completions", content=body,
                               headers={"content-type": "application/json"})
    assert out.status_code == 400, out.text
    assert out.json()["error"]["code"] == "invalid_json"


def _nested(depth: int) -> str:
    """JSON arrays ``depth`` deep, an object's innermost: ``[[{"a": 1}]]`` is 3."""
    return "[" * (depth - 1) + '{"a": 1}' + "]" * (depth - 1)


NESTED_IN = [  # bodies holding JSON %s levels deep, one level or three in
    ("/v1/completions", '{"model": "m", "prompt": "a", "max_tokens": 1, "x": %s}'),
    ("/v1/completions", '{"model": "m", "prompt": %s}'),
    ("/v1/chat/completions", '{"model": "m", "max_tokens": 1, "messages": [{"role": "user", '
                             '"content": "a", "x": %s}]}'),
]


@pytest.mark.parametrize("endpoint, body", NESTED_IN)
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 990, 5000])  # (the body's own object: 1)
def test_json_nested_too_deeply_is_told_so(engine, caplog, endpoint, body, depth):
    """A trial's body 990 deep was told "the body is not JSON (maximum recursion depth
    exceeded...)"; 950 had been read. The limit is one number now, said."""
    with caplog.at_level(logging.WARNING):
        out = _client(engine).post(endpoint, content=body % _nested(depth),
                                   headers={"content-type": "application/json"})
    assert out.status_code == 400, out.text
    assert out.json()["error"] == {
        "message": f"the body is JSON nested deeper than {MAX_JSON_DEPTH} levels (arrays and "
                   f"objects within each other), the most kiln serve reads; flatten it",
        "type": "invalid_request_error", "param": None, "code": "invalid_json"}
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_json_nested_as_deep_as_the_limit_is_read(engine):
    endpoint, body = NESTED_IN[2]  # in the body's object, in a message in messages: 3 deep
    out = _client(engine).post(endpoint, content=body % _nested(MAX_JSON_DEPTH - 3),
                               headers={"content-type": "application/json"})
    assert out.status_code == 200, out.text


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_a_long_prompt_is_encoded_while_the_server_answers_others(engine, monkeypatch, endpoint):
    """Trial D: a 3.5 MB prompt held /health for 1.8 s, four of them 5.4 s. The encoding of a
    long prompt waits here until /health has answered: on the event loop it would wait in
    vain, and the request fails."""
    entered, gate = threading.Event(), threading.Event()
    encode = engine.llm.tokenizer.encode

    def gated(text, *args, **kwargs):
        if len(text) > INLINE_ENCODE_CHARS:
            entered.set()
            assert gate.wait(10), "the long prompt was encoded on the event loop"
        return encode(text, *args, **kwargs)
    monkeypatch.setattr(engine.llm.tokenizer, "encode", gated)
    text = "word " * (INLINE_ENCODE_CHARS // 4)
    body = ({"prompt": text} if endpoint == "/v1/completions"
            else {"messages": [{"role": "user", "content": text}]})
    with _client(engine) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.post, endpoint, json={"model": "m", "max_tokens": 1, **body})
        assert entered.wait(10)
        assert client.get("/health").status_code == 200
        gate.set()
        out = future.result()
    assert out.status_code == 400 and out.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("prompt, param, message", [
    (["fine", ""], "prompt[1]", "prompt[1]: the prompt is empty; give at least one token"),
    ([[1], []], "prompt[1]", "prompt[1]: the prompt is empty; give at least one token"),
    ([""], "prompt[0]", "prompt[0]: the prompt is empty; give at least one token"),
    ([1.5], "prompt[0]", "prompt[0] is a number 1.5; " + FORMS),
    ([[1, 2], [3, "a"]], "prompt[1][1]", "prompt[1][1] is a string \"a\", not a token id; "
                                         + FORMS),
    ([None], "prompt[0]", "prompt[0] is null; " + FORMS),
    ([True], "prompt[0]", "prompt[0] is true; " + FORMS),
    (["hi", 5], "prompt[1]", "prompt[1] is a number 5, where prompt[0] is a string; " + FORMS),
    (["x", [1]], "prompt[1]", "prompt[1] is an array [1], where prompt[0] is a string; " + FORMS),
    ([1, "a"], "prompt[1]", "prompt[1] is a string \"a\", where prompt[0] is a token id; "
                            + FORMS),
    ([[1], "a"], "prompt[1]", "prompt[1] is a string \"a\", where prompt[0] is a list of token "
                              "ids; " + FORMS),
    ({"a": 1}, "prompt", FORMS + ', found an object {"a": 1}'),
])
def test_a_bad_prompt_among_several_is_named(engine, prompt, param, message):
    """Trial D: ["", "x"] did not say which prompt was empty, and [1.5] was told pydantic's
    "prompt.str: Input should be a valid string". The param is the prompt at fault, as the
    message names it (it had been "prompt" for all of them, unlike stop[1])."""
    out = _client(engine).post("/v1/completions",
                               json={"model": "m", "prompt": prompt, "max_tokens": 1})
    assert out.status_code == 400
    assert out.json()["error"] == {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": None}


OUTSIDE = "is outside the vocabulary [0, 49152); pass ids of the model's tokenizer"


@pytest.mark.parametrize("prompt, param, message", [
    ([[]], "prompt[0]", "prompt[0]: the prompt is empty; give at least one token"),
    ([[1], [2**40]], "prompt[1][0]", f"prompt[1][0]: token id 1099511627776 {OUTSIDE}"),
    ([1, -2], "prompt[1]", f"prompt[1]: token id -2 {OUTSIDE}"),
    ([1, 49152, -1], "prompt[1]", f"prompt[1]: token id 49152 {OUTSIDE}"),
    ([[1, -2]], "prompt[0][1]", f"prompt[0][1]: token id -2 {OUTSIDE}"),
    ([[1], [3, 2, -5]], "prompt[1][2]", f"prompt[1][2]: token id -5 {OUTSIDE}"),
    ([1, 2**40], "prompt[1]", f"prompt[1]: token id 1099511627776 {OUTSIDE}"),
    ("", "prompt", "the prompt is empty; give at least one token"),  # the one prompt: no index
])
def test_a_prompt_in_a_list_and_a_token_id_are_named_by_their_path(engine, prompt, param,
                                                                    message):
    """A trial: [[]] (a list of one prompt) and [1, -2] had the param prompt; the value at fault
    is prompt[0] and prompt[1] (the first id outside the vocabulary), as OpenAI's errors say."""
    out = _client(engine).post("/v1/completions",
                               json={"model": "m", "prompt": prompt, "max_tokens": 1})
    assert out.status_code == 400
    assert out.json()["error"] == {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": None}


def test_stop_token_ids_outside_the_vocabulary_blame_no_prompt(engine):
    """Among several prompts, the first one's submit meets them: they had been told as
    "prompt[0]: stop_token_ids ..." """
    out = _client(engine).post("/v1/completions", json={
        "model": "m", "prompt": ["a", "b"], "max_tokens": 1, "stop_token_ids": [2**40]})
    assert out.status_code == 400
    assert out.json()["error"]["message"] == ("stop_token_ids[0]: token id 1099511627776 is "
                                              "outside the vocabulary [0, 49152); pass ids of "
                                              "the model's tokenizer")
    assert out.json()["error"]["param"] == "stop_token_ids[0]"


MESSAGES = 'messages must be a list of objects like {"role": "user", "content": "Hi"}'
PARTS = '{"type": "text", "text": "Hi"}'
TOOL_CALL = '{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}'
FUNCTION = '{"name": "f", "arguments": "{}"}'


@pytest.mark.parametrize("messages, param, message", [
    ([], "messages", "messages is an empty list; give at least one message"),
    ("Hi", "messages", MESSAGES + ', found a string "Hi"'),
    (["Hi"], "messages[0]", 'messages[0] is a string "Hi"; ' + MESSAGES),
    ([{"role": "user", "content": "a"}, {"content": "b"}], "messages[1]",
     "messages[1] has no role; " + MESSAGES),
    ([{"role": 3, "content": "a"}], "messages[0].role", "messages[0].role is a number 3; give "
     "one of system, developer, user, assistant, tool, function"),
    ([{"role": "user", "content": 5}], "messages[0].content", "messages[0].content is a number "
     "5; give a string or a list of text parts like " + PARTS),
    ([{"role": "user", "content": ["a"]}], "messages[0].content[0]",
     'messages[0].content[0] is a string "a"; a part is an object like ' + PARTS),
    # trial 37: these had passed pydantic and reached the model as "None" or "{'x': [1, 2]}"
    ([{"role": "user", "content": [{"type": "text", "text": None}]}],
     "messages[0].content[0].text",
     "messages[0].content[0].text is null; give the part's text as a string"),
    ([{"role": "user", "content": [{"type": "text", "text": {"x": [1, 2]}}]}],
     "messages[0].content[0].text",
     'messages[0].content[0].text is an object {"x": [1, 2]}; give the part\'s text as a string'),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}],
     "messages[0].content[1].text",
     "messages[0].content[1].text is missing; give the part's text as a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]", 'messages[0].content[0] has "type": a string "image_url"; kiln '
     "serve takes text parts only, like " + PARTS),
    ([{"role": "user", "content": [{"text": "hi"}]}], "messages[0].content[0]",
     "messages[0].content[0] has no type; kiln serve takes text parts only, like " + PARTS),
    ([{"role": "assistant"}], "messages[0].content", "messages[0].content is missing or null; "
     "give the assistant message's text (or its tool_calls)"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "messages[0].tool_calls",
     "messages[0].tool_calls is an empty list and its content missing or null; give the "
     "assistant message's text or its tool calls"),
    ([{"role": "tool", "content": None, "tool_call_id": "c"}], "messages[0].content",
     "messages[0].content is missing or null; give the tool message's text"),
    # a retest: these had reached the template
    ([{"role": "user", "content": "a", "name": 5}], "messages[0].name", "messages[0].name is a "
     "number 5; give the participant's name as a string, or leave it out"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b", "name": ["x"]}],
     "messages[1].name", 'messages[1].name is an array ["x"]; give the participant\'s name as a '
     "string, or leave it out"),
    # a retest: a tool_calls that is no list of objects had reached the template
    ([{"role": "assistant", "content": None, "tool_calls": "x"}], "messages[0].tool_calls",
     'messages[0].tool_calls is a string "x"; give the assistant\'s tool calls as a list of '
     "objects like " + TOOL_CALL + ", or leave it out"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                          "tool_calls": {"id": "c"}}],
     "messages[1].tool_calls", 'messages[1].tool_calls is an object {"id": "c"}; give the '
     "assistant's tool calls as a list of objects like " + TOOL_CALL + ", or leave it out"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"id": "c"}, "f"]}],
     "messages[0].tool_calls[1]", 'messages[0].tool_calls[1] is a string "f"; a tool call is an '
     "object like " + TOOL_CALL),
    # a retest: a tool call of no function had failed in the template, naming messages
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}],
     "messages[0].tool_calls[0].function", "messages[0].tool_calls[0].function is missing; a "
     "tool call is an object like " + TOOL_CALL),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": None}]}],
     "messages[0].tool_calls[0].function", "messages[0].tool_calls[0].function is null; a tool "
     "call is an object like " + TOOL_CALL),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": 5}}]}],
     "messages[0].tool_calls[0].function.arguments", "messages[0].tool_calls[0].function."
     "arguments is a number 5; give the function's arguments as a string, like " + FUNCTION),
    ([{"role": "assistant", "content": None, "function_call": {"name": "f"}}],
     "messages[0].function_call.arguments", "messages[0].function_call.arguments is missing; "
     "give the function's arguments as a string, like " + FUNCTION),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"type": "code", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages[0].tool_calls[0].type", 'messages[0].tool_calls[0].type is a string "code"; the '
     'one tool call type is "function"'),
    ([{"role": "assistant", "content": None, "function_call": "x"}],
     "messages[0].function_call", 'messages[0].function_call is a string "x"; give the function '
     "called as an object like " + FUNCTION),
    ([{"role": "assistant", "content": None, "function_call": {"name": 5, "arguments": "{}"}}],
     "messages[0].function_call.name", "messages[0].function_call.name is a number 5; give the "
     "function's name as a string, like " + FUNCTION),
    # these had reached the template as an empty message (a retest)
    ([{"role": "user", "content": []}], "messages[0].content", "messages[0].content is an "
     "empty list; give a string or at least one text part like " + PARTS),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": []}],
     "messages[1].content", "messages[1].content is an empty list; give a string or at least "
     "one text part like " + PARTS),
    ([{"role": "user", "content": []}, {"role": "user", "content": 5}], "messages[0].content",
     "messages[0].content is an empty list; give a string or at least one text part like "
     + PARTS),
    ([{"role": "u" * 60, "content": "a"}], "messages[0].role", 'messages[0].role '
     '"uuuuuuuuuuuuuuuuuuu...uuuuuuu" (62 characters) is not a chat role; use one of system, '
     "developer, user, assistant, tool, function"),
])
def test_messages_of_no_chat_form_name_the_wrong_value(engine, messages, param, message):
    """Trial 36: these were told pydantic's "messages.0.content.str: Input should be a valid
    string" and "List should have at least 1 item". The param is the value at fault, as
    OpenAI's (it had been "messages" for all of them)."""
    out = _client(engine).post("/v1/chat/completions",
                               json={"model": "m", "messages": messages, "max_tokens": 1})
    assert out.status_code == 400
    assert out.json()["error"] == {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": None}


def test_a_message_name_reaches_the_template(engine):
    client = _client(engine, chat_template="{% for m in messages %}{{ m.name }}{% endfor %}")
    body = {"model": "m", "max_tokens": 1}
    named = client.post("/v1/chat/completions", json={**body, "messages": [
        {"role": "user", "content": "a", "name": "bob"}]})
    assert named.status_code == 200, named.text
    assert named.json()["usage"]["prompt_tokens"] == len(engine.llm.tokenizer.encode("bob", False))
    out = client.post("/v1/chat/completions", json={**body, "messages": [
        {"role": "user", "content": "a", "name": None}, {"role": "user", "content": "b"}]})
    assert out.status_code == 400, out.text  # null is no name: the template renders nothing
    assert out.json()["error"]["message"] == "the prompt is empty; give at least one token"


@pytest.mark.parametrize("endpoint,body,param", [
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"prompt": "x"}, "messages"),
    ("/v1/completions", {}, "prompt"),
])
def test_a_missing_prompt_or_messages_is_a_400(engine, endpoint, body, param):
    """Trial 37: a body without messages (or prompt) was a 500: the form check read the field
    pydantic had found missing."""
    out = _client(engine).post(endpoint, json={"model": "m", **body})
    assert out.status_code == 400, out.text
    assert out.json()["error"]["message"] == f"{param} is required"
    assert out.json()["error"]["param"] == param


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_a_seeds_choices_wrap_as_the_generator_reads_seeds(engine, endpoint):
    """Trial 40: seed 2**64 - 1 with n 2 was told "found 18446744073709551616", choice 1's
    seed + 1, a number the client never sent. Choice j's seed is seed + j modulo 2**64, so
    2**64 - 1 samples as -1 does (the same seed to the generator), choice 1 as seed 0."""
    body = {"model": "m", "max_tokens": 4, "temperature": 1, "n": 2,
            **({"prompt": "hi"} if endpoint == "/v1/completions" else
               {"messages": [{"role": "user", "content": "hi"}]})}
    client = _client(engine)

    def texts(seed: int, n: int = 2) -> list[str]:
        out = client.post(endpoint, json={**body, "seed": seed, "n": n})
        assert out.status_code == 200, out.text
        return [c.get("text", c.get("message", {}).get("content")) for c in out.json()["choices"]]

    top = texts(2**64 - 1)
    assert top == texts(-1) and top[1] == texts(0, 1)[0]
    assert len({texts(seed, 1)[0] for seed in range(4)}) > 1  # seeds matter here


@pytest.mark.parametrize("endpoint,fields,message", [
    ("/v1/completions", {"n": 0}, "n must be >= 1, found a number 0"),
    ("/v1/completions", {"logprobs": 50}, "logprobs must be <= 20, found a number 50"),
    ("/v1/completions", {"stream": "yes"}, 'stream must be true or false, found a string "yes"'),
    ("/v1/completions", {"seed": 1.5}, "seed must be an integer, found a number 1.5"),
    ("/v1/completions", {"n": True}, "n must be an integer, found true"),
    ("/v1/completions", {"temperature": "hot"},
     'temperature must be a number, found a string "hot"'),
    ("/v1/completions", {"model": 5}, "model must be a string, found a number 5"),
    ("/v1/chat/completions", {"top_logprobs": 50},
     "top_logprobs must be <= 20, found a number 50"),
    ("/v1/chat/completions", {"logprobs": "yes"},
     'logprobs must be true or false, found a string "yes"'),
    # an integer field takes a whole float (test_a_whole_float_is_an_integer), no other
    ("/v1/completions", {"max_tokens": 4.5}, "max_tokens must be an integer, found a number 4.5"),
    ("/v1/completions", {"n": float("inf")}, "n must be an integer, found a number Infinity"),
    ("/v1/completions", {"seed": float("nan")}, "seed must be an integer, found a number NaN"),
    ("/v1/chat/completions", {"max_completion_tokens": False},
     "max_completion_tokens must be an integer, found false"),
])
def test_a_field_of_the_wrong_type_or_range_is_told_in_kilns_words(engine, endpoint, fields,
                                                                   message):
    """Trial 39: these were told pydantic's "n: Input should be greater than or equal to 1",
    beside kiln's own words for the other fields."""
    body = {"model": "m", **({"prompt": "hi"} if endpoint == "/v1/completions" else
                             {"messages": [{"role": "user", "content": "hi"}]}), **fields}
    out = _client(engine).post(endpoint, content=json.dumps(body),  # (NaN: not httpx's json)
                               headers={"content-type": "application/json"})
    assert out.status_code == 400, out.text
    assert out.json()["error"]["message"] == message
    assert out.json()["error"]["param"] == next(iter(fields))


@pytest.mark.parametrize("text, shown", [("1e2", "100"), ("NaN", "NaN"),
                                         ("-Infinity", "-Infinity")])
def test_a_number_is_shown_alike_in_every_fields_400(engine, text, shown):
    """One form whichever check refuses it (a retest: top_logprobs' 1e2 had been "found a
    number 100.0", n's "found a number 100"; top_p's NaN "found nan", seed's "found a
    number NaN"): a whole float as the integer it is, NaN and the infinities as JSON's."""
    client = _client(engine)
    found = {}
    for endpoint, name in [("/v1/completions", "n"), ("/v1/chat/completions", "top_logprobs"),
                           ("/v1/completions", "logprobs"), ("/v1/completions", "best_of"),
                           ("/v1/completions", "top_p"), ("/v1/completions", "min_p"),
                           ("/v1/chat/completions", "best_of")]:
        prompt = '"prompt": "a"' if endpoint == "/v1/completions" else \
            '"messages": [{"role": "user", "content": "a"}], "logprobs": true'
        if name == "best_of" and endpoint == "/v1/chat/completions" and text == "1e2":
            continue  # (an integer 100 there is refused as unsupported, not shown)
        out = client.post(endpoint, content=f'{{"model": "m", {prompt}, "{name}": {text}}}',
                          headers={"content-type": "application/json"})
        assert out.status_code == 400, out.text
        found[endpoint, name] = out.json()["error"]["message"].rsplit(", found ", 1)[1]
    assert set(found.values()) == {f"a number {shown}"}, found


@pytest.mark.parametrize("endpoint, fields", [
    ("/v1/completions", {"max_tokens": 3.0, "n": 2.0, "seed": 7.0, "top_k": 5.0,
                         "logprobs": 2.0, "best_of": 2.0}),
    ("/v1/chat/completions", {"max_completion_tokens": 3.0, "n": 2.0, "seed": 7.0,
                              "top_k": 5.0, "logprobs": True, "top_logprobs": 2.0,
                              "best_of": 1.0}),
])
def test_a_whole_float_is_an_integer(engine, endpoint, fields):
    """A trial: "max_tokens": 4.0 was a 400 (vLLM's pydantic, in lax mode, takes it as 4)."""
    body = {"model": "m", "temperature": 1,
            **({"prompt": "hi"} if endpoint == "/v1/completions" else
               {"messages": [{"role": "user", "content": "hi"}]})}
    client = _client(engine)
    floats = client.post(endpoint, json={**body, **fields})
    assert floats.status_code == 200, floats.text
    ints = client.post(endpoint, json={**body, **{k: v if isinstance(v, bool) else int(v)
                                                  for k, v in fields.items()}})
    assert [{**c, "index": 0} for c in floats.json()["choices"]] == \
        [{**c, "index": 0} for c in ints.json()["choices"]]
    assert len(floats.json()["choices"]) == 2


def test_a_long_wrong_value_is_shown_cut_and_as_json(engine):
    out = _client(engine).post("/v1/completions",
                               json={"model": "m", "prompt": [[1], "ab" * 50], "max_tokens": 1})
    assert out.json()["error"]["message"].startswith(
        'prompt[1] is a string "abababababababababa...bababab" (102 characters), where prompt[0] '
        'is a list of token ids; ')


@pytest.mark.parametrize("text, shown", [("1e2", "100"), ("-0.0", "0"),
                                         ("1e30", str(int(1e30)))])
def test_a_boolean_fields_number_is_shown_as_the_integer_fields_show_it(engine, text, shown):
    """A retest: stream, echo, ignore_eos, chat's logprobs and stream_options.include_usage
    had said "found a number 100.0" ("-0.0", "1e+30") beside n's "found a number 100"."""
    client = _client(engine)
    for endpoint, name in [("/v1/completions", "n"), ("/v1/completions", "stream"),
                           ("/v1/completions", "echo"), ("/v1/completions", "ignore_eos"),
                           ("/v1/chat/completions", "logprobs"),
                           ("/v1/completions", "stream_options")]:
        prompt = '"prompt": "a"' if endpoint == "/v1/completions" else \
            '"messages": [{"role": "user", "content": "a"}]'
        value = f'{{"include_usage": {text}}}' if name == "stream_options" else text
        out = client.post(endpoint, content=f'{{"model": "m", {prompt}, "{name}": {value}}}',
                          headers={"content-type": "application/json"})
        assert out.status_code == 400, out.text
        message = out.json()["error"]["message"]
        assert f"a number {shown}" in message and f"a number {shown}." not in message, \
            (name, message)


def test_a_token_id_written_as_a_whole_float_is_taken(engine):
    """As vLLM's ``list[int]`` (pydantic's lax int) takes it, and as kiln's integer fields
    take ``"max_tokens": 4.0``: ``prompt: [1e2, 2.0]`` had been a 400 ("prompt[0] is a number
    100 written as a float")."""
    client = _client(engine)
    body = {"model": "m", "max_tokens": 3, "temperature": 0, "logprobs": 1}
    for ints, floats in [([100, 2], [1e2, 2.0]), ([[1, 100], [3]], [[1.0, 1e2], [3]])]:
        want = client.post("/v1/completions", json={**body, "prompt": ints})
        got = client.post("/v1/completions", json={**body, "prompt": floats})
        assert got.status_code == want.status_code == 200, got.text
        assert [c["logprobs"] for c in got.json()["choices"]] == \
            [c["logprobs"] for c in want.json()["choices"]]
    out = client.post("/v1/completions", json={**body, "prompt": "a", "stop_token_ids": [1e2]})
    assert out.status_code == 200, out.text


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": [1.0, 1.5]}, "prompt[1]", "prompt[1] is a number 1.5; " + FORMS),
    ({"prompt": [1.0, True]}, "prompt[1]", "prompt[1] is true; " + FORMS),
    ({"prompt": [1.0, "1"]}, "prompt[1]", 'prompt[1] is a string "1", where prompt[0] is a '
                                          "token id; " + FORMS),
    ({"prompt": [[1.0, 2.5]]}, "prompt[0][1]", "prompt[0][1] is a number 2.5, not a token id; "
                                               + FORMS),
    ({"prompt": [[2.0], [1, "1"]]}, "prompt[1][1]", 'prompt[1][1] is a string "1", not a token '
                                                    "id; " + FORMS),
    ({"prompt": "a", "stop_token_ids": [2.0, -1.0]}, "stop_token_ids[1]",
     "stop_token_ids[1] is a number -1; " + IDS)])
def test_a_token_id_of_no_whole_number_stays_a_400_naming_it(engine, body, param, message):
    out = _client(engine).post("/v1/completions", json={"model": "m", **body})
    assert out.status_code == 400, out.text
    assert out.json()["error"]["param"] == param and out.json()["error"]["message"] == message
