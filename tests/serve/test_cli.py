"""``kiln serve``'s start-up errors, before any engine is loaded: a port in use (or a host that
is not this machine's) is one line, exit 2, naming host:port and the flag to change. The engine
dir given is empty, so reaching the engine load would fail differently."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

from kiln.cli.main import main
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
                        f"use; another process listens there: pick a free --port (or stop "
                        f"that process)")


def test_a_host_of_another_machine_is_one_line(tmp_path):
    code, lines = _serve("--engine_dir", str(tmp_path), "--host", "192.0.2.1")  # TEST-NET-1
    assert code == 2 and len(lines) == 1, lines
    assert "cannot listen on 192.0.2.1:8000" in lines[0] and "--host" in lines[0]


def test_a_free_port_goes_on_to_the_engine(tmp_path):
    code, lines = _serve("--engine_dir", str(tmp_path), "--port", str(free_port()))
    assert code == 2 and len(lines) == 1, lines
    assert "cannot listen" not in lines[0] and str(tmp_path) in lines[0]  # the engine's error
