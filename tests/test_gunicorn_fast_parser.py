"""Issue 17 item 2: with gunicorn[fast] (the gunicorn_h1c C parser) installed, every gunicorn
worker of ours parses with the parser stock takes, answers what stock answers, and still
lingers (an early 413 to an unread upload arrives whole, then FIN).

gunicorn 27's ASGIProtocol caches gunicorn_h1c in class attributes written on the class the
check is called on and read from ASGIProtocol itself: our subclass wrote its own, so with
`--http-parser fast` every connection raised RuntimeError (the client got nothing) and with
`auto` ours took the pure-Python parser where stock took H1CProtocol (_compat, reach 6).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import GUNICORN_WORKERS, ServerProcess, gunicorn_server
from graceful_close.diagnostics.scenarios import Target, early_response_upload
from graceful_close.gunicorn._compat import share_asgi_parser_cache
from tests.helpers import (
    SHORT_LINGER,
    assert_early_413s_intact,
    assert_one_line_refusal,
    expect_stock_failure,
)

pytest.importorskip("gunicorn_h1c", reason="the [fast] extra (the test extra installs it)")

REPO = Path(__file__).resolve().parent.parent
APPS = {"sync": "tests.apps_parser:wsgi", "gthread": "tests.apps_parser:wsgi",
        "gevent": "tests.apps_parser:wsgi", "asgi": "tests.apps_parser:asgi"}
# What /parser answers when gunicorn takes the C parser.
FAST = {"sync": "fast", "gthread": "fast", "gevent": "fast", "asgi": "H1CProtocol"}
# Requests whose answers differ between gunicorn's two parsers, or exercise framing: each on a
# connection of its own. Stock and ours must answer each with the same status line and body.
REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\nConnection: close\n\n",                    # bare LF
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\nConnection: close\r\n\r\n",
    b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\nab",
    b"GET / HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n",
]


def _server(kind: str, ours: bool, parser: str) -> ServerProcess:
    threads = ["--threads", "2"] if kind == "gthread" else []
    return gunicorn_server(APPS[kind], GUNICORN_WORKERS[kind][ours],
                           args=["--pythonpath", str(REPO), "--http-parser", parser, *threads],
                           env=SHORT_LINGER)


def _answer(port: int, request: bytes) -> tuple[bytes, bytes]:
    """The status line and body of the answer (headers left out: Date differs)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def _parser(port: int) -> str:
    status, body = _answer(port, b"GET /parser HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), (status, body)
    return body.decode()


def test_our_asgi_protocol_shares_gunicorns_parser_cache() -> None:
    from graceful_close.gunicorn.asgi_worker import LingeringASGIProtocol

    assert share_asgi_parser_cache(LingeringASGIProtocol) is None
    assert not [name for name in vars(LingeringASGIProtocol) if name.startswith("_h1c_")]


@pytest.mark.parametrize("parser", ["fast", "auto"])
@pytest.mark.parametrize("kind", ["sync", "gthread", "asgi", "gevent"])
def test_same_parser_and_answers_as_stock_and_the_413_still_lingers(start_server, kind: str,
                                                                       parser: str) -> None:
    stock = start_server(_server(kind, False, parser))
    ours = start_server(_server(kind, True, parser))
    assert _parser(stock.port) == FAST[kind]  # gunicorn_h1c is installed: auto takes it too
    assert _parser(ours.port) == FAST[kind]
    for request in REQUESTS:
        assert _answer(ours.port, request) == _answer(stock.port, request), request[:60]
    assert_early_413s_intact(Target("127.0.0.1", ours.port))
    if kind != "gevent":  # stock gevent reads the unread body before closing
        result = early_response_upload(Target("127.0.0.1", stock.port), "/upload?size=1000000",
                                       8 << 20, timeout=20)
        expect_stock_failure(not (result.intact and result.ending == "FIN"),
                             f"stock {kind} --http-parser {parser}: early 413 {result.as_dict()}")


REFUSAL = """
import sys
from gunicorn.asgi.protocol import ASGIProtocol
del ASGIProtocol._check_h1c_protocol_available  # a gunicorn whose parser cache moved elsewhere
sys.argv = ["gunicorn", "-b", "127.0.0.1:0", "-k", "graceful_close.gunicorn.ASGIWorker",
            "graceful_close.diagnostics.sample_apps:asgi_app"]
from gunicorn.app.wsgiapp import run
run()
"""


def test_refuses_with_one_line_when_the_parser_cache_can_no_longer_be_shared() -> None:
    assert_one_line_refusal(REFUSAL, "_check_h1c_protocol_available is gone")
