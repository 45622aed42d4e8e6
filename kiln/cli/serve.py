"""``kiln serve``: an OpenAI-compatible HTTP server over an engine dir (kiln.serve on uvicorn).

Thin: parse and validate the flags, bind the listening address (so a port in use is one line
before the engine loads, which can take minutes on a GPU, and before ``--model_dir``'s engine is
built: kiln/cli/engine_source.py, held while serving), open the engine
(:class:`kiln.runtime.LLM` driven by an :class:`kiln.runtime.AsyncLLM`) and warm it up
(:meth:`kiln.runtime.LLM.warm_up`: what compiles at first use does so before the first client,
who would otherwise wait for it; logged at INFO with its time), run
:func:`kiln.serve.create_app` on uvicorn over the bound sockets, close the engine.
SIGINT/SIGTERM/SIGHUP while serving: stop accepting, let running requests finish for
``--grace_period`` seconds, abort the rest, exit 0 (uvicorn's default would re-raise the
signal after its own shutdown, and the CLI would exit 130/143); a second signal aborts them
at once (:class:`_Drain`), and the engine's processes are then killed, not asked to exit
(:class:`_Signals`). Under torchrun, rank 0 serves; the other ranks bind nothing, serve
its engine as workers and exit 0 when it closes (:mod:`kiln.runtime.launch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kiln.cli.context import (
    NOT_HEADER,
    CliContext,
    FloatRange,
    IntRange,
    MemorySize,
    PathArg,
    dp_option,
    executor_options,
    given_by,
    gpu_options,
    header_text,
)
from kiln.cli.engine_source import engine_command, held_engine
from kiln.errors import KilnError
from kiln.interrupts import TERMINATING, catchable
from kiln.runtime.params import is_utf8
from kiln.serve import DEFAULT_STALL_TIMEOUT, MIN_STALL_TIMEOUT

if TYPE_CHECKING:
    from kiln.runtime import AsyncLLM, ExecutorOptions

log = logging.getLogger(__name__)


class ServeError(KilnError):
    """kiln serve cannot start (missing extra, unreadable chat template, port in use)."""


@engine_command("serve", "Engine dir (output of kiln build).")
@click.option("--host", default="127.0.0.1", show_default=True, callback=lambda c, p, v: _host(v),
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=IntRange(1, 65535),
              help="TCP port to listen on.")
@click.option("--served_model_name", default=None, callback=lambda c, p, v: _named(p, v),
              help="The model name clients send and /v1/models lists (default: --model_dir "
                   "as given, or the engine dir's name).")
@click.option("--api_key", envvar="KILN_API_KEY", default=None, show_envvar=True,
              callback=lambda c, p, v: _key(c, p, v),
              help="Require 'Authorization: Bearer KEY' on /v1/* (401 otherwise); /health, "
                   "/metrics and /version stay open.")
@click.option("--max_queue", type=IntRange(min=0), default=None,
              help="Answer 429 (with Retry-After) when more than this many requests would wait "
                   "for an engine slot (default: no limit).")
@click.option("--chat_template", type=PathArg(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A jinja2 chat template file to use instead of the engine "
                                 "dir's (rendered sandboxed).")
@click.option("--max_body_bytes", type=MemorySize(as_typed=True), default="4MiB",
              show_default=True, help="Largest request body accepted (413 above): 4MiB, 64KB "
                                      "or bytes; 1KiB at least.")
@click.option("--grace_period", type=FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds running requests may finish after SIGINT/SIGTERM before they are "
                   "aborted.")
@click.option("--stall_timeout", type=FloatRange(as_typed=True), default=DEFAULT_STALL_TIMEOUT,
              show_default=True,
              help="Seconds an engine (or replica) with requests outstanding may go without "
                   "progress (no token, no step ended) before /health answers 503 naming it: "
                   f"{MIN_STALL_TIMEOUT:g} or more; inf: never.")
@click.option("--engine_process/--no_engine_process", default=None, help=(
    "Run the engine in a process of its own, so that the server's event loop does not slow its "
    "steps down through the GIL [default: on for a single-rank engine that runs on a GPU, off "
    "otherwise]."))
@click.option("-v", "--verbose", count=True, help="Log each request (-vv: debug logs).")
@executor_options
@dp_option
@gpu_options
@click.pass_obj
def serve(obj: CliContext, host: str, port: int, served_model_name: str | None,
          api_key: str | None, max_queue: int | None, chat_template: Path | None,
          max_body_bytes: str, grace_period: float, stall_timeout: float,
          engine_process: bool | None,
          verbose: int, device: str,
          num_threads: int | None, cpu_spin_wait: bool | None, verify_checksums: bool, dp: int,
          kv_cache_free_gpu_memory_fraction: float | None, prefill_attention: str | None,
          **source: Any) -> None:
    """Serve an engine over HTTP with the OpenAI API (completions, chat, streaming).

    \b
    Endpoints:
      POST /v1/completions, /v1/chat/completions   (stream: server-sent events, data: [DONE])
      GET  /v1/models, /health, /metrics (Prometheus), /version
    Sampling fields: max_tokens, temperature, top_p, top_k, min_p, n, stop, seed,
    presence_penalty, frequency_penalty, repetition_penalty, logprobs / top_logprobs,
    ignore_eos; echo + logprobs (+ max_tokens 0) scores a prompt and needs an engine built with
    --gather_context_logits. Errors are OpenAI-shaped JSON: 400 (the bad parameter named),
    401, 404 (unknown model), 413, 429. A client that disconnects aborts its request.
    /health answers 503 while an engine has stalled (--stall_timeout).
    Ctrl-C / SIGTERM: stop accepting, finish or abort running requests, exit 0 (a second
    signal aborts them at once, a third quits without waiting).
    """
    try:
        import uvicorn

        from kiln.serve.app import body_limit, create_app, stall_seconds
    except ImportError as e:
        raise ServeError(f"kiln serve needs the serve extra ({e.name} is missing): "
                         f"pip install 'kiln-llm[serve]'") from None
    body_limit(max_body_bytes)  # create_app's checks, before the address is bound
    stall_timeout = stall_seconds(float(stall_timeout), str(stall_timeout))
    template = _read_template(chat_template)
    # --engine_process beside --dp: ExecutorOptions refuses it, as for LLM(); False is its
    # default there, so --no_engine_process can only be refused here
    if dp > 1 and engine_process is False:
        raise ServeError(f"--dp {dp} runs every replica in a process of its own already; "
                         f"leave --no_engine_process out")
    from kiln.runtime import ExecutorOptions
    from kiln.runtime.launch import is_worker_rank

    # before the address is bound: a refused option leaves the port alone
    options = ExecutorOptions(device=device, num_threads=num_threads,
                              cpu_spin_wait=cpu_spin_wait, verify_checksums=verify_checksums,
                              dp=dp, engine_process=bool(engine_process),
                              kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
                              prefill_attention=prefill_attention)
    # a torchrun rank other than 0 serves the driver's engine, not HTTP: it binds nothing (its
    # LLM ends the process once the driver closes the engine)
    sockets = [] if is_worker_rank() else _bind(host, port)

    level = logging.INFO if verbose == 1 or obj.verbosity == 1 else \
        logging.DEBUG if verbose + max(obj.verbosity, 0) > 1 else None
    if level is not None:
        logging.getLogger().setLevel(level)
    name = served_model_name or _default_name(source["model_dir"], source["engine_dir"])
    typed = source["model_dir"]  # (a client may send it as typed, "hf/", as vLLM's take it)
    with contextlib.ExitStack() as stack:
        for sock in sockets:
            stack.enter_context(sock)
        engine_dir = stack.enter_context(held_engine(obj, source, options))
        if engine_process is None:
            options = dataclasses.replace(options, engine_process=_on_a_gpu(engine_dir, options))
        signals = _Signals()
        engine = _warm_engine(stack, engine_dir, options, signals)
        app = create_app(engine, name, api_key=api_key, max_queue=max_queue,
                         chat_template=template, max_body_bytes=max_body_bytes,
                         stall_timeout=stall_timeout,
                         also_named=(typed,) if not served_model_name and typed else ())
        config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=
                                grace_period + FLUSH_SECONDS,
                                log_level="info" if level else "warning",
                                access_log=bool(level), lifespan="off")
        listening = f"kiln serve: serving {engine_dir} as {name!r} on " \
                    f"http://{_address(host, port)} ({_stops()})"
        server = _Server(config, _Drain(app.state.kiln, grace_period, signals), listening)
        try:
            server.run(sockets=sockets)  # uvicorn's loop: uvloop where installed (serve extra)
        except OSError as e:  # listen() refused: another server took the port meanwhile
            if server.started:
                raise
            raise ServeError(_cannot_listen(host, port, e)) from None
    click.echo("kiln serve: stopped", err=True)


def _on_a_gpu(engine_dir: Path, options: ExecutorOptions) -> bool:
    """``--engine_process``'s default: a single-rank engine (no replicas) that runs on CUDA,
    where the server's threads would slow the thread that launches its kernels."""
    from kiln.engine import read_manifest
    from kiln.runtime.loader import check_runnable, run_device

    manifest = read_manifest(engine_dir)  # the files are checked when the engine opens, next
    module, machine = check_runnable(manifest, options)
    return (options.dp == 1 and manifest.mapping.world_size == 1
            and run_device(module, manifest, machine, options) == "cuda")


