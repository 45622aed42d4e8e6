"""``kiln serve --dp 2`` as a real process: two replicas of the SmolLM2 onnx engine behind one
server answer what one engine answers (concurrent completions, echo + logprobs scoring, which
asks the LLM and not an executor: replicas leave none in the server), the gauges and the
queue time come from the front, and a replica that dies turns /health to 503. ``kiln serve
--engine_process`` (the default on a GPU) is the same front over one replica."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

from kiln.runtime import LLM
from tests.serve.conftest import API_KEY, MODEL, ServerProcess

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def dp_server(engine):
    process = ServerProcess(engine, "--dp", "2", "-v")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def single(engine):
    with LLM(engine) as llm:
        yield llm


@pytest.fixture
def client(dp_server):
    return openai.OpenAI(base_url=f"{dp_server.url}/v1", api_key=API_KEY, max_retries=0)


def test_replicas_answer_what_one_engine_answers(dp_server, client, single):
    queued = dp_server.metric("kiln:request_queue_time_seconds_count")

    def complete(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at once: both replicas take some
        got = list(pool.map(complete, PROMPTS))
    params = single.default_params.replace(temperature=0, max_tokens=10)
    assert got == [r.text for r in single.generate(PROMPTS, params)]
    assert dp_server.metric("kiln:request_queue_time_seconds_count") == queued + len(PROMPTS)
    assert dp_server.metric("kiln:num_requests_running") == 0
    assert dp_server.metric("kiln:num_requests_waiting") == 0


def test_echo_logprobs_score_the_prompt_on_a_replica(client, single):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=0, echo=True,
                                    logprobs=2, temperature=0)
    (want,) = single.generate(PROMPTS[0], single.default_params.replace(
        temperature=0, max_tokens=0, prompt_logprobs=2))
    lp = out.choices[0].logprobs
    assert out.choices[0].text == PROMPTS[0] and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([p.logprob for p in want.prompt_logprobs[1:]],
                                                  abs=1e-5)


def test_a_replica_that_dies_turns_health_to_503(dp_server, client):
    """Last in the module: it ends the server's engine."""
    assert httpx.get(f"{dp_server.url}/health").status_code == 200
    replicas = sorted((p for p in psutil.Process(dp_server.proc.pid).children()
                       if "spawn_main" in " ".join(p.cmdline())), key=lambda p: p.pid)
    assert len(replicas) == 2, replicas  # (multiprocessing's resource tracker is the third)
    replicas[1].kill()  # started second: replica 1
    with pytest.raises(openai.InternalServerError) as e:  # the request that finds it dead
        for _ in range(20):  # one may still be served by replica 0 before the death is seen
            client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4)
    assert "replica 1" in e.value.body["message"], e.value.body
    assert httpx.get(f"{dp_server.url}/health").status_code == 503
    assert dp_server.stop() == 0
    log = dp_server.proc.stdout.read()
    assert "starting 2 replicas" in log and "replica 1" in log


def test_the_engine_in_a_process_of_its_own_serves_streams_and_stops(engine, single):
    server = ServerProcess(engine, "--engine_process", "-v")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

        def stream(prompt):
            chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                               temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks if c.choices)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(stream, PROMPTS))
        params = single.default_params.replace(temperature=0, max_tokens=10)
        assert got == [r.text for r in single.generate(PROMPTS, params)]
        cut = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=120,
                                        extra_body={"ignore_eos": True}, stream=True)
        next(iter(cut))
        cut.close()  # a client that leaves mid-stream: its request is aborted in the engine
        for _ in range(100):
            if server.metric("kiln:num_requests_running") == 0:
                break
            time.sleep(0.1)
        assert server.metric("kiln:num_requests_running") == 0
        children = [p for p in psutil.Process(server.proc.pid).children()
                    if "spawn_main" in " ".join(p.cmdline())]
        assert len(children) == 1, children
    finally:
        code = server.stop()
    assert code == 0
    log = server.proc.stdout.read()
    assert "in a process of its own (CPU)" in log and "[engine]" in log, log
    assert f"kiln serve: serving {engine} as '{MODEL}' on http://127.0.0.1:{server.port}" in log
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_an_engine_process_that_dies_ends_streams_with_an_error_event(engine):
    """A stream running when the engine process dies gets OpenAI's error body as an event,
    then [DONE]; a later stream is refused before it begins (500); /health turns 503; the
    server still stops cleanly (without -v: what a user sees by default)."""
    server = ServerProcess(engine, "--engine_process")
    try:
        # (nearly the engine's context: a max_tokens past it is a 400, as vLLM's)
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 120, "ignore_eos": True,
                "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        (child,) = [p for p in psutil.Process(server.proc.pid).children()
                    if "spawn_main" in " ".join(p.cmdline())]
        events = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers,
                          timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if len(events) == 2:
                    child.kill()
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_error"
        assert "the engine process" in error["message"] and "died" in error["message"]
        later = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers,
                           timeout=30)
        assert later.status_code == 500 and "the engine process" in later.text
        assert httpx.get(f"{server.url}/health").status_code == 503
    finally:
        code = server.stop()
    assert code == 0
    log = server.proc.stdout.read()
    assert "Traceback" not in log, log


