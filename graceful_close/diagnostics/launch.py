"""Start real gunicorn/uvicorn/hypercorn/waitress processes on 127.0.0.1 with an ephemeral port.

Used by the demo, the tests and the benchmarks. The server binds port 0 and we
read the port it got from its own startup log line.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from .processes import answers_http, wait_until

# gunicorn, uvicorn, hypercorn ("Running on"), waitress ("Serving on").
_PORT_LINE = re.compile(rb"(?:Listening at: |Uvicorn running on |Running on |Serving on )"
                        rb"https?://127\.0\.0\.1:(\d+)")

# Worker classes by short name: stock gunicorn's and ours.
GUNICORN_WORKERS = {
    "sync": ("sync", "graceful_close.gunicorn.SyncLingerWorker"),
    "gthread": ("gthread", "graceful_close.gunicorn.ThreadWorker"),
    "uvicorn-worker": ("uvicorn_worker.UvicornWorker", "graceful_close.gunicorn.UvicornWorker"),
    "asgi": ("asgi", "graceful_close.gunicorn.ASGIWorker"),
    "gevent": ("gevent", "graceful_close.gunicorn.GeventWorker"),
}
# The gunicorn workers above that serve ASGI apps (the others serve WSGI).
ASGI_WORKERS = frozenset({"uvicorn-worker", "asgi"})
UVICORN_PROTOCOLS = {
    "h11": ("h11", "graceful_close.uvicorn:H11Protocol"),
    "httptools": ("httptools", "graceful_close.uvicorn:HttpToolsProtocol"),
    "zttp": ("zttp", "graceful_close.uvicorn:ZttpProtocol"),
}


def import_problem(implementation: str) -> str | None:
    """Why a worker class or protocol given as on the command line (module.Class or
    module:Class) does not import here, or None."""
    module, _, name = implementation.replace(":", ".").rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        return f"{implementation} does not import ({exc.__class__.__name__}: {exc})"
    return None


@dataclass
class ServerProcess:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 20.0
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: bytearray = field(default_factory=bytearray)
    tls: ssl.SSLContext | None = None  # the client side of a server started with TLS
    cwd: str | None = None

    def start(self) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=self.cwd,
                                     start_new_session=True)
        found = threading.Event()
        threading.Thread(target=self._pump, args=(found,), daemon=True).start()
        if not found.wait(self.startup_timeout) or not self.port:
            self.stop()
            raise RuntimeError(f"server did not start: {' '.join(self.argv)}\n{self.log_text()}")
        self._wait_accepting()
        return self

    def _pump(self, found: threading.Event) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log += line
            match = _PORT_LINE.search(line)
            if match and not self.port:
                self.port = int(match.group(1))
                found.set()
        found.set()

    def _wait_accepting(self) -> None:
        # Until it answers, or exits (gunicorn logs its port before a worker fails to boot):
        # a server that is gone says so at once instead of after startup_timeout.
        proc = self.proc
        assert proc is not None
        answering = wait_until(lambda: proc.poll() is not None
                               or answers_http(self.port, tls=self.tls), self.startup_timeout)
        if not answering or proc.poll() is not None:
            raise RuntimeError(f"server never answered on port {self.port}\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGINT)  # quick stop for both servers
        if self.wait(timeout) is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gunicorn_server(app: str, worker_class: str, args: Sequence[str] = (),
                    env: dict[str, str] | None = None, workers: int = 1) -> ServerProcess:
    argv = [sys.executable, "-m", "gunicorn", "-b", "127.0.0.1:0", "-k", worker_class,
            "-w", str(workers), "--log-level", "info", *args, app]  # info: the "Listening at" line
    return ServerProcess(argv, env or {})


def uvicorn_server(app: str, http: str, loop: str = "asyncio", args: Sequence[str] = (),
                   env: dict[str, str] | None = None) -> ServerProcess:
    argv = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "0",
            "--http", http, "--loop", loop, "--no-access-log", *args, app]
    return ServerProcess(argv, env or {})


# hypercorn: stock, and ours through its config module.
HYPERCORN_CONFIG = "python:graceful_close.hypercorn"


def hypercorn_server(app: str, ours: bool, args: Sequence[str] = (),
                     env: dict[str, str] | None = None) -> ServerProcess:
    """hypercorn's default asyncio worker (one, spawned by hypercorn's parent process)."""
    argv = [sys.executable, "-m", "hypercorn", "-b", "127.0.0.1:0",
            *(["-c", HYPERCORN_CONFIG] if ours else []), *args, app]
    return ServerProcess(argv, env or {})


def waitress_server(app: str, ours: bool, args: Sequence[str] = (),
                    env: dict[str, str] | None = None) -> ServerProcess:
    """waitress-serve, or ours (python -m graceful_close.waitress, the same options)."""
    module = "graceful_close.waitress" if ours else "waitress"
    argv = [sys.executable, "-m", module, "--listen=127.0.0.1:0", *args, app]
    return ServerProcess(argv, env or {})
