"""kiln bench_serve against a real kiln serve process (tests/serve/conftest.py): the report's
shape and sanity, and one-line errors for bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest
from click.testing import CliRunner

from kiln.cli.main import main
from kiln.runtime.params import SEED_MAX, SEED_MIN
from kiln.serve import bench
from tests.serve.conftest import API_KEY, MODEL, free_port


def _bench(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, ["bench_serve", *args], env=env)


def test_report_per_rate_with_sane_figures(server, tmp_path):
    out = tmp_path / "report.json"
    result = _bench("--serve", server.url, "--api_key", API_KEY, "--request_rates", "inf,50",
                    "--num_requests", "6", "--input_len", "8", "--output_len", "6",
                    "--max_concurrency", "4", "--json_output", str(out))
    assert result.exit_code == 0, result.output
    assert "rate inf (all at once), max concurrency 4: 6 requests" in result.output
    assert "rate 50 req/s" in result.output
    report = json.loads(out.read_text())
    assert report["kind"] == "kiln bench_serve" and report["model"] == MODEL
    assert report["workload"]["request_rates"] == ["inf", 50.0]
    assert [r["request_rate"] for r in report["rates"]] == ["inf", 50.0]
    for rate in report["rates"]:
        assert rate["completed"] == 6 and rate["failed"] == 0 and rate["first_error"] is None
        assert rate["output_tokens"] == 6 * 6
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            s = rate[name]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"], (name, s)
        assert rate["ttft_ms"]["p99"] <= rate["e2e_ms"]["p99"]
        assert rate["e2e_ms"]["mean"] <= rate["duration_s"] * 1000 + 1
        assert rate["output_tokens_per_s"] == pytest.approx(
            rate["output_tokens"] / rate["duration_s"])
        assert rate["requests_per_s"] == pytest.approx(6 / rate["duration_s"])
    # the file is a kiln bench_serve report: written again without complaint
    again = _bench("--serve", server.url, "--api_key", API_KEY, "--num_requests", "1",
                   "--input_len", "4", "--output_len", "2", "--warmup", "0",
                   "--json_output", str(out))
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text())["rates"][0]["output_tokens"] == 2


def test_json_output_dash_gives_the_json_alone_on_stdout(server):
    """As kiln bench and kiln eval: the table had been printed on stdout before the JSON."""
    result = _bench("--serve", server.url, "--api_key", API_KEY, "--num_requests", "1",
                    "--input_len", "4", "--output_len", "2", "--warmup", "0",
                    "--json_output", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rates"][0]["output_tokens"] == 2
    assert "rate inf (all at once)" in result.stderr


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unreachable_url_is_one_line():
    """In words: a trial's had been aiohttp's "(ClientConnectorError: Cannot connect to host
    127.0.0.1:9 ssl:default [Connect call failed ('127.0.0.1', 9)])"."""
    url = f"http://127.0.0.1:{free_port()}"
    _one_line_error(_bench("--serve", url),
                    f"cannot reach {url} (connection refused); is kiln serve running there?")
    _one_line_error(_bench("--serve", "localhost:8000"), "not an http:// or https:// URL")


def test_a_server_that_does_not_answer_is_said_in_words(monkeypatch):
    monkeypatch.setattr(bench, "MODELS_TIMEOUT_S", 0.2)
    with socket.socket() as listener:  # connections are taken (the backlog), never answered
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        _one_line_error(_bench("--serve", url),
                        f"cannot reach {url} (no answer in 0.2 s); is kiln serve running there?")


@pytest.mark.parametrize("error, words", [
    (ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)"), "connection refused"),
    (OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9, 0, 0), [Errno 111] "
             "Connect call failed ('127.0.0.1', 9)"), "connection refused"),
    (socket.gaierror(-2, "Name or service not known"), "name or service not known"),
])
def test_a_connection_failure_is_said_in_its_reason_words(error, words):
    assert bench._os_words(error) == words


