"""The FastAPI app of ``kiln serve``: OpenAI's completions and chat endpoints over an AsyncLLM.

Contract:
- :func:`create_app` takes an engine that is already open and serves it; it never opens or
  closes the engine (the CLI does; tests build apps in-process over their own engines).
- Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events
  ending ``data: [DONE]`` with ``stream``), ``GET /v1/models`` and ``GET /v1/models/{id}``,
  ``GET /health`` (200 only while the engine's loop runs, no engine has stalled and the server
  is not shutting down, else 503; a stall: requests outstanding and no progress for over
  ``stall_timeout`` seconds, :mod:`kiln.serve.state`, its body naming the engine or replica),
  ``GET /metrics`` (Prometheus text), ``GET /version``.
- With an API key, ``/v1/*`` needs ``Authorization: Bearer KEY`` (the scheme in any case, as
  HTTP's auth schemes are; 401 otherwise); ``/health``, ``/metrics`` and ``/version`` stay
  open, for probes and scrapers.
- Every error is OpenAI-shaped JSON (:class:`~kiln.serve.protocol.ApiError`): 400 bad
  parameter (named in ``param``, down to the value at fault: ``messages[0].content``, a
  prompt of the list forms ``prompt[1]``, a token id outside the vocabulary ``prompt[0][3]``),
  prompt too long (or too long for the ``max_tokens`` given: vLLM's 400), echo+logprobs on an
  engine without context logits, a body that is not JSON
  or nests deeper than MAX_JSON_DEPTH (``invalid_json``); 401; 404 unknown model
  or route; 413 body over ``max_body_bytes``; 429 with ``Retry-After`` when more than
  ``max_queue`` requests would wait. Bad input never gives a 500.
- ``model`` may be left out (or null, or ""), as vLLM's server takes it (its
  ``_is_model_supported``: any false name is the base model): the request is for the one model
  served; responses name it.
- ``n > 1``: the runtime samples one sequence per request, so each choice is its own engine
  request; with a ``seed``, choice j uses ``seed + j`` (so the choices differ, reproducibly).
- A client that disconnects (or closes its stream) aborts its engine requests
  (:mod:`kiln.serve.state`).

Non-goals: tools, ``response_format``, ``logit_bias``, embeddings, several models per server.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import kiln
from kiln.errors import UNREADABLE_JSON, ConfigError, option
from kiln.runtime.async_llm import AsyncLLM
from kiln.serve import DEFAULT_STALL_TIMEOUT, MIN_STALL_TIMEOUT, render
from kiln.serve.protocol import (
    MAX_JSON_DEPTH,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    completion_body,
    deeper,
    new_id,
    usage,
)
from kiln.serve.state import Job, ServerState, Submitted
from kiln.sizes import size_option, size_text

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# The least max_body_bytes: a short chat request with the fields clients send (model,
# max_tokens, temperature, stream...) is some hundred bytes; below 1 KiB a longer model name or
# message leaves none that fits, and --max_body_bytes 10 (meant as MB?) had served only 413s.
MIN_BODY_BYTES = 1024


def create_app(engine: AsyncLLM, served_model_name: str, api_key: str | None = None,
               max_queue: int | None = None, chat_template: str | None = None,
               max_body_bytes: int | str | None = DEFAULT_MAX_BODY_BYTES,
               stall_timeout: float = DEFAULT_STALL_TIMEOUT,
               also_named: Sequence[str] = ()) -> FastAPI:
    """An app serving ``engine`` as model ``served_model_name`` (see the module docstring);
    ``max_body_bytes`` a size as :func:`body_limit` takes it; ``stall_timeout`` seconds;
    ``also_named``: other names a request may give it (kiln serve's --model_dir as typed, "hf/",
    which it serves as "hf"), answered as ``served_model_name``; with them, any spelling of the
    same path ("./hf", "hf/." for "hf/")."""
    max_body_bytes = body_limit(max_body_bytes)
    state = ServerState(engine, max_queue, stall_seconds(stall_timeout))
    app = FastAPI(title="kiln serve", version=kiln.__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.kiln = state
    renderer = render.Renderer(engine.llm, chat_template)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        error = ApiError(e.status_code, str(e.detail))
        return JSONResponse(error.body(), status_code=error.status)

    expected = None if api_key is None else api_key.encode()
    # --model_dir's spellings: "./hf" had been a 404 where "hf/" and "hf" were served (retest 48)
    paths = {os.path.normpath(n) for n in (served_model_name, *also_named)} if also_named \
        else set()

    def check(request: Request, model: str | None = None) -> None:
        """The API key, if the server has one, and ``model``, if given: a request without
        ``model``, or with "" (as vLLM takes them), or with this server's is for
        ``served_model_name``."""
        if expected is not None:
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            # the key compared as raw bytes, in time that tells nothing; the scheme in any case
            # (RFC 9110 11.1: "bearer KEY" is a Bearer key)
            right = secrets.compare_digest(given.strip().encode("latin-1"), expected)
            if not (right and scheme.lower() == "bearer"):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        if model and model != served_model_name and model not in also_named and \
                os.path.normpath(model) not in paths:  # ("": vLLM's base model, not a 404)
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                                f"{served_model_name!r}", param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        if not state.healthy():
            return JSONResponse(state.unhealthy().body(), status_code=503)
        stalls = state.stalls()
        if not stalls:
            return Response(status_code=200)
        said = "; ".join(state.stall_text(stall) for stall in stalls)
        body = ApiError(503, f"the engine has stalled: {said}", code="engine_stalled").body()
        body["stalled"] = [{"engine": s.engine, "seconds": round(s.seconds, 3)} for s in stalls]
        return JSONResponse(body, status_code=503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": kiln.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": int(time.time()),
                # vLLM's meaning: prompt + output tokens of one request. The last token needs
                # no cache slot, so a request holds max_seq_len + 1 (kiln run says the same)
                "owned_by": "kiln", "max_model_len": engine.llm.limits.max_seq_len + 1}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")  # (a served name may hold slashes: org/name)
    async def model(request: Request, model: str) -> dict:
        check(request, model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check(request)
        req = await _parse(request, CompletionRequest, state)
        check(request, req.model)
        _check_best_of(req)
        prompts = renderer.completion_prompts(req)
        params = renderer.completion_params(req)
        given = render.max_tokens_field(req)
        jobs = [Job(i * req.n + j, prompt, render.nth(params, j), label, given)
                for i, (label, prompt) in enumerate(prompts) for j in range(req.n)]
        rid = new_id("cmpl")
        if req.stream:
            submitted = await _submit(request, state, jobs, "prompt")
            return _sse(_events(submitted, jobs, req, lambda choices, use: completion_body(
                rid, served_model_name, choices, use, chunk=True),
                render.CompletionStream(renderer, req)))
        results = await _collect(request, state, jobs, "prompt")
        choices = [renderer.completion_choice(job, results[job.index], req) for job in jobs]
        return JSONResponse(completion_body(rid, served_model_name, choices,
                                            _usage(results, req.n)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check(request)
        req = await _parse(request, ChatCompletionRequest, state)
        check(request, req.model)
        # the template's rendering and the encoding off the event loop (a long conversation
        # takes seconds: other requests, streams and /health go on meanwhile)
        prompt = await asyncio.to_thread(renderer.chat_prompt, req)
        params = renderer.chat_params(req)
        given = render.max_tokens_field(req)
        jobs = [Job(j, prompt, render.nth(params, j), max_tokens_field=given)
                for j in range(req.n)]
        rid = new_id("chatcmpl")
        if req.stream:
            submitted = await _submit(request, state, jobs, "messages")
            return _sse(_events(submitted, jobs, req, lambda choices, use: chat_body(
                rid, served_model_name, choices, use, chunk=True),
                functools.partial(renderer.chat_chunk, req)))
        results = await _collect(request, state, jobs, "messages")
        choices = [renderer.chat_choice(job, results[job.index], req) for job in jobs]
        return JSONResponse(chat_body(rid, served_model_name, choices,
                                      _usage(results, req.n)))

    return app


async def _parse(request: Request, model: type, state: ServerState) -> Any:
    body = await _body(request, state)
    try:
        data = json.loads(body)
    except RecursionError:
        raise _too_deep() from None
    except UNREADABLE_JSON as e:
        raise ApiError(400, f"the body is not JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    # (a body of fewer brackets cannot nest deeper: most bodies are not walked)
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and deeper(data, MAX_JSON_DEPTH):
        raise _too_deep()
    try:
        return model.model_validate(data)
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply", code="invalid_json") from None
    except ValidationError as e:
        first = e.errors()[0]
        if (misnamed := render.name_error(data, first)) is not None:
            raise misnamed from None
        param = str(first["loc"][0]) if first["loc"] else None  # the request field
        given = param in data  # a missing field is pydantic's "Field required"
        # not pydantic's "prompt.str: ...", "messages.0.content.str: ..." or "stop.str: ..."
        form = {"prompt": render.prompt_form_error, "messages": render.messages_form_error,
                "stop": render.stop_form_error,
                "stop_token_ids": render.stop_token_ids_form_error,
                "stream_options": render.stream_options_form_error}
        if given and param in form and (why := form[param](data[param])) is not None:
            raise render.form_error(why) from None
        raise render.form_error(render.field_error(first)) from None


async def _body(request: Request, state: ServerState) -> bytes:
    """The request's body; a 503 once the server is stopping while it still arrives (a client
    stuck in its upload had held a retest's shutdown for the grace period and 5 s more, to end
    in uvicorn's traceback); a 499 if the client disconnects before all of it came."""
    read = asyncio.ensure_future(request.body())
    stop = asyncio.ensure_future(state.stopping.wait())
    try:
        await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        stopped = not read.done()
        if stopped:
            read.cancel()
    if stopped:
        raise ApiError(503, "the server is shutting down; send the request to another one")
    try:
        return read.result()
    except ClientDisconnect:  # gone before its body was whole (uvicorn had logged a traceback)
        raise ApiError(499, "the client disconnected") from None


