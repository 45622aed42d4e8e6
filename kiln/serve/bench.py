"""A serving benchmark against a running OpenAI-compatible server (the figures of ``vllm bench
serve``): the client behind ``kiln bench_serve``.

Contract: the URL is the server's root (``http://host:port``; an OpenAI client's base URL,
ending in ``/v1``, is taken as its root; one of no http(s) scheme, host or port in 1-65535 is
refused before any connection, :func:`url_error`). :func:`run_serve_benchmark` first asks
``GET /v1/models`` (the model name, the
server's ``max_model_len``; an unreachable URL or a refused key is one :class:`ServeBenchError`;
where its failure leaves open what the server speaks, TLS, HTTP or neither, one bare GET asks,
:func:`_probe`),
runs ``warmup`` unmeasured rounds, then for each request rate sends ``num_requests`` streaming
``POST /v1/completions`` requests of ``input_len`` random token ids (seeded; ids drawn from
``[0, vocab_size)``) that each generate exactly ``output_len`` tokens (greedy, ``ignore_eos``).
Arrivals are a Poisson process of the rate (``inf``: all sent at once); at most
``max_concurrency`` are in flight (the rest wait in the client, and their clock starts when
they are sent). One aiohttp ClientSession, one kept-alive connection per request in flight.
aiohttp, as vLLM's benchmark client: the client's own time per request is part of every
figure, and httpx's came to ~10 ms a request against ~1 ms here (send to the server's first
look at it, 16 streams, benchmarks/GPU_NOTES.md "Issue 13").

Metrics per rate: TTFT (send -> first streamed token), TPOT ((last - first) / (n - 1)), every
inter-token latency (between streamed chunks that carry text), end-to-end latency; mean, p50,
p90, p99. Output tokens (the usage chunk's completion_tokens) and requests per second over the
rate's run (first send to last token). A request that fails (an HTTP error, a dropped stream)
is counted and the first error quoted (:meth:`ServeBenchReport.failures`: the line
``kiln bench_serve`` ends with, exit 1); a rate where every request failed has no figures
(its stats ``null``, its rates 0) and the run goes on to the next.

Imports stay light (aiohttp only): no torch, no engine.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import math
import os
import re
import socket
import ssl
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from kiln.errors import UNREADABLE_JSON, KilnError, counted
from kiln.runtime.params import check_seed, seeded_random  # torch-free
from kiln.runtime.stats import Stats  # one definition of the percentiles, as kiln bench

log = logging.getLogger(__name__)

LONG_RATE_S = 3600.0  # a rate whose arrivals alone take longer is warned about before it runs


MODELS_TIMEOUT_S = 10  # the first request's (GET /v1/models): a server answers it at once
PROBE_TIMEOUT_S = 2  # a failed first request's probe of what the server speaks (_probe)


class ServeBenchError(KilnError):
    """The server cannot be benchmarked (unreachable, refused, every request failed)."""


@dataclass(frozen=True)
class ServeWorkload:
    input_len: int = 128
    output_len: int = 128
    num_requests: int = 16
    request_rates: tuple[float, ...] = (math.inf,)  # requests/s (Poisson); inf: all at once
    max_concurrency: int | None = None  # in flight at most; None: no limit
    # of the prompts and arrivals: kiln bench's (kiln.runtime.bench.Workload.seed), read alike
    seed: int = 0
    vocab_size: int = 10000  # prompt ids drawn from [0, vocab_size)

    def __post_init__(self) -> None:
        for name in ("input_len", "output_len", "num_requests", "vocab_size"):
            if getattr(self, name) < 1:
                raise ServeBenchError(f"{name} must be >= 1, found {getattr(self, name)}")
        if not self.request_rates:
            raise ServeBenchError("request_rates is empty")
        for rate in self.request_rates:
            if not rate > 0:  # also NaN
                raise ServeBenchError(f"a request rate must be > 0 (or inf), found {rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ServeBenchError(f"max_concurrency must be >= 1, found {self.max_concurrency}")
        check_seed(self.seed, ServeBenchError)


def parse_rates(text: str) -> tuple[float, ...]:
    """``"1,4,inf"`` -> (1.0, 4.0, inf); raises ValueError naming the bad entry."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a number or inf") from None
        if not rate > 0:
            raise ValueError(f"{part!r}: a request rate must be > 0 (or inf)")
        rates.append(rate)
    return tuple(rates)


