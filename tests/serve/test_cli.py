"""``kiln serve``'s start-up errors, before any engine is loaded: a port in use (or a host that
is not this machine's) is one line, exit 2, naming host:port and the flag to change. The engine
dir given is empty, so reaching the engine load would fail differently. Exactly one of
--engine_dir and --model_dir, and no build option beside --engine_dir, checked first."""

from __future__ import annotations

import contextlib
import signal
import socket
from unittest import mock

import pytest
from click.testing import CliRunner

from kiln.cli.main import main
from kiln.serve.state import ServerState
from tests.helpers import with_bom
from tests.serve.conftest import free_port


def _serve(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["serve", *args])
    return result.exit_code, result.output.strip().splitlines()


@pytest.fixture
def busy_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_port_in_use_is_one_line_before_the_engine_loads(tmp_path, busy_port):
    code, lines = _serve("--engine_dir", str(tmp_path), "--port", str(busy_port))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (f"error: cannot listen on 127.0.0.1:{busy_port}: address already in "
                        f"use; another process uses it: pick a free --port (or stop that "
                        f"process)")


def test_a_host_of_another_machine_is_one_line(tmp_path):
    code, lines = _serve("--engine_dir", str(tmp_path), "--host", "192.0.2.1")  # TEST-NET-1
    assert code == 2 and len(lines) == 1, lines
    assert "cannot listen on 192.0.2.1:8000" in lines[0] and "--host" in lines[0]


def test_a_free_port_goes_on_to_the_engine(tmp_path):
    code, lines = _serve("--engine_dir", str(tmp_path), "--port", str(free_port()))
    assert code == 2 and len(lines) == 1, lines
    assert "cannot listen" not in lines[0] and str(tmp_path) in lines[0]  # the engine's error


def test_engine_dir_or_model_dir_exactly_one_checked_before_the_address_is_bound(busy_port):
    """As kiln run, bench and eval (kiln/cli/engine_source.py); the busy port is never reached."""
    code, lines = _serve("--port", str(busy_port))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: give --engine_dir ENGINE_DIR (an engine built by kiln "
                               "build) or --model_dir HF_DIR|HUB_ID")
    code, lines = _serve("--engine_dir", "e", "--model_dir", "m", "--port", str(busy_port))
    assert code == 2 and lines[0].startswith("error: give --engine_dir or --model_dir, not both")
    code, lines = _serve("--engine_dir", "e", "--max_batch_size", "8", "--port", str(busy_port))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --max_batch_size applies to --model_dir only")


def test_every_build_option_passes_through_with_model_dir():
    from kiln.cli.build import build
    from kiln.cli.engine_source import MODEL_ONLY
    from kiln.cli.serve import serve

    built = {p.name for p in build.params} - {"checkpoint_dir", "output_dir", "overwrite"}
    assert built | set(MODEL_ONLY) | {"model_dir", "engine_dir"} <= {p.name for p in serve.params}


@pytest.mark.parametrize("flag", ["--engine_process", "--no_engine_process"])
def test_engine_process_flags_with_dp_are_one_line(tmp_path, busy_port, flag):
    """--dp runs its replicas in processes of their own: either flag beside it contradicts it
    or says nothing, so it is refused before the address is bound."""
    code, lines = _serve("--engine_dir", str(tmp_path), "--dp", "2", flag, "--port",
                         str(busy_port))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (f"error: --dp 2 runs every replica in a process of its own already; "
                        f"leave {flag} out")


