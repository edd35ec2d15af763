"""Normal traffic is untouched: ours answers exactly like stock uvicorn.

Keep-alive pipelining, HEAD, chunked bodies both ways, 100-continue and
WebSocket upgrades are compared response by response with stock uvicorn in the
same run; no difference is allowed (a Keep-Alive header only with keepalive_header).
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

import pytest

from graceful_close.diagnostics.wire import ConnectionEnded, Response, ResponseReader, request_bytes
from tests.uvicorn_servers import TEST_APP, Fleet

HTTPS = ("httptools", "h11", "zttp")


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    yield fleet
    fleet.stop()


def connect(fleet: Fleet, kind: str, http: str) -> socket.socket:
    return fleet.target(kind, http, app=TEST_APP).connect(5)


def summary(response: Response) -> tuple[object, ...]:
    """What a client relies on; Date and Server are the same for both anyway."""
    framing = response.header("content-length") or response.header("transfer-encoding")
    return (response.status, framing, response.received_length, response.body_prefix)


def keep_alive_mix(host: str) -> tuple[bytes, list[bool]]:
    """Five pipelined requests of different shapes, and which of them are HEAD."""
    chunked = (f"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
               "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").encode()
    requests = [request_bytes("GET", "/", host), request_bytes("HEAD", "/big?size=5000", host),
                request_bytes("GET", "/stream", host), chunked,
                request_bytes("GET", "/big?size=100000", host)]
    return b"".join(requests), [False, True, False, False, False]


def exchange(sock: socket.socket, data: bytes, heads: list[bool]) -> tuple[list[Response], str]:
    sock.sendall(data)
    reader = ResponseReader(sock, time.monotonic() + 5)
    responses = [reader.read_response(head_request=head) for head in heads]
    reader.deadline = time.monotonic() + 0.3  # still open shortly after: keep-alive holds
    return responses, reader.read_end()


@pytest.mark.parametrize("http", HTTPS)
def test_pipelined_keep_alive_traffic_matches_stock(fleet, http) -> None:
    results = {}
    for kind in ("stock", "ours"):
        with connect(fleet, kind, http) as sock:
            data, heads = keep_alive_mix(f"127.0.0.1:{sock.getpeername()[1]}")
            responses, ending = exchange(sock, data, heads)
        assert ending == "TIMEOUT", (kind, ending)  # the connection stays open
        results[kind] = responses
    assert [summary(r) for r in results["ours"]] == [summary(r) for r in results["stock"]]
    assert results["ours"][2].header("transfer-encoding") == "chunked"
    assert results["ours"][3].body_prefix == b"11"
    assert results["ours"][1].header("content-length") == "5000"
    for response in results["stock"] + results["ours"]:
        assert response.header("keep-alive") is None
        assert response.header("connection") is None


@pytest.mark.parametrize("kind", ["stock", "ours"])
@pytest.mark.parametrize("http", HTTPS)
def test_expect_100_continue(fleet, kind, http) -> None:
    with connect(fleet, kind, http) as sock:
        sock.sendall(request_bytes("POST", "/echo", "x", {"Expect": "100-continue"},
                                   content_length=5))
        reader = ResponseReader(sock, time.monotonic() + 5)
        assert reader._line() == b"HTTP/1.1 100 Continue"
        assert reader._line() == b""
        sock.sendall(b"12345")
        response = reader.read_response()
    assert response.status == 200 and response.body_prefix == b"5"


def _ws_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


def _read_ws_frame(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    while len(buffer) < 2 or len(buffer) < 2 + (buffer[1] & 0x7F):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionEnded("FIN")
        buffer += chunk
    opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
    payload = bytes(buffer[2:2 + length])
    del buffer[:2 + length]
    return opcode, payload


@pytest.mark.parametrize("kind", ["stock", "ours"])
@pytest.mark.parametrize("http", HTTPS)
def test_websocket_upgrade_after_a_keep_alive_request(fleet, kind, http) -> None:
    """A keep-alive request, then an upgrade on the same connection: 101, an echo, a close."""
    pytest.importorskip("websockets")
    with connect(fleet, kind, http) as sock:
        sock.settimeout(5)
        reader = ResponseReader(sock, time.monotonic() + 5)
        sock.sendall(request_bytes("GET", "/", "x"))
        assert reader.read_response().status == 200
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(request_bytes("GET", "/ws", "x", {
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13"}))
        status_line = reader._line()  # read_response() skips 1xx: read the 101 by hand
        assert status_line.startswith(b"HTTP/1.1 101"), status_line
        while reader._line():
            pass
        # Past --timeout-keep-alive: a WebSocket is not an idle HTTP connection to close.
        time.sleep(1.3)
        sock.sendall(_ws_frame("hi"))
        buffer = reader.buffer
        assert _read_ws_frame(sock, buffer) == (0x1, b"echo:hi")
        opcode, payload = _read_ws_frame(sock, buffer)
        assert opcode == 0x8 and payload[:2] == struct.pack("!H", 1000)


@pytest.mark.parametrize("http", HTTPS)
def test_app_connection_close_gets_no_keep_alive_header(fleet, http) -> None:
    """The app closes the connection itself: ours must not claim it stays open, even
    with keepalive_header on."""
    t = fleet.target("ours", http, app=TEST_APP, env={"GRACEFUL_CLOSE_KEEPALIVE_HEADER": "true"})
    with t.connect(5) as sock:
        sock.sendall(request_bytes("GET", "/big?close=1&size=10", "x"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk
            head += chunk
    lines = head.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    assert lines.count(b"connection: close") == 1, lines
    assert not any(line.startswith(b"keep-alive:") for line in lines), lines
