"""``kiln serve`` as a real process on the SmolLM2 onnx engine, driven by the official openai
client: completions and chat (streaming and not), stop strings, seeds, n, logprobs, echo
scoring, every error status, /v1/models, /metrics, aborts on disconnect, the queue limit and a
graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, MODEL, ServerProcess

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
GREEDY = dict(temperature=0, max_tokens=12)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_completion_streamed_equals_whole(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert whole.choices[0].text and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (5, 12)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 17


def test_chat_streamed_equals_whole(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    message = whole.choices[0].message
    assert message.role == "assistant" and "Paris" in message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_string(client):
    text = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
    word = text.split()[1]  # a word after the first: the text must end before it
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, stop=[word], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(word)]


def test_seeded_sampling_is_reproducible_and_n_choices_differ(client):
    ask = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=7,
               n=2)
    first, second = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert first.choices[0].text != first.choices[1].text
    assert first.usage.completion_tokens == 20 and first.usage.prompt_tokens == 4


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 12
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-6)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))  # greedy
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True,
                                          top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)


def test_echo_logprobs_scores_the_prompt(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True,
                                    logprobs=1, temperature=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.token_logprobs) == 5
    assert all(v < 0 for v in choice.logprobs.token_logprobs[1:])


SCORED = ["The capital of France is Paris, and the capital of Germany is Berlin.",
          "Question: What is the boiling point of water at sea level?\nAnswer: 100 degrees",
          "def add(a, b):\n    return a + b\n"]
TOP = 5
LOGPROB_ATOL = 1e-4  # float32 engine vs float32 HF, per token (measured: <= 2.1e-5)


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(smollm2_dir), model


def _hf_logprobs(model, ids: list[int]):
    """(len(ids), vocab) float64 log-softmax of HF's float32 logits: row i scores token i + 1."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # (positions, vocab) float32
    return torch.log_softmax(logits.double(), dim=-1)


def _long_prompt_ids(tokenizer) -> list[int]:
    from kiln.testing.english import english_paragraphs

    text = " ".join(english_paragraphs("evaluation")[:4])
    return tokenizer(text).input_ids[:90]  # over max_num_tokens 64: a chunked prefill


def test_echo_logprobs_equal_hf_transformers(client, hf):
    """lm-eval-harness's local-completions loglikelihood request (echo, logprobs, max_tokens 0,
    as text and as token ids): every prompt token's logprob and top_logprobs equal HF
    transformers' on the same float32 checkpoint within 1e-4."""
    tokenizer, model = hf
    prompts = [tokenizer(p).input_ids for p in SCORED] + [_long_prompt_ids(tokenizer)]
    for k, ids in enumerate(prompts):
        prompt = SCORED[k] if k < len(SCORED) else ids
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                        logprobs=TOP, temperature=0)
        choice, want = out.choices[0], _hf_logprobs(model, ids)
        assert choice.text == tokenizer.decode(ids) and out.usage.prompt_tokens == len(ids)
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - want[i - 1, ids[i]].item()) <= LOGPROB_ATOL, (k, i)
            _assert_top_equal(tokenizer, lp.top_logprobs[i], want[i - 1], (k, i))


def _assert_top_equal(tokenizer, got: dict[str, float], want, where) -> None:
    """``got`` (token text -> logprob) holds HF's TOP best tokens up to ties within the
    tolerance, with HF's logprobs."""
    values, ids = want.topk(TOP + 3)
    hf = {}
    for value, token_id in zip(values.tolist(), ids.tolist(), strict=True):
        hf.setdefault(tokenizer.decode([token_id]), value)
    assert len(got) == TOP, where
    for text, value in got.items():
        assert text in hf and abs(value - hf[text]) <= LOGPROB_ATOL, (where, text, value)
    assert min(got.values()) >= values[TOP].item() - LOGPROB_ATOL, where


@pytest.mark.parametrize("bad, param", [(dict(top_p=0.0), "top_p"),
                                        (dict(temperature=-1.0), "temperature"),
                                        (dict(max_tokens=-3), "max_tokens"),
                                        (dict(extra_body={"top_k": "x"}), "top_k"),
                                        (dict(presence_penalty=5.0), "presence_penalty")])
def test_bad_parameter_is_400_naming_it(client, bad, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, **bad)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"


def test_prompt_too_long_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="1 " * 200, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["message"] == (  # no internal request id; the server's operator
        # rebuilds with kiln's flags (a retest: told of kiln.build's keyword, the engine's
        # thread not knowing it ran in a kiln command)
        "prompt of 400 tokens exceeds the engine's max_input_len 96; shorten it, or build "
        "with a larger --max_input_len (kiln build, or beside --model_dir)")


