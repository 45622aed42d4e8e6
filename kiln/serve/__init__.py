"""``kiln serve``: an OpenAI-compatible HTTP server over :class:`kiln.runtime.AsyncLLM`.

:func:`create_app` (kiln.serve.app) builds the FastAPI app over an engine already open; the CLI
(kiln.cli.serve) opens the engine, runs the app on uvicorn and closes the engine at shutdown.
Needs the ``serve`` extra (fastapi, uvicorn, prometheus_client).
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]

# The least stall_timeout (create_app's keyword, kiln serve's flag), in seconds: a --dp replica
# reports to the server once a second at least while it steps
# (kiln.runtime.distributed.replica_worker.PROGRESS_S), so a timeout near that (0.5 in a
# retest) flapped a healthy, loaded server's /health between 503 and 200
MIN_STALL_TIMEOUT = 5.0
# Its default: a long prompt's prefill on a CPU takes minutes, and a probe that fails takes the
# server out
DEFAULT_STALL_TIMEOUT = 300.0


def __getattr__(name: str) -> Any:
    """``create_app`` on first use: ``kiln bench_serve`` imports kiln.serve.bench, a light
    client, without loading the server's stack (FastAPI, the runtime)."""
    if name == "create_app":
        from kiln.serve.app import create_app
        return create_app
    raise AttributeError(f"module 'kiln.serve' has no attribute {name!r}")