def test_the_warm_engine_freezes_the_loaded_objects_before_serving(tmp_path, monkeypatch):
    """kiln serve owns its process: after the warm-up, the collector's full passes skip what is
    alive (kiln.runtime.core.freeze_loaded_objects), before the first request is taken."""
    import contextlib

    from kiln.cli import serve
    from kiln.engine import BuildLimits
    from kiln.runtime.options import ExecutorOptions
    from kiln.testing.smollm2 import smollm2_hf_dir
    from tests.runtime.toy_onnx import toy_engine_dir

    engine = toy_engine_dir(tmp_path / "engine", BuildLimits(2, 8, 16, 16), vocab=49152,
                            tokenizer_dir=smollm2_hf_dir())
    events = []
    monkeypatch.setattr("kiln.runtime.core.freeze_loaded_objects",
                        lambda: events.append("freeze") or 0)
    monkeypatch.setattr("kiln.runtime.LLM.warm_up", lambda self: events.append("warm_up"))
    with contextlib.ExitStack() as stack:
        serve._warm_engine(stack, engine, ExecutorOptions(device="cpu"), serve._Signals())
    assert events == ["warm_up", "freeze"]



@pytest.mark.parametrize("count, interrupt, now", [
    (0, False, False), (1, False, False), (0, True, False),  # one signal: asked, then waited
    (1, True, True), (2, False, True), (3, False, True)])  # a second: killed at once
def test_a_second_signal_closes_the_engine_at_once(tmp_path, monkeypatch, count, interrupt,
                                                   now):
    """An engine process or --dp replica that does not exit is named after a second and killed
    after five, or at the next signal: the drain's second (it had waited the 5 s for a
    stopped replica: only a third killed at once), or one raised once uvicorn handed the
    signals back, on its way through the close (an interrupt with no signal counted is the
    first: Ctrl-C while the engine loads)."""
    from kiln.cli import serve
    from kiln.engine import BuildLimits
    from kiln.runtime import LLM
    from kiln.runtime.options import ExecutorOptions
    from kiln.testing.smollm2 import smollm2_hf_dir
    from tests.runtime.toy_onnx import toy_engine_dir

    engine = toy_engine_dir(tmp_path / "engine", BuildLimits(2, 8, 16, 16), vocab=49152,
                            tokenizer_dir=smollm2_hf_dir())
    close, closed = LLM.close, []
    monkeypatch.setattr(LLM, "close", lambda self, now=False: closed.append(now) or close(self))
    signals = serve._Signals()
    with contextlib.suppress(KeyboardInterrupt), contextlib.ExitStack() as stack:
        serve._warm_engine(stack, engine, ExecutorOptions(device="cpu"), signals)
        signals.count = count
        if interrupt:
            raise KeyboardInterrupt
    assert closed == [now]

def test_the_port_refuses_connections_while_the_engine_loads(tmp_path):
    """Trial 40 saw clients hang while ``--model_dir`` built its engine. The address is bound
    before the load (a port in use fails fast) but listens only once the engine is warm, as
    vLLM's: a client meanwhile is refused at once (here, the load waits for ``go``)."""
    import subprocess
    import sys
    import time

    import httpx

    from kiln.engine import BuildLimits
    from kiln.testing.smollm2 import smollm2_hf_dir
    from tests.runtime.toy_onnx import toy_engine_dir

    engine = toy_engine_dir(tmp_path / "engine", BuildLimits(2, 8, 16, 16), vocab=49152,
                            tokenizer_dir=smollm2_hf_dir())
    loading, go, port = tmp_path / "loading", tmp_path / "go", free_port()
    script = (f"import pathlib, sys, time\n"
              f"from kiln.cli import serve\n"
              f"warm = serve._warm_engine\n"
              f"def slow(*args):\n"
              f"    pathlib.Path({str(loading)!r}).touch()\n"
              f"    while not pathlib.Path({str(go)!r}).exists():\n"
              f"        time.sleep(0.05)\n"
              f"    return warm(*args)\n"
              f"serve._warm_engine = slow\n"
              f"from kiln.cli.main import main\n"
              f"main(['serve', '--engine_dir', {str(engine)!r}, '--port', '{port}'])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/health"
    try:
        deadline = time.monotonic() + 60
        while not loading.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(httpx.ConnectError):  # refused, not a timeout
            httpx.get(url, timeout=5)
        assert time.monotonic() - start < 1
        go.touch()
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            with contextlib.suppress(httpx.ConnectError):
                assert httpx.get(url, timeout=5).status_code == 200
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_second_server_on_the_port_of_one_that_loads_is_one_line_at_once(tmp_path):
    """Two kiln serve on one port had both bound (SO_REUSEADDR, neither listening yet): the
    second failed at listen(), after its whole load. A bind beside the first one's fails now,
    a SO_REUSEADDR one as uvicorn's too."""
    from kiln.cli.serve import _bind

    port = free_port()
    first = _bind("127.0.0.1", port)
    try:
        code, lines = _serve("--engine_dir", str(tmp_path), "--port", str(port))
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}: address "
                                   f"already in use; ")
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="in use"):
                other.bind(("127.0.0.1", port))
    finally:
        for sock in first:
            sock.close()