@pytest.mark.parametrize("url, why", [
    ("http://[::1", "'http://[::1' is not a URL (Invalid IPv6 URL)"),
    ("ftp://127.0.0.1:8000", "'ftp://127.0.0.1:8000' is not an http:// or https:// URL"),
    ("http://:8000", "'http://:8000' names no host"),
    ("http://127.0.0.1:99999", "'http://127.0.0.1:99999' has a port that is not a number in "
                               "1-65535"),
    ("http://127.0.0.1:x", "'http://127.0.0.1:x' has a port that is not a number in 1-65535"),
    # a retest's: aiohttp's text, /v1/models after the query, a DNS lookup of "exa mple"
    ("http://\udced\udca0", "'http://\\udced\\udca0' is not a URL (it holds a character "
                            "that is not ASCII)"),
    ("http://127.0.0.1:8000?x=1", "'http://127.0.0.1:8000?x=1' has a query or fragment; the "
                                  "base URL takes neither"),
    ("http://127.0.0.1:8000#f", "'http://127.0.0.1:8000#f' has a query or fragment; the base "
                                "URL takes neither"),
    ("http://exa mple:80", "'http://exa mple:80' has a space in its host"),
])
def test_a_malformed_url_is_refused_as_such_before_any_connection(url, why, monkeypatch):
    """A trial's ``http://[::1`` had been "cannot reach http://[::1 (InvalidUrlClientError:
    ...); is kiln serve running there?"."""
    monkeypatch.setattr(bench, "_benchmark", None)  # (called, it would raise a TypeError)
    result = _bench("--serve", url)
    assert result.exit_code == 2 and result.output.startswith(
        f"error: Invalid value for '--serve': {why}; give the running server's "
        f"http://HOST:PORT (see ") and result.output.count("\n") == 1, result.output
    with pytest.raises(bench.ServeBenchError, match="give --serve as http://HOST:PORT"):
        bench.run_serve_benchmark(url, bench.ServeWorkload())


@pytest.mark.parametrize("rates, fragment", [("0", "'0': a request rate must be > 0"),
                                             ("1,abc", "'abc' is not a number or inf"),
                                             ("-2", "'-2': a request rate must be > 0"),
                                             ("nan", "'nan': a request rate must be > 0")])
def test_bad_rate_is_one_line(rates, fragment):
    _one_line_error(_bench("--serve", "http://127.0.0.1:1", "--request_rates", rates),
                    "--request_rates", fragment)


@pytest.mark.parametrize("seed", [1.5, True, 2**64, -2**63 - 1])
def test_a_workload_refuses_a_seed_outside_kiln_bench_range(seed):
    with pytest.raises(bench.ServeBenchError) as info:
        bench.ServeWorkload(seed=seed)
    assert str(info.value) == (f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], found "
                               f"{seed!r}")


def test_seeds_are_read_modulo_2_64_as_kiln_bench_reads_them():
    """-1 had been refused (Python's random.Random reads it as 1), where kiln bench takes it
    as 2**64 - 1, as the sampling generators read it; the warm-up's prompts draw alike."""
    def drawn(seed: int) -> tuple[list[list[int]], list[float]]:
        workload = bench.ServeWorkload(input_len=4, num_requests=3, vocab_size=100, seed=seed)
        return bench.make_prompts(workload), bench.arrival_offsets(3, 10.0, seed)

    assert drawn(-1) == drawn(SEED_MAX) and drawn(-1) != drawn(1)
    assert drawn(SEED_MIN) == drawn(2**63) and drawn(SEED_MIN) != drawn(0)
    before = random.Random(7)  # a seed below 2**64 - 1 draws as before: Random(7), Random(8)
    arrivals = random.Random(8)
    assert drawn(7) == ([[before.randrange(100) for _ in range(4)] for _ in range(3)],
                        [0.0, x := arrivals.expovariate(10.0), x + arrivals.expovariate(10.0)])