def test_ctrl_c_while_a_stopped_engine_process_is_awaited_kills_it(engine):
    """SIGSTOP the engine process, then Ctrl-C: the server waits for it to exit, says so after
    a second, and a second Ctrl-C kills it at once (exit 130, nothing left behind)."""
    server = ServerProcess(engine, "--engine_process")
    (child,) = [p for p in psutil.Process(server.proc.pid).children()
                if "spawn_main" in " ".join(p.cmdline())]
    child.suspend()
    server.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 20
    log = []
    while time.monotonic() < deadline:  # the server's word that it waits for the engine
        line = server.proc.stdout.readline()
        log.append(line)
        if "to exit (Ctrl-C: kill it now)" in line:
            break
    assert "to exit (Ctrl-C: kill it now)" in log[-1], log
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(10) == 130
    assert time.monotonic() - started < 3
    assert not (child.is_running() and child.status() != psutil.STATUS_ZOMBIE)


def test_a_second_ctrl_c_kills_a_stopped_replica_at_once(engine):
    """SIGSTOP a replica with a stream on it, then Ctrl-C twice: the first drains (the stream
    cannot finish: the grace period runs), the second aborts the stream and the server exits at
    once, the stopped replica killed. The second had been the drain's, and the replicas were
    then asked to exit as after one: 5 s more waiting for the stopped one (a trial's 6.5 s)."""
    import threading

    server = ServerProcess(engine, "--dp", "2", "--grace_period", "60")
    replicas = sorted((p for p in psutil.Process(server.proc.pid).children()
                       if "spawn_main" in " ".join(p.cmdline())), key=lambda p: p.pid)
    try:
        assert len(replicas) == 2, replicas
        replicas[0].suspend()  # replica 0: where a lone request goes (ties to the lowest index)
        lines: list[str] = []
        body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 120, "ignore_eos": True,
                "stream": True}

        def stream():
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"}) as response:
                lines.extend(line for line in response.iter_lines() if line)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        deadline = time.monotonic() + 20
        while server.metric("kiln:num_requests_waiting") != 1:  # on the stopped replica
            assert time.monotonic() < deadline and reader.is_alive(), lines
            time.sleep(0.1)
        first = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        log = [server.proc.stdout.readline()]
        while "kiln serve: stopping" not in log[-1]:  # handled: the two signals do not merge
            assert log[-1], log
            log.append(server.proc.stdout.readline())
        time.sleep(max(0.0, first + 0.75 - time.monotonic()))
        second = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        code = server.proc.wait(30)
        took = time.monotonic() - second
        left = [r.pid for r in replicas if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]
        reader.join(10)
    finally:
        for replica in replicas:  # one the server left behind would hold its memory for good
            with contextlib.suppress(psutil.NoSuchProcess):
                replica.kill()
        server.stop()
    log += server.proc.stdout.readlines()
    assert code == 0, log  # the second signal is the drain's: aborted, not interrupted
    assert took < 3, (took, log)  # 5 s and more while the pool waited for the stopped replica
    assert not left, (left, log)
    assert lines[-1] == "data: [DONE]", lines
    assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"
    assert any("aborting the 1 running request(s) now" in line for line in log), log
    assert not any("did not exit" in line or "Traceback" in line for line in log), log
