"""What an app gets from ThreadWorker, next to stock gthread in the same test (issue 12
items 4, 5 and 6): keep-alive is kept for legal WSGI that reads its body after
start_response, the 64 KiB unread rule holds for chunked bodies too, and the response in
flight at --max-requests keeps keep-alive as stock's does.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import GUNICORN_WORKERS, ServerProcess, gunicorn_server
from graceful_close.diagnostics.wire import Response, ResponseReader, request_bytes
from tests.helpers import expect_stock_failure

REPO = Path(__file__).resolve().parent.parent
APP = "tests.apps_gunicorn:app"


def _server(ours: bool, *args: str) -> ServerProcess:
    return gunicorn_server(APP, GUNICORN_WORKERS["gthread"][1 if ours else 0],
                           args=["--pythonpath", str(REPO), "--threads", "4", "--keep-alive", "5",
                                 *args])


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
def test_start_response_before_reading_the_body_keeps_keep_alive(start_server, ours: bool) -> None:
    """Item 4: the app calls start_response, then reads a 200 KB Content-Length body. The
    unread-body rule is decided when the headers go out, after the read: keep-alive, and
    the second request is served on the same connection, as stock does."""
    server = start_server(_server(ours))
    body = b"b" * 200_000
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        reader = ResponseReader(sock, time.monotonic() + 10)
        responses: list[Response] = []
        for _ in range(2):
            sock.sendall(request_bytes("POST", "/read-after-start", "x", body=body))
            responses.append(reader.read_response())
    assert [r.status for r in responses] == [200, 200]
    assert [r.body_prefix for r in responses] == [b"200000", b"200000"]
    assert [r.header("connection") for r in responses] == ["keep-alive", "keep-alive"]


def _chunked_upload_unread(port: int, size: int) -> tuple[Response, str]:
    """A chunked upload of `size` bytes the app never reads (the client sends it at once);
    the response and how the connection ended after it."""
    head = (b"POST /unread?s=0.3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (16384, b"c" * 16384)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sender = threading.Thread(target=lambda: _send_quietly(sock, head + chunk * (size // 16384)),
                                  daemon=True)
        sender.start()
        reader = ResponseReader(sock, time.monotonic() + 10)
        response = reader.read_response()
        ending = reader.read_end() if response.header("connection") == "close" else "open"
        sender.join(10)
    return response, ending


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
def test_chunked_body_over_64k_unread_gets_connection_close(start_server, ours: bool) -> None:
    """Item 5: 512 KiB of chunked upload the app leaves unread. gthread drains at most
    64 KiB after the response and then closes: stock (and our old code, which looked at
    Content-Length only) first announced keep-alive. Ours says Connection: close and
    ends with FIN after the whole response."""
    server = start_server(_server(ours))
    response, ending = _chunked_upload_unread(server.port, 512 * 1024)
    assert response.status == 200 and response.complete
    if ours:
        assert response.header("connection") == "close" and ending == "FIN", (response.headers, ending)
    else:
        expect_stock_failure(response.header("connection") != "close",
                             "stock gthread announces close for an unread chunked upload")


def test_small_unread_chunked_body_keeps_keep_alive(start_server) -> None:
    """The rule is about more than 64 KiB: a small unread chunked body is drained by
    gthread and the connection stays open."""
    server = start_server(_server(True))
    response, ending = _chunked_upload_unread(server.port, 16384)
    assert response.header("connection") == "keep-alive" and ending == "open"


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
def test_response_in_flight_at_max_requests_keeps_keep_alive(start_server, ours: bool) -> None:
    """Item 6: a slow request is in flight when other requests take the worker to
    --max-requests. Its response keeps keep-alive (stock gunicorn 27, #3821); the next
    request on that connection is answered with Connection: close."""
    server = start_server(_server(ours, "--max-requests", "6"))
    slow: dict[str, object] = {}
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    reader = ResponseReader(sock, time.monotonic() + 15)

    def slow_request() -> None:
        sock.sendall(request_bytes("GET", "/slow?s=2", "x"))
        slow["first"] = reader.read_response()

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)
    for _ in range(10):  # until the response that reaches --max-requests says close
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as other:
            other.sendall(request_bytes("GET", "/", "x"))
            if ResponseReader(other, time.monotonic() + 15).read_response().header(
                    "connection") == "close":
                break
    thread.join(15)
    first = slow["first"]
    assert isinstance(first, Response) and first.status == 200
    assert first.header("connection") == "keep-alive"
    sock.sendall(request_bytes("GET", "/", "x"))
    second = reader.read_response()
    assert second.status == 200 and second.header("connection") == "close"
    assert reader.read_end() == "FIN"
    sock.close()