@pytest.mark.parametrize("given,taken", [
    ("[::1]", "::1"), ("[fe80::1%eth0]", "fe80::1%eth0"), ("::1", "::1"),
    ("127.0.0.1", "127.0.0.1"), ("[localhost]", "[localhost]"), ("[]", "[]")])
def test_an_ipv6_host_in_brackets_is_taken_without_them(given, taken):
    """Retest 48: --host "[::1]", a URL's spelling, was "Name or service not known" for
    "[[::1]]"; the brackets of an IPv6 address are dropped (others are left to fail so)."""
    from kiln.cli.serve import _host

    assert _host(given) == taken


def _time_wait(port: int) -> None:
    """A server on ``port`` that closed a connection first, so that it waits in TIME_WAIT."""
    from kiln.cli.serve import _bind, _listenable

    [listener] = _bind("127.0.0.1", port)
    with listener:
        _listenable([listener])
        listener.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = listener.accept()
            conn.close()
            assert client.recv(1) == b""


def test_a_server_restarts_on_a_port_whose_connections_wait_in_time_wait():
    """SO_REUSEADDR's reason (uvicorn's and asyncio's): a port whose last server's connections
    wait in TIME_WAIT binds with it only. The restart binds, is still alone, and listens."""
    from kiln.cli.serve import ServeError, _bind, _listenable

    port = free_port()
    _time_wait(port)
    with socket.socket() as plain:  # the TIME_WAIT this test is about holds the port
        with pytest.raises(OSError, match="in use"):
            plain.bind(("127.0.0.1", port))
    [sock] = _bind("127.0.0.1", port)
    with sock:
        with pytest.raises(ServeError, match="address already in use"):
            _bind("127.0.0.1", port)
        _listenable([sock])
        sock.listen()
        socket.create_connection(("127.0.0.1", port)).close()


@pytest.mark.parametrize("text,why", [
    ("<s>\n{% for m in messages %}{{ m.content ",
     "not a Jinja template: line 2: unexpected end of template"),
    (" \n", "is empty: it would render every conversation as an empty prompt"),
    # trial D's plain text (a path mixed up): every conversation the same prompt
    ("You are a helpful assistant.\n", "never reads messages: it would render every "
     "conversation as the same prompt"),
    ("{% set messages = [] %}{{ messages }}", "never reads messages"),
    ("{% for m in messages %}{% endfor %}\n", "renders a conversation (one user message) as "
     "empty text: every chat request would be refused as an empty prompt"),
    # retest 45c: a traceback, exit 1
    ("{% for m in messages %}{{ m.content | undefined_filter }}{% endfor %}",
     "not a Jinja template kiln can render: line 1: No filter named 'undefined_filter'."),
    # retest 45: every chat request had been a 400 naming messages
    ('{{ raise_exception("no") }}{% for m in messages %}{{ m.content }}{% endfor %}',
     "fails on every conversation tried, so it would refuse every chat request: one user "
     "message: failed to render: no; a system message and a user message: failed to render: "
     "no; user, assistant, user: failed to render: no"),
])
def test_a_chat_template_kiln_cannot_use_is_one_line_before_the_engine_loads(tmp_path, text,
                                                                             why):
    """A trial's server started with a broken (or empty) template and blamed each chat request
    for it."""
    template = tmp_path / "template.jinja"
    template.write_text(text)
    code, lines = _serve("--engine_dir", str(tmp_path), "--chat_template", str(template),
                         "--port", str(free_port()))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: Invalid value for --chat_template: {template}: {why}"), \
        lines