@dataclass(frozen=True)
class RateReport:
    request_rate: float
    max_concurrency: int | None
    duration_s: float
    completed: int
    failed: int
    output_tokens: int
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    output_tokens_per_s: float
    requests_per_s: float
    first_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["request_rate"] = _rate_json(self.request_rate)
        return data

    def table(self, workload: ServeWorkload) -> str:
        rate = "inf (all at once)" if math.isinf(self.request_rate) else \
            _rate_label(self.request_rate)
        done = counted(self.completed, "request")
        failed = ""
        if self.failed:  # "16 of 30 requests", not "16 requests (16 in": which 16 is which
            done = f"{self.completed} of {counted(self.completed + self.failed, 'request')}"
            failed = f"; {self.failed} failed (first: {self.first_error})"
        lines = [f"rate {rate}, max concurrency {self.max_concurrency or 'unlimited'}: "
                 f"{done} completed ({workload.input_len} tokens in / {workload.output_len} "
                 f"out each) in {self.duration_s:.2f} s{failed}",
                 f"{'metric':<24}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
        for name, stats in (("TTFT (ms)", self.ttft_ms), ("TPOT (ms)", self.tpot_ms),
                            ("inter-token (ms)", self.itl_ms), ("E2E latency (ms)", self.e2e_ms)):
            lines.append(f"{name:<24}{stats.cells()}")
        lines.append(f"{'output tokens/s':<24}{self.output_tokens_per_s:>10.1f}")
        lines.append(f"{'requests/s':<24}{self.requests_per_s:>10.3f}")
        return "\n".join(lines)


def _rate_label(rate: float) -> str:
    return "rate inf" if math.isinf(rate) else f"{rate:g} req/s"


def _rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


@dataclass(frozen=True)
class ServeBenchReport:
    url: str
    model: str
    workload: ServeWorkload
    rates: list[RateReport] = field(default_factory=list)

    def to_json(self) -> str:
        workload = asdict(self.workload)
        workload["request_rates"] = [_rate_json(r) for r in self.workload.request_rates]
        return json.dumps({"kind": "kiln bench_serve", "url": self.url, "model": self.model,
                           "workload": workload, "rates": [r.to_dict() for r in self.rates]},
                          indent=2, allow_nan=False)  # JSON has no NaN

    def table(self) -> str:
        head = f"{self.url} model {self.model}"
        return "\n\n".join([head, *(r.table(self.workload) for r in self.rates)])

    def failures(self) -> str | None:
        """One line on the requests that failed over every rate: how many of how many, and
        the first error (None when none failed)."""
        rates = [r for r in self.rates if r.failed]
        if not rates:
            return None
        failed = sum(r.failed for r in rates)
        sent = sum(r.completed + r.failed for r in self.rates)
        where = f"{', '.join(f'{r.failed} at {_rate_label(r.request_rate)}' for r in rates)}; " \
            if len(self.rates) > 1 else ""
        figures = f"the figures are of the {sent - failed} that completed" \
            if sent > failed else "no figures"
        return (f"{failed} of {counted(sent, 'request')} failed ({where}{figures}); the first: "
                f"{rates[0].first_error}")


@dataclass
class _Result:
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    done: float = 0.0
    error: str | None = None


def make_prompts(workload: ServeWorkload) -> list[list[int]]:
    rng = seeded_random(workload.seed)
    return [[rng.randrange(workload.vocab_size) for _ in range(workload.input_len)]
            for _ in range(workload.num_requests)]


def arrival_offsets(num_requests: int, rate: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = seeded_random(seed, 1)
    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _models(session: aiohttp.ClientSession, url: str,
                  api_key: str | None) -> list[dict]:
    try:
        timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)
        async with session.get(f"{url}/v1/models", headers=_headers(api_key),
                               timeout=timeout) as response:
            status = response.status
            text = await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        answer = await _probe(e, url)
        raise ServeBenchError(_unreached(e, url, MODELS_TIMEOUT_S, answer)) from None
    if status == 400 and "HTTPS port" in text:  # nginx's "The plain HTTP request was sent to
        raise ServeBenchError(_speaks_tls(url))  # HTTPS port"
    if status == 401:  # (a trial's wrong key had been told to pass one)
        fix = "check the key (the server's --api_key or KILN_API_KEY)" if api_key else \
            "pass --api_key or set KILN_API_KEY"
        raise ServeBenchError(f"{url} refused {'the' if api_key else 'a request without an'} "
                              f"API key (401); {fix}")
    if status != 200:
        raise ServeBenchError(f"{url}/v1/models answered {status}; is it an "
                              f"OpenAI-compatible server?")
    try:
        data = json.loads(text)["data"]
        assert isinstance(data, list) and data and all("id" in m for m in data)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ServeBenchError(f"{url}/v1/models did not list a model") from None
    return data


async def _one(session: aiohttp.ClientSession, url: str, body: dict, api_key: str | None,
               result: _Result) -> None:
    result.sent = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body,
                                headers=_headers(api_key)) as response:
            if response.status != 200:
                text = await response.text(errors="replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                result.error = f"HTTP {response.status}: {text[:200]}"
                return
            finished = False
            async for raw in response.content:  # one SSE line at a time
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    continue  # read the body to its end: the connection is then kept alive
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:  # OpenAI's error body, sent as an event once streaming
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else None
                    result.error = str(message or error)[:300]
                    return
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or ():
                    if choice.get("text"):
                        result.chunk_times.append(now)
                    if choice.get("finish_reason") in ("error", "abort"):
                        result.error = f"finish_reason {choice['finish_reason']}"
            if not finished:
                result.error = "the stream ended without data: [DONE]"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        result.error = _failure(e, url)
    except UNREADABLE_JSON as e:
        result.error = f"a chunk is not JSON ({e})"
    finally:
        result.done = time.perf_counter()
    if result.error is None and not result.chunk_times:
        result.error = "no token was streamed"


def _unreached(e: BaseException, url: str, timeout_s: float,
               answer: bytes | None = None) -> str:
    """The line for a server not reached, its reason in words: "connection refused", "no
    answer in 10 s" (a trial's had been aiohttp's "ClientConnectorError: Cannot connect to host
    127.0.0.1:9 ssl:default [Connect call failed ('127.0.0.1', 9)]"). ``answer``: the server's
    answer to :func:`_probe`, which tells what it speaks."""
    if (tls := _tls_failure(e, url, answer)) is not None:
        return tls
    if _reset(e) and answer is not None and urlsplit(url).scheme == "http":
        return _speaks_tls(url)  # a TLS server resets a plain request; it answered one in TLS
    if isinstance(e, aiohttp.ClientResponseError):  # aiohttp's parser refused the answer (a
        if answer is not None and _TLS_RECORD.match(answer):  # status is none of its errors)
            return _speaks_tls(url)
        began = "" if answer is None else f" (its answer began {answer!r})"
        return (f"cannot reach {url}: the server at that address does not speak HTTP{began}; "
                f"is kiln serve running there?")  # (aiohttp's had been "Bad status line:\n...")
    if isinstance(e, asyncio.TimeoutError):  # (aiohttp's timeouts are TimeoutErrors)
        why = f"no answer in {timeout_s:g} s"
    elif (dropped := _dropped(e)) is not None:
        why = dropped
    elif isinstance(e, aiohttp.ClientConnectorError):
        why = _os_words(e.os_error)
    else:
        why = f"{type(e).__name__}: {e or 'no detail'}"
    return f"cannot reach {url} ({why}); is kiln serve running there?"


def _reset(e: BaseException) -> bool:
    """Whether the server reset the connection (a TCP RST; ECONNRESET)."""
    return isinstance(e, aiohttp.ClientOSError) and e.errno == errno.ECONNRESET


def _closed(e: BaseException) -> bool:
    """Whether the server closed the connection before any answer: in plain HTTP aiohttp's
    "Server disconnected", in a TLS handshake asyncio's ConnectionResetError of no errno (a
    retest's had been said "connectionResetError")."""
    return isinstance(e, aiohttp.ServerDisconnectedError) or (
        isinstance(e, aiohttp.ClientConnectorError) and
        isinstance(e.os_error, ConnectionResetError) and e.os_error.errno is None)


def _dropped(e: BaseException) -> str | None:
    """Words for a connection the server reset (:func:`_reset`) or closed before answering
    (:func:`_closed`); None for any other failure."""
    if _reset(e):
        return "the connection was reset by the server"
    if _closed(e):
        return "the server closed the connection without answering"
    return None


def _speaks_tls(url: str) -> str:
    """The line for an http:// URL whose server speaks TLS."""
    return (f"cannot reach {url}: the server at that address speaks TLS; use "
            f"https://{url.split('://', 1)[1]}")


# OpenSSL's reasons for a handshake answered in plain HTTP (its reply read as a TLS record):
# "wrong version number", from OpenSSL 3.2 "record layer failure" (urllib3 reads both so, #3271)
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"})
# A TLS record's header, alert (21) or handshake (22), version 3.x: a TLS server's answer to a
# plain request (RFC 8446 5.1)
_TLS_RECORD = re.compile(rb"[\x15\x16]\x03[\x00-\x04]")
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH: a certificate for another name
_NAME_MISMATCH = frozenset({62, 64})


def _not_tls(e: BaseException) -> bool:
    """Whether an https:// handshake read an answer that is no TLS."""
    return isinstance(e, aiohttp.ClientConnectorError) and \
        isinstance(e.os_error, ssl.SSLError) and e.os_error.reason in _NOT_TLS


async def _probe(e: BaseException, url: str) -> bytes | None:
    """The first bytes the server at ``url`` answers a bare GET with, asked where the first
    request's failure ``e`` leaves open what it speaks: in plain TCP where an https:// handshake
    or an http:// answer was read as neither, over TLS (unverified) where an http:// connection
    was reset. None where ``e`` calls for no probe, or the probe had no answer."""
    parts = urlsplit(url)
    if _reset(e) and parts.scheme == "http":
        context: ssl.SSLContext | None = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    elif _not_tls(e) or isinstance(e, aiohttp.ClientResponseError):
        context = None
    else:
        return None

    async def ask() -> bytes:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
        try:
            writer.write(f"GET /v1/models HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
            return await reader.read(32)
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(ask(), PROBE_TIMEOUT_S) or None
    except (OSError, asyncio.TimeoutError):  # (ssl.SSLError is an OSError)
        return None


def _tls_failure(e: BaseException, url: str, answer: bytes | None = None) -> str | None:
    """The line for an https:// URL whose TLS handshake failed, None for any other error (a
    retest's plain-HTTP server had been "operation not permitted": OpenSSL's error 1 read as
    an errno); ``answer``: as :func:`_unreached`'s."""
    error = e.os_error if isinstance(e, aiohttp.ClientConnectorError) else None
    if not isinstance(error, ssl.SSLError):
        return None
    if _not_tls(e):  # plain HTTP only where its answer says so (a retest's SSH server's had)
        address = url.split("://", 1)[1]
        if answer is not None and answer.startswith(b"HTTP/"):
            return (f"cannot reach {url}: the server at that address does not speak TLS (it "
                    f"answered in plain HTTP); use http://{address}")
        found = "" if answer is None else \
            f" (it answered with something that is not HTTP: {answer!r})"
        return (f"cannot reach {url}: the server at that address does not speak TLS{found}; "
                f"is kiln serve running there?")
    if isinstance(error, ssl.SSLCertVerificationError):
        why = str(error.verify_message).rstrip(".")
        if getattr(error, "verify_code", None) in _NAME_MISMATCH or "mismatch" in why:
            return (f"cannot reach {url}: its TLS certificate is not valid for "
                    f"{urlsplit(url).hostname} ({why}); use a host name the certificate names")
        return (f"cannot reach {url}: its TLS certificate is not trusted "
                f"({why}); make this machine trust its CA (the SSL_CERT_FILE "
                f"environment variable names a CA file)")
    return f"cannot reach {url}: the TLS handshake failed ({error.reason or error})"

# The errno of each of Python's OSError classes that one raised bare may be
_ERRNO_OF = {ConnectionResetError: errno.ECONNRESET, ConnectionRefusedError: errno.ECONNREFUSED,
             ConnectionAbortedError: errno.ECONNABORTED, BrokenPipeError: errno.EPIPE,
             TimeoutError: errno.ETIMEDOUT}


def _os_words(e: OSError) -> str:
    """An OSError's reason, lower-case: its errno's words ("connection refused"; asyncio's
    strerror is "Connect call failed ('127.0.0.1', 9)"), those of each address tried where
    several failed ("Multiple exceptions: [Errno 111] ..."), or its own text (a host not found:
    "Name or service not known"); one of neither, that of its class's errno (asyncio's bare
    ConnectionResetError had been said "connectionResetError")."""
    codes = [e.errno] if isinstance(e.errno, int) and e.errno > 0 and \
        not isinstance(e, socket.gaierror) else re.findall(r"\[Errno (\d+)\]", str(e))
    words = ", ".join(dict.fromkeys(os.strerror(int(code)) for code in codes)) or \
        e.strerror or str(e) or next((os.strerror(code) for kind, code in _ERRNO_OF.items()
                                      if isinstance(e, kind)), "no reason given")
    return words[:1].lower() + words[1:]


def _failure(e: BaseException, url: str) -> str:
    """A request's transport failure in words. (A trial's server killed mid-run was reported
    in aiohttp's: "ClientPayloadError: Response payload is not completed: <TransferEncodingError:
    400, message='Not enough data to satisfy transfer length header.'>"; a retest's reset
    mid-run "ClientOSError: [Errno 104] Connection reset by peer".)"""
    if (tls := _tls_failure(e, url)) is not None:
        return tls
    if isinstance(e, aiohttp.ClientPayloadError):
        return f"{url} closed the connection mid-response (did the server stop?)"
    if (dropped := _dropped(e)) is not None:
        return f"no answer from {url} ({dropped}); did the server stop?"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect to {url} ({_os_words(e.os_error)}); is the server still running?"
    if isinstance(e, asyncio.TimeoutError):
        return f"{url} did not answer in time"
    return f"{type(e).__name__}: {e or 'no detail'}"


async def _run_rate(session: aiohttp.ClientSession, url: str, model: str, api_key: str | None,
                    prompts: list[list[int]], output_len: int, rate: float,
                    max_concurrency: int | None, seed: int) -> tuple[list[_Result], float]:
    limit = asyncio.Semaphore(max_concurrency or len(prompts))
    results = [_Result() for _ in prompts]
    start = time.perf_counter()

    async def send(prompt: list[int], offset: float, result: _Result) -> None:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        async with limit:
            body = {"model": model, "prompt": prompt, "max_tokens": output_len,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            await _one(session, url, body, api_key, result)

    offsets = arrival_offsets(len(prompts), rate, seed)
    await asyncio.gather(*(send(p, o, r) for p, o, r in zip(prompts, offsets, results,
                                                            strict=True)))
    return results, start


def _rate_report(rate: float, max_concurrency: int | None, results: list[_Result],
                 start: float) -> RateReport:
    ok = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    if not ok:  # no figures, but the rates around it keep theirs (a trial lost them)
        none = Stats.of([])
        return RateReport(rate, max_concurrency, 0.0, 0, len(failed), 0, none, none, none, none,
                          0.0, 0.0, failed[0].error)
    end = max(r.chunk_times[-1] for r in ok)
    duration = end - start
    tokens = sum(r.tokens or len(r.chunk_times) for r in ok)

    def ms(values: list[float]) -> Stats:
        return Stats.of([v * 1000 for v in values])

    ttft = [r.chunk_times[0] - r.sent for r in ok]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) / ((r.tokens or len(r.chunk_times)) - 1)
            for r in ok if (r.tokens or len(r.chunk_times)) > 1]
    itl = [b - a for r in ok for a, b in itertools.pairwise(r.chunk_times)]
    e2e = [r.chunk_times[-1] - r.sent for r in ok]
    return RateReport(rate, max_concurrency, duration, len(ok), len(failed), tokens, ms(ttft),
                      ms(tpot), ms(itl), ms(e2e), tokens / duration, len(ok) / duration,
                      failed[0].error if failed else None)


async def _benchmark(url: str, workload: ServeWorkload, model: str | None, api_key: str | None,
                     warmup: int, on_rate: Any) -> ServeBenchReport:
    url = url.rstrip("/")
    if url.endswith("/v1"):  # the openai client's base_url: the server's root is above it
        url = url[:-len("/v1")]
    width = min(workload.num_requests, workload.max_concurrency or workload.num_requests)
    connector = aiohttp.TCPConnector(limit=width)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        models = await _models(session, url, api_key)
        if model is None:
            model = models[0]["id"]
        elif model not in {m["id"] for m in models}:
            raise ServeBenchError(f"{url} serves no model {model!r} (it lists "
                                  f"{', '.join(repr(m['id']) for m in models)})")
        max_len = next((m.get("max_model_len") for m in models if m["id"] == model), None)
        if isinstance(max_len, int) and workload.input_len + workload.output_len > max_len:
            raise ServeBenchError(f"--input_len + --output_len = "
                                  f"{workload.input_len + workload.output_len} exceeds the "
                                  f"server's max_model_len {max_len} (prompt and output tokens "
                                  f"of a request); lower --input_len or --output_len")
        prompts = make_prompts(workload)
        if warmup:  # rounds as wide as the workload runs at once, unmeasured
            rng = seeded_random(workload.seed, 7)
            warm = [[rng.randrange(workload.vocab_size) for _ in range(workload.input_len)]
                    for _ in range(warmup * width)]
            results, start = await _run_rate(session, url, model, api_key, warm,
                                             min(workload.output_len, 8), math.inf, width,
                                             workload.seed)
            warm = _rate_report(math.inf, width, results, start)
            if not warm.completed:  # the measured rates would fail alike
                raise ServeBenchError(f"every warm-up request failed "
                                      f"({counted(warm.failed, 'request')}); the first: "
                                      f"{warm.first_error}")
            if warm.failed:
                log.warning("%d of %d warm-up requests failed (the first: %s); the measured "
                            "rates follow", warm.failed, warm.failed + warm.completed,
                            warm.first_error)
        report = ServeBenchReport(url, model, workload)
        for rate in workload.request_rates:
            arrivals = (workload.num_requests - 1) / rate  # expected span of Poisson arrivals
            if arrivals > LONG_RATE_S:  # a trial's 1e-9 requests/s waited without a word
                log.warning("at %g requests/s, %s arrive over about %s; Ctrl-C stops the run",
                            rate, counted(workload.num_requests, "request"),
                            _duration(arrivals))
            results, start = await _run_rate(session, url, model, api_key, prompts,
                                             workload.output_len, rate,
                                             workload.max_concurrency, workload.seed)
            report.rates.append(_rate_report(rate, workload.max_concurrency, results, start))
            if on_rate is not None:
                on_rate(report.rates[-1])
    return report


def run_serve_benchmark(url: str, workload: ServeWorkload, model: str | None = None,
                        api_key: str | None = None, warmup: int = 1,
                        on_rate: Any = None) -> ServeBenchReport:
    """Benchmark the server at ``url`` (see the module docstring); ``on_rate(RateReport)`` is
    called as each rate finishes."""
    if (why := url_error(url)) is not None:
        raise ServeBenchError(f"{why}; give --serve as http://HOST:PORT")
    return asyncio.run(_benchmark(url, workload, model, api_key, warmup, on_rate))


def url_error(url: str) -> str | None:
    """Why ``url`` is no server's http(s) URL (None where it is one), checked before any
    connection: a trial's ``http://[::1`` had been "cannot reach ... (InvalidUrlClientError: ...);
    is kiln serve running there?"."""
    if not url.isascii():  # an IDN host is typed as its punycode; a lone surrogate had been
        return f"{url!r} is not a URL (it holds a character that is not ASCII)"  # aiohttp's text
    try:
        parts = urlsplit(url)
    except ValueError as e:  # Python's words: "Invalid IPv6 URL"
        return f"{url!r} is not a URL ({e})"
    if parts.scheme not in ("http", "https") or not url.lower().startswith(f"{parts.scheme}://"):
        return f"{url!r} is not an http:// or https:// URL"
    if not parts.hostname:
        return f"{url!r} names no host"
    if any(c.isspace() for c in parts.netloc):  # it had gone to a DNS lookup
        return f"{url!r} has a space in its host"
    if parts.query or parts.fragment or url.endswith(("?", "#")):  # /v1/models went after them
        return f"{url!r} has a query or fragment; the base URL takes neither"
    try:
        port = parts.port  # None where the URL gives none (the scheme's own)
    except ValueError:  # no number, or out of range
        port = 0
    return f"{url!r} has a port that is not a number in 1-65535" if port == 0 else None


def _duration(seconds: float) -> str:
    """``seconds`` in its largest whole unit, for a warning: "3.2 h", "12 days", "63 years"."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.0f} s"