def test_a_negative_seed_runs_against_a_server(server, tmp_path):
    out = tmp_path / "report.json"
    result = _bench("--serve", server.url, "--api_key", API_KEY, "--num_requests", "2",
                    "--input_len", "4", "--output_len", "2", "--seed", "-1",
                    "--json_output", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["workload"]["seed"] == -1 and report["rates"][0]["completed"] == 2


def test_refused_key_unknown_model_and_too_long_are_one_line(server):
    _one_line_error(_bench("--serve", server.url, "--api_key", "wrong"),
                    "refused the API key (401); check the key (the server's --api_key or "
                    "KILN_API_KEY)")
    _one_line_error(_bench("--serve", server.url, env={"KILN_API_KEY": ""}),
                    "refused a request without an API key (401); pass --api_key or set "
                    "KILN_API_KEY")
    _one_line_error(_bench("--serve", server.url, "--api_key", API_KEY, "--model", "nope"),
                    "serves no model 'nope'")
    _one_line_error(_bench("--serve", server.url, "--api_key", API_KEY, "--input_len", "90",
                           "--output_len", "90"), "--input_len + --output_len = 180 exceeds "
                                                  "the server's max_model_len 129 (prompt and "
                                                  "output tokens of a request)")


def test_json_output_never_overwrites_a_foreign_file(server, tmp_path):
    foreign = tmp_path / "notes.json"
    foreign.write_text("{}")
    _one_line_error(_bench("--serve", server.url, "--json_output", str(foreign)),
                    "is not a kiln bench_serve report")
    assert foreign.read_text() == "{}"


def test_without_the_serve_extra_it_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import aiohttp raises ImportError
    monkeypatch.delitem(sys.modules, "kiln.serve.bench", raising=False)
    _one_line_error(_bench("--serve", "http://127.0.0.1:9"),
                    "kiln bench_serve needs the serve extra (aiohttp is missing)",
                    "pip install 'kiln-llm[serve]'")


@pytest.mark.parametrize("completed, failed, words", [
    (1, 0, "1 request completed (8 tokens in"), (2, 0, "2 requests completed (8 tokens in"),
    (8, 3, "8 of 11 requests completed (8 tokens in")])
def test_the_table_counts_requests_in_good_english(completed, failed, words):
    """A trial's table said "1 requests"; another's "8 requests (8 in / 4 out) ..., 3 failed"
    read as 8 sent."""
    from kiln.runtime.stats import Stats
    from kiln.serve.bench import RateReport, ServeWorkload

    stats = Stats.of([1.0])
    report = RateReport(1.0, None, 1.0, completed, failed, 4 * completed, stats, stats, stats,
                        stats, 4.0, 1.0, "HTTP 429: busy" if failed else None)
    first = f"; {failed} failed (first: HTTP 429: busy)" if failed else ""
    assert f": {words} / 4 out each) in 1.00 s{first}\n" in \
        report.table(ServeWorkload(8, 4, completed + failed))


def test_a_rate_whose_arrivals_take_long_is_warned_about(server, monkeypatch, caplog):
    """A trial's --request_rates 1e-9 waited without a word (its arrivals: ~63 years)."""
    import logging

    from kiln.serve import bench

    assert bench._duration(2 / 1e-9) == "63.4 years" and bench._duration(7200) == "2 h"
    monkeypatch.setattr(bench, "LONG_RATE_S", 0.05)
    with caplog.at_level(logging.WARNING, logger="kiln.serve.bench"):
        result = _bench("--serve", server.url, "--api_key", API_KEY, "--request_rates", "inf,20",
                        "--num_requests", "3", "--input_len", "4", "--output_len", "2",
                        "--warmup", "0")
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["at 20 requests/s, 3 requests arrive over about 0 s; Ctrl-C stops the "
                      "run"], warned


@contextlib.contextmanager
def _flaky_server(fail_every: int, fail_from: int | None = None, cut_from: int | None = None,
                  drop_from: tuple[int, str] | None = None):
    """The URL of an OpenAI-compatible server of one model, "flaky", whose every
    ``fail_every``-th completion request (in the order received), and every one from the
    ``fail_from``-th on, is an HTTP 500; from the ``cut_from``-th on, each stream stops after
    its first chunk and the connection is closed (a server killed mid-run); from the
    ``drop_from`` ``(n, how)``'s n-th on, the request is read and its connection "reset" or
    "close"d unanswered; the others stream ``max_tokens`` one-character chunks."""
    received = iter(range(1 << 30))  # next() under the lock: one count per request
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def send(self, status: int, kind: str, text: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(text.encode())))
            self.end_headers()
            self.wfile.write(text.encode())

        def do_GET(self) -> None:
            self.send(200, "application/json", json.dumps({"data": [{"id": "flaky"}]}))

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                n = next(received)
            if drop_from is not None and n >= drop_from[0]:
                self.close_connection = True  # (socketserver's own shutdown then closes it)
                if drop_from[1] == "reset":  # a close() with no linger sends a TCP RST
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                return
            if n % fail_every == fail_every - 1 or (fail_from is not None and n >= fail_from):
                self.send(500, "application/json",
                          json.dumps({"error": {"message": "out of slots"}}))
                return
            tokens = body["max_tokens"]
            events = [{"choices": [{"index": 0, "text": "a"}]}] * tokens + \
                [{"choices": [], "usage": {"completion_tokens": tokens}}]
            stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            if cut_from is not None and n >= cut_from:
                self.send_response(200)
                self.send_header("Content-Length", str(len(stream)))
                self.end_headers()
                self.wfile.write(f"data: {json.dumps(events[0])}\n\n".encode())
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send(200, "text/event-stream", stream)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("rates, line", [
    ("inf", "error: 2 of 6 requests failed (the figures are of the 4 that completed); the "
            "first: HTTP 500: out of slots"),
    ("inf,1000", "error: 4 of 12 requests failed (2 at rate inf, 2 at 1000 req/s; the figures "
                 "are of the 8 that completed); the first: HTTP 500: out of slots"),
])
def test_failed_requests_are_said_in_one_line_after_the_figures_and_exit_1(tmp_path, rates,
                                                                           line):
    """A trial's benchmark with failed requests exited 0, the failures said only inside the
    table; the figures of the completed requests are still printed and written."""
    out = tmp_path / "report.json"
    with _flaky_server(fail_every=3) as url:
        result = _bench("--serve", url, "--request_rates", rates, "--num_requests", "6",
                        "--input_len", "4", "--output_len", "3", "--warmup", "0",
                        "--json_output", str(out))
    assert result.exit_code == 1, result.output
    assert "4 of 6 requests completed (4 tokens in / 3 out each)" in result.stdout
    assert "TTFT (ms)" in result.stdout
    assert result.stderr.splitlines() == [f"wrote {out}", line]
    for rate in json.loads(out.read_text())["rates"]:
        assert (rate["completed"], rate["failed"], rate["first_error"]) == \
            (4, 2, "HTTP 500: out of slots")
        assert rate["output_tokens"] == 4 * 3


