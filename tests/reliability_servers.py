"""Servers and small client helpers shared by the tests/test_reliability_*.py suite.

Each reliability test runs against our gunicorn ThreadWorker and our uvicorn
httptools protocol (both started with graceful_close.diagnostics.launch). When one of
our classes does not import, the tests FAIL with the reason: a broken import must
never look like a green run.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator, Sequence

import pytest

from graceful_close.diagnostics.launch import (
    GUNICORN_WORKERS,
    UVICORN_PROTOCOLS,
    ServerProcess,
    gunicorn_server,
    import_problem,
    uvicorn_server,
)
from graceful_close.diagnostics.scenarios import collect_responses
from graceful_close.diagnostics.wire import Response, ResponseReader, request_bytes
from tests.helpers import SAMPLE_ASGI, SAMPLE_WSGI

KINDS = ("gthread", "httptools")
OURS = {"gthread": GUNICORN_WORKERS["gthread"][1], "httptools": UVICORN_PROTOCOLS["httptools"][1],
        "uvicorn-worker": GUNICORN_WORKERS["uvicorn-worker"][1]}
STOCK = {"gthread": "gthread", "httptools": "httptools",
         "uvicorn-worker": GUNICORN_WORKERS["uvicorn-worker"][0]}
LINGER_TIMEOUT = 0.5
LINGER_TIME = 3.0


def linger_env(**overrides: object) -> dict[str, str]:
    # These tests make lingering connections with clients that send Connection: close: under
    # the default lingering_close=auto those close at once (tests/test_lingering_close_setting.py),
    # so they run with always, which lingers on every close.
    env = {"LINGER_TIMEOUT": LINGER_TIMEOUT, "LINGER_TIME": LINGER_TIME,
           "LINGERING_CLOSE": "always", **overrides}
    return {f"GRACEFUL_CLOSE_{name.upper()}": str(value) for name, value in env.items()}


def missing(kind: str) -> str | None:
    """Why our class for `kind` cannot be imported, or None."""
    return import_problem(OURS[kind])


def make_server(kind: str, env: dict[str, str], args: Sequence[str] = (), ours: bool = True,
                prefix: Sequence[str] = ()) -> ServerProcess:
    """A server (not started) with one worker; `prefix` runs it under e.g. prlimit."""
    reason = missing(kind) if ours else None
    if reason:
        pytest.fail(reason, pytrace=False)
    impl = OURS[kind] if ours else STOCK[kind]
    if kind == "httptools":
        server = uvicorn_server(SAMPLE_ASGI, impl, loop="asyncio", args=args, env=env)
    elif kind == "gthread":
        server = gunicorn_server(SAMPLE_WSGI, impl, args=["--threads", "4", *args], env=env)
    else:
        server = gunicorn_server(SAMPLE_ASGI, impl, args=args, env=env)
    server.argv = [*prefix, *server.argv]
    return server


def module_server(kind: str, env: dict[str, str], args: Sequence[str] = ()) -> Iterator[ServerProcess]:
    """Body of a module-scoped fixture: one started server for the whole module."""
    with make_server(kind, env, args) as server:
        yield server


def exchange(port: int, payload: bytes, *, shut_wr: bool = True, timeout: float = 10.0,
             max_responses: int = 10) -> tuple[list[Response], str]:
    """Send raw bytes, optionally half-close, read every response and how it ended."""
    responses: list[Response] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            if shut_wr:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            return responses, "RST(send)"
        reader = ResponseReader(sock, time.monotonic() + timeout)
        return responses, collect_responses(reader, responses, max_responses) or reader.read_end()


def get_ok(port: int, path: str = "/", timeout: float = 10.0) -> bool:
    """A normal request on a new connection is answered 200, complete."""
    try:
        responses, _ = exchange(port, request_bytes("GET", path, "x", {"Connection": "close"}),
                                shut_wr=False, timeout=timeout, max_responses=1)
    except OSError:
        return False
    return bool(responses) and responses[0].status == 200 and responses[0].complete


def reset_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a client that aborts does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def so_error(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