def _too_deep() -> ApiError:
    return ApiError(400, f"the body is JSON nested deeper than {MAX_JSON_DEPTH} levels (arrays "
                         f"and objects within each other), the most kiln serve reads; flatten "
                         f"it", code="invalid_json")


async def _submit(request: Request, state: ServerState, jobs: list[Job],
                  param: str) -> Submitted:
    """``state.submit``, given up if the client disconnects first (a 499; nothing of the
    request left queued): the engine takes a request's prompts between two steps, which a
    long prefill puts seconds apart (a retest's client gone after one second had its 100
    prompts submitted, and some run, for nobody)."""
    submit = asyncio.ensure_future(state.submit(jobs, param))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({submit, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not submit.done():
            submit.cancel()  # (state.submit aborts what it had submitted)
            await asyncio.wait({submit})
    if submit.cancelled():
        raise ApiError(499, "the client disconnected")
    return submit.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, state: ServerState, jobs: list[Job], param: str) -> dict:
    """Each job's result by index; aborts them all if the client disconnects first."""
    submitted = await _submit(request, state, jobs, param)

    async def gather() -> dict:
        return {d.index: d.result async for d in submitted.deltas() if d.result is not None}

    task = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await submitted.abort()
    if task not in done:
        raise ApiError(499, "the client disconnected")
    results = task.result()
    for result in results.values():
        if result.finish_reason == "error":
            raise render.failed(result)
    return results


def _check_best_of(req: CompletionRequest) -> None:
    """``best_of`` as OpenAI's and vLLM's take it: at least ``n`` (the candidates the ``n``
    returned are picked from); kiln serve generates no more candidates than it returns, so
    only ``best_of`` equal to ``n`` (a client's default) asks for nothing it does not do (a
    retest: ``n`` 4 with ``best_of`` 4 had been refused, ``best_of`` 1 taken)."""
    if req.best_of is None or req.best_of == req.n:
        return
    why = f"must be >= n ({req.n})" if req.best_of < req.n else \
        f"must be n ({req.n}) or left out (kiln serve generates no more candidates than it returns)"
    raise ApiError(400, f"best_of {why}, found a number {req.best_of}", param="best_of")


def _usage(results: dict, n: int) -> dict:
    prompt = sum(len(r.prompt_token_ids) for i, r in results.items() if i % n == 0)
    return usage(prompt, sum(len(r.token_ids) for r in results.values()))


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """The events as server-sent events, then ``[DONE]``. An error once the stream has begun
    (the engine failed) can no longer change the status: it is sent as an event of its own,
    OpenAI's error body, before ``[DONE]``, as vLLM's server does."""
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(submitted: Submitted, jobs: list[Job], req: Any, body: Callable,
                  chunk: Callable) -> AsyncIterator[dict]:
    """The chunk bodies of every delta, then the usage chunk if asked for."""
    by_index = {job.index: job for job in jobs}
    started: set[int] = set()
    results = {}
    async for delta in submitted.deltas():
        if delta.result is not None:
            results[delta.index] = delta.result
        for choice in chunk(by_index[delta.index], delta, delta.index not in started):
            yield body([choice], None)
        started.add(delta.index)
    if req.stream_options is not None and req.stream_options.include_usage:
        yield body([], _usage(results, req.n))


def stall_seconds(seconds: Any, typed: str | None = None) -> float:
    """``stall_timeout`` checked: :data:`MIN_STALL_TIMEOUT` seconds or more (``inf``: never),
    or a :class:`~kiln.errors.ConfigError` naming it as its user gave it: create_app's keyword,
    or ``kiln serve --stall_timeout`` (``typed``: its text, checked before the port is bound)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds != seconds:
        why = "not a number"
    elif seconds < MIN_STALL_TIMEOUT:
        why = f"too short to tell a stall (a {option('dp')} replica reports once a second)"
    else:
        return float(seconds)
    raise ConfigError(f"{option('stall_timeout', seconds if typed is None else typed)} is "
                      f"{why}; give {MIN_STALL_TIMEOUT:g} seconds or more (inf: never) that "
                      f"an engine with requests outstanding may go without progress before "
                      f"/health answers 503, like the default {DEFAULT_STALL_TIMEOUT:g}")


def body_limit(max_body_bytes: int | str | None) -> int:
    """The bytes of ``max_body_bytes`` (bytes, or a size string as kiln's other size keywords
    take: ``"64KiB"``; None: :data:`DEFAULT_MAX_BODY_BYTES`), :data:`MIN_BODY_BYTES` at least,
    or a :class:`~kiln.errors.ConfigError` naming it as its user gave it: create_app's keyword,
    or ``kiln serve --max_body_bytes`` (which checks it before it binds its port)."""
    # the sizes as they are typed: "1KiB", "4MiB"
    least, default = (size_text(n).replace(" ", "")
                      for n in (MIN_BODY_BYTES, DEFAULT_MAX_BODY_BYTES))
    size = size_option("max_body_bytes", max_body_bytes, least=MIN_BODY_BYTES,
                       short="too small for any real request (a short chat request is some "
                             "hundred bytes)",
                       fix=f"give {least} or more, like the default {default}")
    return DEFAULT_MAX_BODY_BYTES if size is None else size


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is a 413 (by its Content-Length at
    once, or when a chunked body grows past the limit while the handler reads it)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(self._error().body(), status_code=413)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._error()
            return message

        await self.app(scope, limited, send)

    def _error(self) -> ApiError:
        return ApiError(413, f"the request body is larger than the server's limit of "
                             f"{size_text(self.max_bytes)} ({self.max_bytes} bytes)",
                        code="request_too_large")