def test_a_rate_where_every_request_failed_is_reported_and_the_others_keep_theirs(tmp_path):
    """A trial's second rate failed whole: the run ended at exit 2 with no report, the first
    rate's figures lost."""
    out = tmp_path / "report.json"
    with _flaky_server(fail_every=1 << 30, fail_from=3) as url:
        result = _bench("--serve", url, "--request_rates", "inf,1000", "--num_requests", "3",
                        "--input_len", "4", "--output_len", "3", "--warmup", "0",
                        "--json_output", str(out))
    assert result.exit_code == 1, result.output
    assert "3 requests completed (4 tokens in / 3 out each)" in result.stdout
    assert "0 of 3 requests completed (4 tokens in / 3 out each) in 0.00 s; 3 failed (first: " \
        "HTTP 500: out of slots)" in result.stdout
    assert result.stderr.splitlines()[-1] == (
        "error: 3 of 6 requests failed (3 at 1000 req/s; the figures are of the 3 that "
        "completed); the first: HTTP 500: out of slots")
    first, second = json.loads(out.read_text())["rates"]
    assert (first["completed"], first["failed"]) == (3, 0) and first["ttft_ms"]["mean"] > 0
    assert (second["completed"], second["failed"], second["ttft_ms"]["mean"],
            second["output_tokens_per_s"]) == (0, 3, None, 0.0)



@pytest.mark.parametrize("server, words", [
    # a trial's server killed mid-run had been aiohttp's own text ("ClientPayloadError:
    # Response payload is not completed: <TransferEncodingError: 400, ...>")
    ({"cut_from": 2}, "{url} closed the connection mid-response (did the server stop?)"),
    # in a first request's words (a retest's reset mid-run had been aiohttp's "ClientOSError:
    # [Errno 104] Connection reset by peer")
    ({"drop_from": (2, "reset")},
     "no answer from {url} (the connection was reset by the server); did the server stop?"),
    ({"drop_from": (2, "close")}, "no answer from {url} (the server closed the connection "
                                  "without answering); did the server stop?"),
])
def test_a_server_that_stops_or_drops_requests_mid_run_is_said_in_words(server, words):
    with _flaky_server(fail_every=1 << 30, **server) as url:
        result = _bench("--serve", url, "--num_requests", "4", "--input_len", "4",
                        "--output_len", "3", "--warmup", "0", "--max_concurrency", "1")
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == (
        f"error: 2 of 4 requests failed (the figures are of the 2 that completed); the first: "
        f"{words.format(url=url)}")