def test_token_ids_outside_the_vocabulary_are_400_without_internal_ids(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[[1, 2], [3, 10**6]], max_tokens=2, n=2)
    assert e.value.body["param"] == "prompt[1][1]"  # the token id at fault
    assert e.value.body["message"] == "prompt[1][1]: token id 1000000 is outside the " \
                                      "vocabulary [0, 49152); pass ids of the model's tokenizer"


def test_auth_model_and_body_size_errors(server, client):
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert e.value.body["param"] == "model"
    big = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": MODEL, "prompt": "x" * 100_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert httpx.post(f"{server.url}/v1/completions", content=b"{nope",
                      headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 400


def test_models_version_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200


QUEUED = ("kiln:request_queue_time_seconds_count", "kiln:request_queue_time_seconds_sum")


def test_metrics_count_a_finished_request(server, client):
    before = server.metric('kiln:request_success_total{finished_reason="length"}')
    tokens = server.metric("kiln:generation_tokens_total")
    (queued, waited), ttft = map(server.metric, QUEUED), server.metric(
        "kiln:time_to_first_token_seconds_sum")
    client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("kiln:num_requests_running", "kiln:num_requests_waiting",
                 "kiln:prompt_tokens_total", "kiln:time_to_first_token_seconds_bucket",
                 "kiln:e2e_request_latency_seconds_count", "kiln:kv_cache_usage_perc",
                 "kiln:request_queue_time_seconds_bucket"):
        assert name in text
    assert server.metric('kiln:request_success_total{finished_reason="length"}') == before + 1
    assert server.metric("kiln:generation_tokens_total") == tokens + 12
    assert server.metric(QUEUED[0]) == queued + 1
    assert 0 <= server.metric(QUEUED[1]) - waited <= server.metric(
        "kiln:time_to_first_token_seconds_sum") - ttft  # scheduled before its first token


def test_generated_tokens_are_counted_as_they_come(server, client):
    tokens = server.metric("kiln:generation_tokens_total")
    stream = _long_stream(client)
    try:
        for _, _chunk in zip(range(5), stream, strict=False):
            pass
        assert server.metric("kiln:num_requests_running") == 1  # still generating
        assert server.metric("kiln:generation_tokens_total") >= tokens + 5
    finally:
        stream.close()


def test_queue_time_is_observed_when_a_waiting_request_gets_a_slot(server, client):
    queued, waited = map(server.metric, QUEUED)
    running = [_long_stream(client) for _ in range(4)]  # the engine's 4 slots
    later = None
    try:
        for stream in running:
            next(iter(stream))
        assert server.metric(QUEUED[0]) == queued + 4
        later = _long_stream(client)  # waits for a slot (httpx returns at the headers)
        time.sleep(0.5)
        assert server.metric("kiln:num_requests_waiting") == 1
        assert server.metric(QUEUED[0]) == queued + 4
        running.pop().close()
        next(iter(later))
        assert server.metric(QUEUED[0]) == queued + 5
        assert server.metric(QUEUED[1]) - waited >= 0.5
    finally:
        for stream in running + ([later] if later else []):
            stream.close()
    assert _wait_for(lambda: server.metric("kiln:num_requests_running") == 0)


def _accepting(process) -> bool:
    try:
        httpx.get(f"{process.url}/version", timeout=1)
    except httpx.ConnectError:
        return False
    except httpx.TransportError:  # slow, but connected
        pass
    return True


def _long_stream(client):
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100, stream=True,
                                     temperature=0, extra_body={"ignore_eos": True})


def test_closing_a_stream_aborts_its_request(server, client):
    aborted = server.metric('kiln:request_success_total{finished_reason="abort"}')
    stream = _long_stream(client)
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert server.metric("kiln:num_requests_running") == 1
    stream.close()
    assert _wait_for(lambda: server.metric("kiln:num_requests_running") == 0)
    assert server.metric('kiln:request_success_total{finished_reason="abort"}') == aborted + 1
    assert server.metric("kiln:generation_tokens_total") > 0


def test_full_queue_is_429_with_retry_after(server, client):
    running = [_long_stream(client) for _ in range(4)]  # the engine's 4 slots
    for stream in running:
        next(iter(stream))
    waiting = [_long_stream(client) for _ in range(4)]  # --max_queue 4
    try:
        assert server.metric("kiln:num_requests_waiting") == 4
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        for stream in running + waiting:
            stream.close()
    assert _wait_for(lambda: server.metric("kiln:num_requests_running") == 0
                     and server.metric("kiln:num_requests_waiting") == 0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_finishes_in_flight_requests_and_exits_0(engine, sig):
    """SIGHUP (the terminal that started the server closed) drains as SIGTERM does."""
    import threading

    # a grace period far above the request's few seconds: 20 s was too short for 40 tokens on
    # this 2-core machine at load average 13 (37 came, then the abort)
    process = ServerProcess(engine, "--grace_period", "120")
    client = openai.OpenAI(base_url=f"{process.url}/v1", api_key=API_KEY, max_retries=0)
    results = []
    thread = threading.Thread(target=lambda: results.append(
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True})))
    thread.start()
    assert _wait_for(lambda: process.metric("kiln:num_requests_running") == 1)
    assert process.stop(sig, timeout=130) == 0
    thread.join(10)
    assert results and results[0].choices[0].finish_reason == "length"
    assert results[0].usage.completion_tokens == 40


