"""The probe is a conforming HTTP/1.1 client: it never sends a request after a
`Connection: close` of its own (RFC 9112 section 9.6).

A small recording server on 127.0.0.1 answers like a careful server (keep-alive with a
1 s idle timeout, an early 413 to every POST, a lingering close that reads until the
client's EOF) and keeps every byte each connection received. After a full probe run,
each connection's bytes are walked request by request: nothing may follow a request
that carried Connection: close. The server lingers everywhere, so the probe must also
call every scenario PASS.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

BIG = 1_100_000          # >= 1 MB: close-pipeline is exercised
IDLE_TIMEOUT = 1.0
LINGER = 5.0             # longest drain after our FIN


def _head(buffer: bytearray, sock: socket.socket, stream: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buffer:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None  # idle timeout
        if not data:
            return None
        stream += data
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    buffer[:] = rest
    return head


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    return lines[0], headers


def _linger(sock: socket.socket, stream: bytearray) -> None:
    """Half-close, then read and keep everything until the client's EOF (at most LINGER s)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            data = sock.recv(65536)
            if not data:
                return
            stream += data
    except OSError:
        return


def _serve(sock: socket.socket, stream: bytearray) -> None:
    buffer = bytearray()
    with sock:
        while True:
            sock.settimeout(IDLE_TIMEOUT if not buffer else 10)
            head = _head(buffer, sock, stream)
            if head is None:
                _linger(sock, stream)
                return
            request_line, headers = _headers(head)
            method, path, version = request_line.split(" ")
            close = headers.get("connection") == "close" or version == "HTTP/1.0"
            if method == "POST":  # answered before its body is read, like a body limit
                body, status, close = b"too large\n", "413 Content Too Large", True
            else:
                body, status = (b"b" * BIG if path.startswith("/big") else b"ok\n"), "200 OK"
            sock.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
                         f"{'Connection: close' if close else 'Keep-Alive: timeout=1'}\r\n\r\n"
                         .encode() + body)
            if close:
                _linger(sock, stream)
                return


@pytest.fixture
def recording_server() -> Iterator[tuple[int, list[bytearray]]]:
    listener = socket.create_server(("127.0.0.1", 0))
    streams: list[bytearray] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            streams.append(bytearray())
            threading.Thread(target=_serve, args=(conn, streams[-1]), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], streams
    listener.close()


def after_own_close(stream: bytes) -> int:
    """Bytes a connection received after the end of a request with Connection: close."""
    rest = stream
    while b"\r\n\r\n" in rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        _, headers = _headers(head)
        body = int(headers.get("content-length", "0"))
        if headers.get("connection") == "close":
            return max(len(rest) - body, 0)
        rest = rest[body:]
    return 0


def test_probe_sends_nothing_after_its_own_connection_close(recording_server) -> None:
    port, streams = recording_server
    done = subprocess.run([sys.executable, "-m", "graceful_close.diagnostics.cli", "probe",
                           f"http://127.0.0.1:{port}/", "--big-path", "/big", "--upload-path",
                           "/upload", "--idle-max", "3", "--drain-time", "1", "--timeout", "5",
                           "--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout)
    time.sleep(0.5)  # the last connections' bytes are recorded
    assert len(streams) >= 8
    assert [after_own_close(bytes(s)) for s in streams] == [0] * len(streams)
    closing = sum(b"connection: close" in bytes(s).lower() for s in streams)
    assert closing >= 2  # the preflight and the pipeline's last request ask to close
    assert done.returncode == 0, report
    assert {v["scenario"]: v["status"] for v in report["scenarios"]} == {
        "pipeline": "pass", "close-pipeline": "pass", "idle": "pass", "upload": "pass",
        "drain": "pass"}, report
