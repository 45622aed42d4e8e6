"""Load on a real ``kiln serve`` process (issue 13's load test): 64 concurrent streaming
clients on the SmolLM2 onnx engine, a quarter of them disconnecting mid-stream at seeded random
points.

Checks:
- every surviving stream (completions and chat) carries exactly the text the same request gives
  alone (greedy; the expected texts are non-streaming requests sent one at a time first), ends
  with finish_reason ``length`` and ``data: [DONE]``: no request lost or cut;
- every request finished exactly once in ``kiln:request_success_total``: the survivors as
  ``length``, each disconnected one as ``abort`` (or, if its request ended before the server saw
  the disconnect, as ``length``; they ask for many more tokens than they read, so most abort);
- afterwards ``kiln:num_requests_running``/``kiln:num_requests_waiting`` and
  ``kiln:kv_cache_usage_perc`` are 0, and every KV-cache slot is free: ``max_batch_size`` long
  requests then run at once (a leaked slot would leave one of them waiting).
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.runtime.test_smollm2_onnx import shared_dir
from tests.serve.conftest import API_KEY, MODEL, ServerProcess

pytestmark = pytest.mark.slow  # ~30-40 s on 2 cores (in the default suite, as test_server)

CLIENTS = 64
MAX_TOKENS = 12
DISCONNECT_MAX_TOKENS = 48  # disconnecting clients never reach their end
DISTINCT = 8  # distinct requests, each sent alone first (~1 s each on 2 busy cores)
SLOTS = 16  # engine16's max_batch_size
SUBJECTS = ["The capital of France is", "My favourite fruit is", "Once upon a time",
            "The best way to learn", "In 1969, the first", "Water boils at",
            "A good cup of coffee", "The tallest mountain"]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def engine16(engine, tmp_path_factory) -> Path:
    """The SmolLM2 onnx engine with 16 slots (the 4 of ``engine`` make the test twice slower)."""
    from kiln.builder import build

    with shared_dir(tmp_path_factory, "smollm2-onnx") as root:  # ckpt: made by ``engine``
        if not (root / "engine-b16" / "config.json").is_file():
            build(root / "ckpt", root / "engine-b16", backend="onnx", max_batch_size=SLOTS,
                  max_seq_len=128, max_input_len=64, max_num_tokens=64, overwrite=True)
        return root / "engine-b16"


@pytest.fixture(scope="module")
def load_server(engine16):
    process = ServerProcess(engine16)  # no --max_queue: all 64 are accepted
    yield process
    process.stop()


def _request(i: int) -> tuple[str, dict]:
    """Client i's endpoint and body (without stream/max_tokens): DISTINCT varied requests (so
    each is also in flight several times at once), 1 in 4 chat."""
    i %= DISTINCT
    subject = SUBJECTS[i % len(SUBJECTS)]
    if i % 4 == 3:
        return "chat/completions", {"messages": [{"role": "user",
                                                  "content": f"Complete: {subject}"}]}
    return "completions", {"prompt": subject}


def _body(i: int, max_tokens: int, stream: bool) -> dict:
    return {**_request(i)[1], "model": MODEL, "temperature": 0, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}


def _text(choice: dict) -> str:
    if "message" in choice:
        return choice["message"]["content"]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice["text"]


def _stream(url: str, i: int, max_tokens: int, read: int | None) -> dict:
    """Stream client i's request; with ``read``, close the connection after that many chunks."""
    chunks, lines = [], []
    with httpx.Client(timeout=120) as http, http.stream(
            "POST", f"{url}/v1/{_request(i)[0]}", headers=HEADERS,
            json=_body(i, max_tokens, True)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(line)
            if line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
            if read is not None and len(chunks) >= read:
                break  # leaving the block closes the connection mid-stream
    return {"chunks": chunks, "lines": lines}


def _success(server: ServerProcess) -> dict[str, float]:
    return {reason: server.metric(f'kiln:request_success_total{{finished_reason="{reason}"}}')
            for reason in ("length", "stop", "abort", "error")}


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_64_streaming_clients_with_disconnects(load_server):
    url = load_server.url
    rng = random.Random(13)
    disconnect = set(rng.sample(range(CLIENTS), CLIENTS // 4))
    read_before_close = {i: rng.randrange(0, 8) for i in disconnect}  # 0: right after headers

    expected = {}
    for i in range(DISTINCT):  # alone: one request at a time
        response = httpx.post(f"{url}/v1/{_request(i)[0]}", headers=HEADERS, timeout=60,
                              json=_body(i, MAX_TOKENS, False))
        assert response.status_code == 200, response.text
        expected[i] = _text(response.json()["choices"][0])
    before = _success(load_server)

    results: dict[int, dict | BaseException] = {}
    start = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        try:
            start.wait()
            if i in disconnect:
                results[i] = _stream(url, i, DISCONNECT_MAX_TOKENS, read_before_close[i])
            else:
                results[i] = _stream(url, i, MAX_TOKENS, None)
        except BaseException as e:  # reported below, with the client's number
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    errors = {i: r for i, r in results.items() if isinstance(r, BaseException)}
    assert not errors and len(results) == CLIENTS, errors

    for i in sorted(set(range(CLIENTS)) - disconnect):
        chunks, lines = results[i]["chunks"], results[i]["lines"]
        assert lines[-1] == "data: [DONE]", (i, lines[-3:])
        text = "".join(_text(c["choices"][0]) for c in chunks if c["choices"])
        assert text == expected[i % DISTINCT], (i, text, expected[i % DISTINCT])
        assert chunks[-1]["choices"][0]["finish_reason"] == "length", (i, chunks[-1])
    for i in disconnect:
        assert "data: [DONE]" not in results[i]["lines"]

    # every request finished exactly once: survivors by length, the disconnected by abort (or
    # length, when their request ended before the server saw the disconnect)
    survivors = CLIENTS - len(disconnect)

    def accounted() -> bool:
        after = _success(load_server)
        return sum(after.values()) - sum(before.values()) == CLIENTS

    assert _wait_for(accounted), (before, _success(load_server))
    after = _success(load_server)
    delta = {reason: after[reason] - before[reason] for reason in after}
    assert delta["stop"] == delta["error"] == 0, delta
    assert survivors <= delta["length"] and delta["abort"] <= len(disconnect), delta
    assert delta["abort"] >= len(disconnect) // 2, delta  # they stop reading long before the end

    assert _wait_for(lambda: load_server.metric("kiln:num_requests_running") == 0
                     and load_server.metric("kiln:num_requests_waiting") == 0)
    assert load_server.metric("kiln:kv_cache_usage_perc") == 0

    # every slot free: SLOTS long requests then all hold a slot at once
    with httpx.Client(timeout=60, headers=HEADERS) as http:
        responses = [http.send(http.build_request("POST", f"{url}/v1/{_request(i)[0]}",
                                                  json=_body(i, 40, True)), stream=True)
                     for i in range(SLOTS)]
        try:
            lines = [response.iter_lines() for response in responses]  # kept: a dropped
            for line in lines:  # iterator closes its response
                assert next(line).startswith("data: {")
            assert load_server.metric("kiln:num_requests_running") == SLOTS
            assert load_server.metric("kiln:kv_cache_usage_perc") == 1
        finally:
            for response in responses:
                response.close()
    assert _wait_for(lambda: load_server.metric("kiln:num_requests_running") == 0)