def test_a_server_gone_before_a_request_is_said_in_words():
    url = f"http://127.0.0.1:{free_port()}"
    result = bench._Result()

    async def one() -> None:
        async with aiohttp.ClientSession() as session:
            await bench._one(session, url, {}, None, result)

    asyncio.run(one())
    assert result.error == f"cannot connect to {url} (connection refused); is the server " \
                           f"still running?", result.error


def test_https_to_a_plain_http_server_says_it_does_not_speak_tls():
    """A retest's had been "cannot reach https://... (operation not permitted)": OpenSSL's
    error 1 read as an errno."""
    with _flaky_server(fail_every=1 << 30) as url:
        address = url.removeprefix("http://")
        _one_line_error(_bench("--serve", f"https://{address}"),
                        f"cannot reach https://{address}: the server at that address does not "
                        f"speak TLS (it answered in plain HTTP); use http://{address}")


def test_an_untrusted_tls_certificate_is_said_in_words():
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                                            "verify failed: self-signed certificate")
    error.reason, error.verify_message = "CERTIFICATE_VERIFY_FAILED", "self-signed certificate"
    failure = aiohttp.ClientConnectorCertificateError(None, error)
    assert bench._unreached(failure, "https://h:1", 10) == (
        "cannot reach https://h:1: its TLS certificate is not trusted (self-signed "
        "certificate); make this machine trust its CA (the SSL_CERT_FILE environment variable "
        "names a CA file)")


@pytest.mark.parametrize("verify_code, why", [
    (64, "IP address mismatch, certificate is not valid for '127.0.0.1'."),
    (62, "hostname mismatch, certificate is not valid for '127.0.0.1'."),
])
def test_a_certificate_for_another_name_says_so(verify_code, why):
    """A retest's certificate for localhost, asked as 127.0.0.1, had been "not trusted (IP
    address mismatch...); make this machine trust its CA"."""
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {why}")
    error.reason, error.verify_code, error.verify_message = \
        "CERTIFICATE_VERIFY_FAILED", verify_code, why
    failure = aiohttp.ClientConnectorCertificateError(None, error)
    assert bench._unreached(failure, "https://127.0.0.1:1", 10) == (
        f"cannot reach https://127.0.0.1:1: its TLS certificate is not valid for 127.0.0.1 "
        f"({why[:-1]}); use a host name the certificate names")


@contextlib.contextmanager
def _raw_server(answer: bytes | None, reset: bool = False):
    """The address (HOST:PORT) of a TCP server that sends ``answer`` on each connection and
    keeps it open (None: ends it at once; ``reset``: reads the request, then resets it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                connection, _ = listener.accept()
                taken.append(connection)
                if reset:
                    connection.recv(1024)
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    connection.close()
                elif answer is None:  # (a close() with the request unread would reset)
                    connection.shutdown(socket.SHUT_WR)
                else:
                    connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join()
        for connection in taken:
            connection.close()


SSH = b"SSH-2.0-OpenSSH_9\r\n"


@pytest.mark.parametrize("scheme, words", [
    # a retest's: "does not speak TLS (it answered in plain HTTP)" of an SSH server
    ("https", "the server at that address does not speak TLS (it answered with something that "
              "is not HTTP: b'SSH-2.0-OpenSSH_9\\r\\n'); is kiln serve running there?"),
    # a retest's: aiohttp's multi-line 'ClientResponseError: 400, message="Bad status line:...'
    ("http", "the server at that address does not speak HTTP (its answer began "
             "b'SSH-2.0-OpenSSH_9\\r\\n'); is kiln serve running there?"),
])
def test_a_server_that_speaks_neither_tls_nor_http_is_said_so(scheme, words):
    with _raw_server(SSH) as address:
        _one_line_error(_bench("--serve", f"{scheme}://{address}"),
                        f"cannot reach {scheme}://{address}: {words}")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_server_that_closes_at_once_is_said_in_words(scheme):
    """A retest's had been "(connectionResetError)" (https) and "(ServerDisconnectedError:
    Server disconnected)" (http)."""
    with _raw_server(None) as address:
        _one_line_error(_bench("--serve", f"{scheme}://{address}"),
                        f"cannot reach {scheme}://{address} (the server closed the connection "
                        f"without answering); is kiln serve running there?")


