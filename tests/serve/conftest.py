"""kiln serve fixtures: the SmolLM2 onnx engine (built with --gather_context_logits, shared with
tests/runtime/test_smollm2_eval.py) and a real ``kiln serve`` process on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import kiln
from tests.runtime.test_smollm2_onnx import shared_dir

API_KEY = "test-key"
MODEL = "smol"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from kiln.testing.smollm2 import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def engine(smollm2_dir, tmp_path_factory) -> Path:
    from kiln.builder import build

    with shared_dir(tmp_path_factory, "smollm2-onnx") as root:  # as test_smollm2_eval's
        if not (root / "engine-gather" / "config.json").is_file():
            if not (root / "ckpt" / "config.json").is_file():
                kiln.convert_checkpoint(smollm2_dir, root / "ckpt", overwrite=True,
                                        progress=False)
            build(root / "ckpt", root / "engine-gather", backend="onnx", max_batch_size=4,
                  max_seq_len=128, max_input_len=96, max_num_tokens=64, overwrite=True,
                  gather_context_logits=True)
        return root / "engine-gather"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``kiln serve`` on ``engine`` (``source``: --engine_dir, or --model_dir for an HF
    checkpoint) as model ``name`` (None: the server's default name), started with the
    ``ignored`` signals ignored."""

    def __init__(self, engine: Path, *args: str, source: str = "--engine_dir",
                 name: str | None = MODEL, ignored: tuple[int, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "KILN_API_KEY": API_KEY}
        named = ["--served_model_name", name] if name is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli.main", "serve", source, str(engine),
             "--port", str(self.port), *named, *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=(lambda: [signal.signal(s, signal.SIG_IGN) for s in ignored])
            if ignored else None)  # ignored at exec, as nohup leaves SIGHUP
        deadline = time.monotonic() + 120  # the engine load, on a shared and loaded machine
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited {self.proc.returncode}: "
                                   f"{self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("kiln serve did not become healthy in 120 s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def metric(self, name: str) -> float:
        """A sample's value from /metrics (0 when absent)."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture(scope="module")
def server(engine):
    process = ServerProcess(engine, "--max_queue", "4", "--max_body_bytes", "65536")
    yield process
    process.stop()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
