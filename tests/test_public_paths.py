"""The public names of the README keep working after the package moved (issue 10 item 1),
and none of them drags in a diagnostics dependency (rich, psutil, prometheus_client,
matplotlib): a worker must not pay for the tooling."""

from __future__ import annotations

import subprocess
import sys

import pytest

PUBLIC = [  # as the README and the command lines spell them
    "graceful_close.gunicorn.ThreadWorker",   # -k
    "graceful_close.gunicorn.SyncLingerWorker",
    "graceful_close.gunicorn.SyncWorker",     # the old name, an alias
    "graceful_close.gunicorn.UvicornWorker",
    "graceful_close.uvicorn:HttpToolsProtocol",  # --http
    "graceful_close.uvicorn:H11Protocol",
    "graceful_close.uvicorn:AutoHTTPProtocol",
    "graceful_close.middleware.KeepAliveMiddleware",
    "graceful_close.gunicorn_hooks.pre_request",
    "graceful_close.gunicorn_hooks.on_starting",
    "graceful_close.uvicorn_worker.UvicornWorker",
    "graceful_close.settings.configure",
    "graceful_close.hypercorn.logger_class",  # hypercorn -c python:graceful_close.hypercorn
    "graceful_close.hypercorn.serve",
    "graceful_close.hypercorn.run",
    "graceful_close.waitress.serve",
    "graceful_close.waitress.create_server",
    "graceful_close.waitress.GracefulChannel",
]
TOOLING = ("rich", "psutil", "prometheus_client", "matplotlib", "graceful_close.diagnostics")

CHECK = """
import importlib, sys
module, _, name = sys.argv[1].replace(":", ".").rpartition(".")
getattr(importlib.import_module(module), name)
loaded = [m for m in sys.argv[2:] if m in sys.modules]
sys.exit(f"{sys.argv[1]} imported {loaded}" if loaded else 0)
"""


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_imports_without_tooling(name: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHECK, name, *TOOLING], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