class _Signals:
    """How many SIGINT/SIGTERM/SIGHUP the server got while serving (set by :class:`_Drain`).
    The engine's close reads it (:meth:`again`): its processes (``--dp`` replicas, the engine
    process) are asked to exit, named after a second and killed after five, or at the next
    signal, which may have come already."""

    count = 0

    def again(self, error: BaseException | None) -> bool:
        """Whether a signal beyond the first came before the engine closes: the drain's second
        (its processes are then killed at once, not asked: a stopped one had held the exit for
        STOP_WAIT_S), or an interrupt raised since uvicorn handed the signals back (``error``,
        on its way through the close)."""
        return self.count >= 2 or (self.count >= 1 and isinstance(error, KeyboardInterrupt))


def _warm_engine(stack: contextlib.ExitStack, engine_dir: Path, options: ExecutorOptions,
                 signals: _Signals) -> AsyncLLM:
    """Open the engine, warm it up and drive it with an AsyncLLM, each closed by ``stack``.
    Before uvicorn listens: /health answers 200 only on a warm engine."""
    from kiln.runtime import LLM, AsyncLLM
    from kiln.runtime.core import freeze_loaded_objects

    llm = LLM(engine_dir, options)
    stack.push(lambda *exc: llm.close(now=signals.again(exc[1])))  # (returns None: no swallow)
    llm.warm_up()
    freeze_loaded_objects()
    engine = AsyncLLM(llm)
    stack.callback(engine.close)  # aborts what the grace period left running
    return engine


