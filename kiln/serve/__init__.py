"""``kiln serve``: an OpenAI-compatible HTTP server over :class:`kiln.runtime.AsyncLLM`.

:func:`create_app` (kiln.serve.app) builds the FastAPI app over an engine already open; the CLI
(kiln.cli.serve) opens the engine, runs the app on uvicorn and closes the engine at shutdown.
Needs the ``serve`` extra (fastapi, uvicorn, prometheus_client).
"""

from __future__ import annotations

from kiln.serve.app import create_app

__all__ = ["create_app"]