def test_a_bare_connection_reset_is_said_in_its_errno_words():
    """asyncio raises it bare where a TLS handshake meets the end of the stream: a retest's
    had been said "connectionResetError", its class name."""
    assert bench._os_words(ConnectionResetError()) == "connection reset by peer"


def test_a_reset_that_is_no_tls_server_is_said_in_words():
    with _raw_server(None, reset=True) as address:
        _one_line_error(_bench("--serve", f"http://{address}"),
                        f"cannot reach http://{address} (the connection was reset by the "
                        f"server); is kiln serve running there?")


@pytest.fixture
def tls_address(tmp_path):
    """The address of an HTTP server in TLS, its certificate self-signed for localhost."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_to_a_tls_server_says_use_https(tls_address):
    """A retest's had been "(ClientOSError: [Errno 104] Connection reset by peer)"."""
    _one_line_error(_bench("--serve", f"http://{tls_address}"),
                    f"cannot reach http://{tls_address}: the server at that address speaks "
                    f"TLS; use https://{tls_address}")


@pytest.mark.parametrize("answer", [
    b"\x15\x03\x01\x00\x02\x02\x46",  # a TLS alert (protocol version)
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 51\r\nConnection: close\r\n\r\n"
    b"The plain HTTP request was sent to HTTPS port\r\n\r\n\r\n",  # nginx's
])
def test_a_tls_server_s_other_answers_to_http_say_use_https(answer):
    with _raw_server(answer) as address:
        _one_line_error(_bench("--serve", f"http://{address}"),
                        f"cannot reach http://{address}: the server at that address speaks "
                        f"TLS; use https://{address}")


def test_a_warm_up_where_every_request_failed_stops_in_one_line(tmp_path):
    """The measured rates would fail alike (since the all-failed rate no longer raised, the
    warm-up's check had gone quiet)."""
    out = tmp_path / "report.json"
    with _flaky_server(fail_every=1 << 30, fail_from=0) as url:
        result = _bench("--serve", url, "--num_requests", "3", "--input_len", "4",
                        "--output_len", "3", "--json_output", str(out))
    _one_line_error(result, "every warm-up request failed (3 requests); the first: HTTP 500: "
                            "out of slots")
    assert not out.exists()


def test_warm_up_failures_are_said_and_the_rates_go_on(tmp_path, caplog):
    with _flaky_server(fail_every=1 << 30, fail_from=2) as url, caplog.at_level("WARNING"):
        result = _bench("--serve", url, "--num_requests", "3", "--input_len", "4",
                        "--output_len", "3")
    assert "1 of 3 warm-up requests failed (the first: HTTP 500: out of slots); the measured " \
           "rates follow" in caplog.messages
    assert result.exit_code == 1  # the measured requests failed too: said after the table
    assert result.stderr.splitlines()[-1] == "error: 3 of 3 requests failed (no figures); the " \
                                             "first: HTTP 500: out of slots"


@pytest.mark.parametrize("args, env, source", [(["--api_key", "a\nb"], None, "--api_key"),
                                               (["--api_key", "ключ"], None, "--api_key"),
                                               ([], {"KILN_API_KEY": "a\rb"}, "KILN_API_KEY")])
def test_a_key_no_header_carries_is_refused_naming_its_source(args, env, source, monkeypatch):
    """A retest's newline key had been aiohttp's traceback ("Forbidden control character
    detected in headers"), exit 1."""
    monkeypatch.setattr(bench, "_benchmark", None)  # (called, it would raise a TypeError)
    _one_line_error(_bench("--serve", "http://127.0.0.1:1", *args, env=env),
                    f"the API key given by {source} has a character an HTTP header cannot "
                    f"carry")


def test_a_url_s_scheme_is_read_in_any_case():
    """URL schemes are case-insensitive (RFC 3986): a retest's HTTP://... had been refused."""
    assert bench.url_error("HTTP://127.0.0.1:8000") is None
    assert bench.url_error("Https://example.com") is None
