"""lingering_close = auto | always (issue 18, graceful_close.core.closing), on all 8 servers
of gunicorn and uvicorn, hypercorn and waitress.

Under auto a connection the client ended itself with an explicit `Connection: close`, its
request received whole and nothing unread, closes at once, as the stock servers close it;
every other close lingers: an HTTP/1.0 request that closes only implicitly, a body left
unread, input pending behind the request, a close the server decides. Under always every
close lingers.

How it is seen from outside: each client reads its whole response and the server's FIN and
then keeps its socket open. A lingering close keeps the descriptor in the worker (until the
client closes or a deadline), a close at once does not. The protection itself (responses
intact with FIN where stock resets them) is what the scenario tests show, and they run under
both values (`.ci/run` runs them again with GRACEFUL_CLOSE_LINGERING_CLOSE=always).
"""

from __future__ import annotations

import socket
import time

import pytest

from graceful_close.diagnostics import launch
from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.wire import ResponseReader, request_bytes
from tests.helpers import SAMPLE_ASGI, SAMPLE_WSGI, fd_count, wait_until, worker_pid

CLIENTS = 4
SERVERS = ["sync", "gthread", "gevent", "asgi", "uvicorn-worker", "h11", "httptools", "zttp",
           "hypercorn", "waitress"]
WSGI = {"sync", "gthread", "gevent"}

CLIENT_CLOSE = request_bytes("GET", "/", "x", {"Connection": "close"})
CASES = {
    # case: (request bytes sent at once, body bytes sent after, lingers under auto)
    "client-close": (CLIENT_CLOSE, 0, False),
    "client-close, in capitals": (request_bytes("GET", "/", "x", {"Connection": "CLOSE"}), 0, False),
    "HTTP/1.0, closing implicitly": (b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", 0, True),
    "client-close, body unread": (
        request_bytes("POST", "/upload?size=10", "x", {"Connection": "close"},
                      content_length=1_000_000), 200_000, True),
    "client-close, input pending behind it": (CLIENT_CLOSE + b"\r\n\r\nGET / HTTP/1.1\r\n", 0, True),
}
# Bytes that arrive in the same read as the end of a Connection: close request are dropped by
# httptools (uvicorn sets llhttp's lenient_data_after_close) and held out of sight by zttp:
# these protocols close such a connection at once, as stock does. Being read already, those
# bytes cannot turn the close into an RST; only bytes still in flight could, and RFC 9112
# section 9.6 forbids the client to send them. Bytes in a later read are seen, and linger.
UNSEEN_PENDING = {"httptools", "uvicorn-worker", "zttp"}


def _server(key: str, mode: str) -> ServerProcess:
    env = {"GRACEFUL_CLOSE_LINGERING_CLOSE": mode}
    if key == "hypercorn":
        return launch.hypercorn_server(SAMPLE_ASGI, True, env=env)
    if key == "waitress":
        # waitress reads a whole body before it calls the app: the unread body is the one
        # its own limit refuses early (413).
        return launch.waitress_server(SAMPLE_WSGI, True, args=["--max-request-body-size=1024"],
                                      env=env)
    if key in launch.UVICORN_PROTOCOLS:
        return launch.uvicorn_server(SAMPLE_ASGI, launch.UVICORN_PROTOCOLS[key][1], env=env)
    app = SAMPLE_WSGI if key in WSGI else SAMPLE_ASGI
    args = ["--threads", "4"] if key == "gthread" else []
    return launch.gunicorn_server(app, launch.GUNICORN_WORKERS[key][1], args=args, env=env)


def _finished_clients(port: int, request: bytes, body: int) -> list[socket.socket]:
    """Clients that send `request` (and `body` more bytes), read the response and the
    server's FIN, and keep their socket open."""
    socks = []
    for _ in range(CLIENTS):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(request)
        if body:
            sock.sendall(b"u" * body)
        reader = ResponseReader(sock, time.monotonic() + 5)
        reader.read_response()
        assert reader.read_end() == "FIN"
        socks.append(sock)
    return socks


def _held(server: ServerProcess, request: bytes, body: int) -> int:
    """Descriptors the worker still holds for CLIENTS finished clients that keep their sockets."""
    pid = worker_pid(server.pid)
    time.sleep(0.3)  # the readiness probe's connection, lingering under always, has ended
    base = fd_count(pid)
    socks = _finished_clients(server.port, request, body)
    try:
        time.sleep(0.3)  # a close at once has happened by now; a linger lasts 5 s
        return fd_count(pid) - base
    finally:
        for sock in socks:
            sock.close()
        wait_until(lambda: fd_count(pid) <= base, 10)


@pytest.mark.parametrize("mode", ["auto", "always"])
@pytest.mark.parametrize("key", SERVERS)
def test_which_closes_linger(start_server, key: str, mode: str) -> None:
    server = start_server(_server(key, mode))
    held = {case: _held(server, request, body) for case, (request, body, _) in CASES.items()}
    expected = {case: (lingers or mode == "always") for case, (_, _, lingers) in CASES.items()}
    if mode == "auto" and key in UNSEEN_PENDING:
        expected["client-close, input pending behind it"] = False
    # held >= CLIENTS: every close lingered; none held: closed at once
    seen = {case: (count >= CLIENTS if expected[case] else count <= 0) for case, count in held.items()}
    assert all(seen.values()), [(case, held[case], expected[case]) for case in CASES]


@pytest.mark.parametrize("key", ["h11", "httptools"])
def test_the_app_closing_lingers_under_auto(start_server, key: str) -> None:
    """The app's Connection: close is the server's decision: the client may still be
    sending, so it lingers under auto too."""
    server = start_server(_server(key, "auto"))
    assert _held(server, request_bytes("GET", "/?close=1", "x"), 0) >= CLIENTS