def _bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` (as asyncio's create_server binds them),
    not listening yet: connections are refused until the engine is loaded and uvicorn listens.
    A port in use (by another kiln serve that loads too: :func:`_held`), or a host that is not
    this machine's, is a ServeError now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"cannot listen on {_address(host, port)}: {e.strerror}; give --host "
                         f"an address or name of this machine") from None
    sockets = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sockets.append(_held(family, kind, proto, address))
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ServeError(_cannot_listen(host, port, e)) from None
    return sockets


def _held(family: int, kind: int, proto: int, address: Any) -> socket.socket:
    """A socket bound to ``address`` that no other socket can bind until it listens.

    Linux lets sockets that all set SO_REUSEADDR (as uvicorn's and asyncio's do) bind one
    address while none listens: a second kiln serve on the port had bound too, and failed at
    listen() only, after its whole load. So the socket binds without SO_REUSEADDR, which no
    other socket's bind may share. Where the port is held by connections in TIME_WAIT only (a
    server there just stopped), which only SO_REUSEADDR binds past, it binds with it, then
    turns it off: a socket with it off shares its address with none either. :func:`_listenable`
    turns it on again before listening, which those connections would refuse otherwise (and
    its own connections, which inherit it, let the next server bind past them in turn)."""
    def bound(reuse: bool) -> socket.socket:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse))
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        return sock

    try:
        return bound(False)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
    sock = bound(True)  # a listener, or another kiln serve that loads, refuses this one too
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    return sock


def _listenable(sockets: list[socket.socket]) -> None:
    """Turn SO_REUSEADDR on again on :func:`_held`'s sockets, right before they listen."""
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


_BIND_FIXES = {
    errno.EADDRINUSE: "another process uses it: pick a free --port (or stop that process)",
    errno.EADDRNOTAVAIL: "not an address of this machine: pick another --host",
    errno.EACCES: "ports below 1024 need privileges: pick a --port of 1024 or above",
}


def _cannot_listen(host: str, port: int, e: OSError) -> str:
    fix = _BIND_FIXES.get(e.errno, "pick another --host or --port")
    return f"cannot listen on {_address(host, port)}: {(e.strerror or str(e)).lower()}; {fix}"


def _default_name(model_dir: str | None, engine_dir: Path | None) -> str:
    """The served model's name without --served_model_name: --model_dir as given, a local dir
    normalized (a shell completes one with a trailing slash; a trial's clients had to send it
    too), or the engine dir's name."""
    if model_dir is not None:  # hf/, hf/., ./hf: "hf" (a hub id is left as it is)
        return os.path.normpath(model_dir) if Path(model_dir).is_dir() else model_dir
    return Path(engine_dir).resolve().name


def _stops() -> str:
    """How the server is stopped, for its banner: a SIGINT this process was started with
    ignored stays ignored (kiln.interrupts.catchable; a background job of a shell), so the
    banner does not offer Ctrl-C there."""
    if catchable((signal.SIGINT,)):
        return "Ctrl-C stops"
    return f"SIGTERM stops: this process ignores SIGINT; kill {os.getpid()}"


def _host(host: str) -> str:
    """``--host`` as getaddrinfo takes it: an IPv6 address in a URL's brackets without them
    (``[::1]`` had been "Name or service not known", printed as ``[[::1]]``)."""
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else None
    return inner if inner and ":" in inner else host


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# After the grace period's aborts, the time their streams get to end (one engine step, then
# the last chunk and [DONE]) before uvicorn cancels what is left.
FLUSH_SECONDS = 5.0


class _Drain:
    """What SIGINT/SIGTERM do while serving (run in the event loop's thread, by the handler).

    1st signal: /health turns 503 and uvicorn stops accepting (its ``should_exit``); what still
    runs when the grace period ends is aborted, so its stream ends with finish_reason ``abort``
    and ``[DONE]`` (within FLUSH_SECONDS) instead of being cut by uvicorn's task cancellation
    (a test cut at grace - 0.5 s failed on a loaded CI machine: the abort waits for an engine
    step).
    2nd signal: abort the rest now, streams still ending with ``abort`` and ``[DONE]``. Left
    to uvicorn, a 2nd SIGINT is its force exit: it stops waiting for connections and
    ``asyncio.run`` cancels the handlers mid-stream (cut bodies, CancelledError tracebacks).
    3rd signal of any kind: uvicorn's force exit after all, for an engine that does not step
    any more (uvicorn forces on SIGINT only; SIGTERMs alone, as a supervisor sends, end it too),
    without uvicorn's traceback for each handler it cancels.
    A 2nd signal with no request running is that force exit already (it had said nothing and
    waited on, as a retest found).
    The messages name Ctrl-C where the first signal was one, "a second signal" otherwise.
    """

    def __init__(self, state, grace_period: float, signals: _Signals):
        self.state, self.grace_period = state, grace_period
        self.signals = signals

    def on_signal(self, sig: int) -> bool:
        """Count a signal; True when uvicorn's own handler should see it (1st and 3rd+)."""
        self.signals.count += 1
        loop = asyncio.get_event_loop()
        abort = lambda: loop.create_task(self.state.abort_all())  # noqa: E731
        # printing inside a signal handler could re-enter stderr's writer: the loop prints
        if self.signals.count == 1:
            self.state.draining = True
            loop.call_soon_threadsafe(self._stopping, sig)
            loop.call_soon_threadsafe(loop.call_later, self.grace_period, abort)
            return True
        if self.signals.count == 2 and self.state.live:
            loop.call_soon_threadsafe(self._abort_now, abort, sig)
            return False
        if self.signals.count == 2:
            loop.call_soon_threadsafe(functools.partial(
                click.echo, "kiln serve: no request is running; quitting now", err=True))
        # the forced exit cancels what still runs: uvicorn would log a traceback for each
        # handler (a retest's third SIGTERM, four streams: four "Exception in ASGI application")
        loop.call_soon_threadsafe(logging.getLogger("uvicorn.error").setLevel, logging.CRITICAL)
        return True

    @property
    def forced(self) -> bool:
        """Whether uvicorn is to quit without waiting (see the class docstring)."""
        return self.signals.count >= 2

    def _stopping(self, sig: int) -> None:
        self.state.stopping.set()  # a body still arriving is not waited for
        running = len(self.state.live)
        again = "Ctrl-C again" if sig == signal.SIGINT else "a second signal"
        click.echo("kiln serve: stopping" + (
            f"; {running} running request(s) may finish within {self.grace_period:g} s "
            f"({again} aborts them)" if running else ""), err=True)

    def _abort_now(self, abort, sig: int) -> None:
        if self.state.live:
            third = "a third Ctrl-C" if sig == signal.SIGINT else "a third signal"
            click.echo(f"kiln serve: aborting the {len(self.state.live)} running request(s) now "
                       f"({third} quits at once)", err=True)
        abort()


class _Server:
    """uvicorn.Server whose SIGINT/SIGTERM handlers drain (:class:`_Drain`) and are not
    re-raised afterwards (see the module docstring)."""

    def __new__(cls, config, drain: _Drain, listening: str):
        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets=None):
                _listenable(sockets or [])  # (uvicorn listens on them next)
                await super().startup(sockets)
                if self.started:  # what a user waits for, at the default level
                    click.echo(listening, err=True)

            @contextlib.contextmanager
            def capture_signals(self):
                # SIGHUP drains as SIGTERM does; one ignored at start stays so (nohup)
                signals = catchable((signal.SIGINT, *TERMINATING))
                previous = {s: signal.signal(s, self.handle_exit) for s in signals}
                try:
                    yield
                finally:
                    for s, handler in previous.items():
                        signal.signal(s, handler)

            def handle_exit(self, sig, frame):
                if drain.on_signal(sig):
                    # uvicorn force-exits on a second SIGINT only: a signal of any kind quits
                    # when forced, so that SIGTERMs alone can end a server whose drain hangs
                    force = signal.SIGINT if drain.forced else sig
                    super().handle_exit(force, frame)

        return Server(config)


def _named(param: click.Parameter, name: str | None) -> str | None:
    if name is not None and (not name.strip() or name != name.strip()):
        raise click.BadParameter(f"{name!r}: a model name clients can send has no leading or "
                                 f"trailing spaces and is not empty; give one, or leave the "
                                 f"option out", param=param)
    if name is not None and not is_utf8(name):  # /v1/models had answered every call a 500
        raise click.BadParameter(f"{name!r} is not UTF-8 (the shell's bytes were not UTF-8 "
                                 f"text): no client could send it; give a name in UTF-8",
                                 param=param)
    return name


def _key(ctx: click.Context, param: click.Parameter, key: str | None) -> str | None:
    """An empty key would lock every client out (and clients refuse to send one), and spaces
    around it cannot travel in an HTTP header: both are refused, naming where the key came
    from. An empty KILN_API_KEY, which click reads as unset, is refused too: it is what
    ``KILN_API_KEY=$SECRET`` gives when SECRET is unset, and would serve with no key."""
    if key is None and os.environ.get("KILN_API_KEY") == "":
        key = ""
    elif key is None or (key.strip() and key == key.strip() and header_text(key)):
        return key
    source = given_by(ctx, param)
    problem = "is empty" if not key.strip() else "has leading or trailing spaces" \
        if key != key.strip() else f"has a character an HTTP header cannot carry ({NOT_HEADER})"
    fix = "unset KILN_API_KEY" if source == "KILN_API_KEY" else "leave --api_key out"
    raise click.BadParameter(f"the API key given by {source} {problem}: no client could send "
                             f"it; give a key, or {fix} to serve without one", param=param)


def _read_template(path: Path | None) -> str | None:
    from kiln.errors import USER_TEXT
    from kiln.runtime.errors import TokenizerError
    from kiln.runtime.tokenizer import check_chat_template

    if path is None:
        return None
    try:
        template = path.read_text(encoding=USER_TEXT)  # a BOM is no part of the template
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{path}: not UTF-8 text ({e.reason})",
                                 param_hint="--chat_template") from None
    try:
        check_chat_template(template)
    except TokenizerError as e:
        raise click.BadParameter(f"{path}: {e}",
                                 param_hint="--chat_template") from None
    return template