def test_a_chat_template_that_refuses_some_conversations_is_taken():
    """A template that wants a system message first (or refuses one) still serves the
    conversations it takes."""
    from kiln.runtime.tokenizer import check_chat_template

    check_chat_template('{% if messages[0].role != "system" %}{{ raise_exception("system '
                        'first") }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}')


def test_a_chat_template_saved_with_a_bom_renders_without_it(tmp_path):
    """A template file saved with a byte-order mark (as Windows editors save text) is read
    without it: U+FEFF had begun every chat prompt, as checkpoints' template files no longer
    do."""
    from kiln.cli.serve import _read_template
    text = "{% for m in messages %}{{ m.content }}{% endfor %}"
    template = tmp_path / "template.jinja"
    template.write_text(text)
    assert _read_template(with_bom(template)) == text


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--api_key", ""], {}, "the API key given by --api_key is empty: no client could send it; "
                            "give a key, or leave --api_key out to serve without one"),
    ([], {"KILN_API_KEY": ""}, "the API key given by KILN_API_KEY is empty: no client could "
                               "send it; give a key, or unset KILN_API_KEY to serve without one"),
    (["--api_key", " key"], {}, "--api_key has leading or trailing spaces"),
    (["--served_model_name", ""], {}, "'': a model name clients can send has no leading or "
                                      "trailing spaces and is not empty"),
    # a retest's non-UTF-8 key had been a traceback after the load, its name a 500 on
    # /v1/models, a newline a key no client can send
    (["--api_key", "k\udcff"], {}, "the API key given by --api_key has a character an HTTP "
                                   "header cannot carry (only ASCII letters, digits, "
                                   "punctuation and inner spaces): no client could send it"),
    ([], {"KILN_API_KEY": "a\nb"}, "the API key given by KILN_API_KEY has a character an HTTP "
                                   "header cannot carry"),
    (["--api_key", "ключ"], {}, "--api_key has a character an HTTP header cannot carry"),
    (["--served_model_name", "m\udcff"], {}, "'m\\udcff' is not UTF-8 (the shell's bytes "
                                             "were not UTF-8 text): no client could send it"),
])
def test_a_key_or_name_no_client_could_send_is_refused_before_the_port_is_bound(
        busy_port, args, env, message):
    result = CliRunner(env=env).invoke(main, ["serve", "--engine_dir", "e", "--port",
                                              str(busy_port), *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, lines
    assert message in lines[0], lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_third_signal_of_any_kind_quits_without_waiting(sig, capsys):
    """1st signal: stop accepting (drain); 2nd: abort the running requests, not uvicorn's force
    exit; 3rd: uvicorn's force exit, also when every signal was a SIGTERM (uvicorn forces on
    SIGINT only, so a supervisor's SIGTERMs could not end a drain that hung)."""
    import asyncio

    import uvicorn

    from kiln.cli.serve import _Drain, _Server, _Signals

    class State:
        live, draining, aborted = {"request": None}, False, 0

        async def abort_all(self):
            self.aborted += 1

    async def three_signals():
        state, seen = State(), []
        state.stopping = asyncio.Event()
        server = _Server(uvicorn.Config(app=None), _Drain(state, 120, _Signals()), "listening")
        for _ in range(3):
            server.handle_exit(sig, None)
            await asyncio.sleep(0.05)  # the loop prints and aborts
            seen.append((server.should_exit, server.force_exit, state.aborted))
        return state, seen

    import logging

    uvicorn_errors = logging.getLogger("uvicorn.error")
    level = uvicorn_errors.level
    try:
        state, seen = asyncio.run(three_signals())
        # the handlers the forced exit cancels are not each a traceback (retest 45c)
        assert uvicorn_errors.level == logging.CRITICAL
    finally:
        uvicorn_errors.setLevel(level)
    assert state.draining and state.stopping.is_set()
    assert seen == [(True, False, 0), (True, False, 1), (True, True, 1)]
    err = capsys.readouterr().err
    named = "Ctrl-C" if sig == signal.SIGINT else "signal"
    assert "1 running request(s) may finish within 120 s" in err
    assert ("Ctrl-C" in err) == (sig == signal.SIGINT), err
    assert f"a third {named} quits at once" in err, err


def test_the_default_served_name_is_the_model_dir_normalized(tmp_path, monkeypatch):
    """A shell completes a dir with a trailing slash; a retest's hf/. and ./hf/ had been served
    under those spellings, which clients had to send."""
    from kiln.cli.serve import _default_name

    (tmp_path / "hf").mkdir()
    monkeypatch.chdir(tmp_path)
    for given in ("hf/", "hf/.", "./hf/", "hf//"):
        assert _default_name(given, None) == "hf"
    assert _default_name(f"{tmp_path}/hf/", None) == f"{tmp_path}/hf"
    assert _default_name("owner/name", None) == "owner/name"  # a hub id, as given
    assert _default_name(None, tmp_path / "hf" / ".") == "hf"


@pytest.mark.parametrize("size", ["64KB", "4MiB", "65536"])
def test_max_body_bytes_takes_a_size(tmp_path, size):
    """Trial 36's --max_body_bytes 4MB was refused (bytes only), as --max_build_memory's are
    not; it goes on to the engine now."""
    code, lines = _serve("--engine_dir", str(tmp_path), "--max_body_bytes", size,
                         "--port", str(free_port()))
    assert code == 2 and len(lines) == 1, lines
    assert "--max_body_bytes" not in lines[0] and str(tmp_path) in lines[0]


@pytest.mark.parametrize("size,why", [("1e20", "is more than any machine holds"),
                                      ("4 MBs", "is not a size like 20GB"),
                                      # as --max_build_memory 1.5 (kiln.sizes.parse_size)
                                      ("1.5", "is not a whole number of bytes; give bytes (an "
                                              "integer), or a size with its unit such as 20GB "
                                              "or 512MiB")])
def test_a_max_body_bytes_of_no_size_is_one_line(tmp_path, size, why):
    code, lines = _serve("--engine_dir", str(tmp_path), "--max_body_bytes", size)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: Invalid value for '--max_body_bytes': {size!r} {why}")


@pytest.mark.parametrize("size, bytes_", [("10", "10 bytes, "), ("1000", "1000 bytes, "),
                                         ("0.5KiB", "512 bytes, "), ("1", "1 byte, "),
                                         ("0", "0 bytes, "), ("-5", "")])
def test_a_max_body_bytes_no_request_fits_in_is_one_line(tmp_path, busy_port, size, bytes_):
    """--max_body_bytes 10 had started a server that answered every request 413; refused before
    the address is bound, naming the size as typed (0.5KiB had been told as 512), and the
    minimum at once (0 had been told "at least 1 byte", then 1 "give 1KiB or more")."""
    code, lines = _serve("--engine_dir", str(tmp_path), "--max_body_bytes", size,
                         "--port", str(busy_port))
    assert code == 2 and len(lines) == 1, lines
    # kiln.serve.app.body_limit's message, naming the flag
    assert lines[0] == (f"error: --max_body_bytes {size} is {bytes_}too small for any real "
                        f"request (a short chat request is some hundred bytes); give 1KiB or "
                        f"more, like the default 4MiB")


def test_a_max_body_bytes_of_1kib_goes_on_to_the_engine(tmp_path):
    code, lines = _serve("--engine_dir", str(tmp_path), "--max_body_bytes", "1KiB",
                         "--port", str(free_port()))
    assert code == 2 and len(lines) == 1, lines
    assert "--max_body_bytes" not in lines[0] and str(tmp_path) in lines[0]


@pytest.mark.parametrize("seconds, why", [
    *((typed, f"{typed} is too short to tell a stall (a --dp replica reports once a second)")
      for typed in ("0", "0.5", "-1")), ("nan", "nan is not a number")])
def test_a_stall_timeout_below_the_floor_is_one_line_before_the_address_is_bound(busy_port,
                                                                                 seconds, why):
    """--stall_timeout 0 had been told by click as "0.0 is not in the range x>0", and 0.5
    taken (a --dp replica reports once a second: a healthy server flapped 503/200); it is
    create_app's message, naming the flag and the value as typed."""
    code, lines = _serve("--engine_dir", "e", "--stall_timeout", seconds, "--port",
                         str(busy_port))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (f"error: --stall_timeout {why}; give 5 seconds or more (inf: never) "
                        f"that an engine with requests outstanding may go without progress "
                        f"before /health answers 503, like the default 300")


def test_a_stall_timeout_that_is_no_number_is_one_line(busy_port):
    code, lines = _serve("--engine_dir", "e", "--stall_timeout", "5s", "--port",
                         str(busy_port))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: Invalid value for '--stall_timeout': '5s' is not a valid "
                               "number.")


def test_the_stall_timeout_reaches_the_app_and_names_its_flag(tmp_path, monkeypatch):
    """--stall_timeout 7.5 or inf (300 without it) is create_app's, whose messages name the flag."""
    from kiln.cli import serve
    from kiln.errors import KilnError

    given = []

    def create_app(engine, name, **options):
        given.append(options["stall_timeout"])
        given.append(ServerState(mock.Mock(), None, options["stall_timeout"])._timeout_named)
        raise KilnError("stop here")
    monkeypatch.setattr(serve, "_warm_engine", lambda *args: mock.Mock())
    monkeypatch.setattr("kiln.serve.app.create_app", create_app)
    for args in ((), ("--stall_timeout", "7.5"), ("--stall_timeout", "inf")):
        code, lines = _serve("--engine_dir", str(tmp_path), "--no_engine_process",
                             "--port", str(free_port()), *args)
        assert code == 2 and lines == ["error: stop here"], lines
    assert given == [300.0, "--stall_timeout 300", 7.5, "--stall_timeout 7.5", float("inf"),
                     "--stall_timeout inf"]


def test_a_second_signal_with_no_request_running_quits_at_once(capsys):
    """Retest 45: with nothing running (a client stuck in its upload held the shutdown), a
    second Ctrl-C had said nothing and waited on; it is uvicorn's force exit, said so."""
    import asyncio

    import uvicorn

    from kiln.cli.serve import _Drain, _Server, _Signals

    class State:
        live, draining = {}, False

        async def abort_all(self):
            raise AssertionError("nothing to abort")

    async def two_signals():
        state, seen = State(), []
        state.stopping = asyncio.Event()
        server = _Server(uvicorn.Config(app=None), _Drain(state, 120, _Signals()), "listening")
        for _ in range(2):
            server.handle_exit(signal.SIGTERM, None)
            await asyncio.sleep(0.05)
            seen.append((server.should_exit, server.force_exit))
        return seen

    import logging

    level = logging.getLogger("uvicorn.error").level
    try:
        assert asyncio.run(two_signals()) == [(True, False), (True, True)]
    finally:
        logging.getLogger("uvicorn.error").setLevel(level)
    assert "kiln serve: no request is running; quitting now" in capsys.readouterr().err


def test_aborting_every_request_interrupts_the_step_under_way():
    """A shutdown's aborts had waited for the engine's step: an 8,000-token prefill on a CPU
    held the streams' abort and [DONE] (and the exit) for 24 s. With nothing live, no step is
    interrupted (a later request's would be)."""
    import asyncio
    from unittest import mock

    from kiln.serve.state import ServerState

    engine = mock.Mock()
    engine.abort = mock.AsyncMock()
    state = ServerState(engine, None, 60.0)
    asyncio.run(state.abort_all())
    engine.interrupt_step.assert_not_called()
    state.live.update({"a": None, "b": None})
    asyncio.run(state.abort_all())
    assert [c.args for c in engine.abort.call_args_list] == [("a",), ("b",)]
    engine.interrupt_step.assert_called_once_with()