def test_a_server_that_ignores_sigint_does_not_offer_ctrl_c(engine):
    """Started with SIGINT ignored (a background job of a shell), the server keeps ignoring it,
    as documented; its banner had still said "(Ctrl-C stops)", and a trial's kill -INT did
    nothing."""
    process = ServerProcess(engine, ignored=(signal.SIGINT,))
    try:
        process.proc.send_signal(signal.SIGINT)
        time.sleep(1)
        assert process.proc.poll() is None
    finally:
        code = process.stop(signal.SIGTERM, timeout=60)
    log = process.proc.stdout.read()
    assert code == 0, log
    assert f"(SIGTERM stops: this process ignores SIGINT; kill {process.proc.pid})" in log, log
    assert "Ctrl-C" not in log


def test_under_nohup_sighup_leaves_the_server_serving(engine):
    """``nohup kiln serve ... &``: the terminal's SIGHUP, ignored at start, does not drain the
    server (kiln had caught it as it does an unignored one); SIGTERM still does."""
    process = ServerProcess(engine, ignored=(signal.SIGHUP,))
    try:
        process.proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert process.proc.poll() is None
        assert httpx.get(f"{process.url}/health", timeout=5).status_code == 200
    finally:
        code = process.stop(signal.SIGTERM, timeout=60)
    assert code == 0, process.proc.stdout.read()


def test_what_outlives_the_grace_period_ends_as_abort_with_done(engine):
    """A stream still running when the grace period ends gets a last chunk with finish_reason
    ``abort`` and ``[DONE]`` (a trial found it cut mid-token, with tracebacks in the log)."""
    process = ServerProcess(engine, "--grace_period", "1")
    lines = _stream_with_signals(process, [signal.SIGINT])
    # the one signal ends the server: it exits on its own (a SIGTERM from stop() could land in
    # its teardown, a CI run's exit 1)
    try:
        code = process.proc.wait(60)
    finally:
        process.stop()
    assert code == 0, process.proc.stdout.read()
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"
    assert "Traceback" not in process.proc.stdout.read()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_aborts_at_once_and_streams_still_end_with_done(engine, sig):
    """Uvicorn's own handler takes a second SIGINT as a force exit: it stopped waiting and
    asyncio.run cancelled the handler mid-stream (this test, once sending a signal per SSE line,
    failed that way when the server handled the two signals apart). The messages name Ctrl-C
    only where it was one (a trial read "Ctrl-C again" after a SIGTERM)."""
    process = ServerProcess(engine, "--grace_period", "120")
    start = time.monotonic()
    lines = _stream_with_signals(process, [sig, sig])
    assert time.monotonic() - start < 60  # not the grace period's 120 s
    assert process.proc.wait(30) == 0
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"
    log = process.proc.stdout.read()
    assert "aborting the 1 running request(s) now" in log and "Traceback" not in log
    again, third = ("Ctrl-C again", "a third Ctrl-C") if sig == signal.SIGINT else \
        ("a second signal", "a third signal")
    assert f"({again} aborts them)" in log and f"({third} quits at once)" in log, log
    assert (sig == signal.SIGINT) == ("Ctrl-C" in log.replace("(Ctrl-C stops)", "")), log


def _stream_with_signals(process, signals: list[int]) -> list[str]:
    """The SSE lines of a long stream (nearly the engine's context: a max_tokens past it is a
    400, as vLLM's), sending ``signals[k]`` after the (k+2)-th data line, each
    once (the blank line after an event is not a new line to signal on); before the next
    signal, the server has handled the last (it closed its listening socket), so two signals
    never merge into one."""
    lines: list[str] = []
    try:
        with httpx.stream("POST", f"{process.url}/v1/completions",
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                          json={"model": MODEL, "prompt": PROMPT, "max_tokens": 120,
                                "stream": True, "ignore_eos": True}) as response:
            for line in response.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if 2 <= len(lines) < 2 + len(signals):
                    process.proc.send_signal(signals[len(lines) - 2])
                    assert _wait_for(lambda: not _accepting(process))
    except httpx.HTTPError as e:
        process.stop()
        raise AssertionError(f"{e}; server log: {process.proc.stdout.read()}") from None
    return lines
