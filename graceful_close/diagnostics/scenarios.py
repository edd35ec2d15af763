"""Scenario clients: the client behaviours that expose a close that is not lingering.

Each scenario talks raw HTTP/1.1 over one socket and reports the bytes of each
response received, whether it was complete, how the connection ended (FIN or
RST), and timings. Every scenario is bounded in bytes and time.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .wire import ConnectionEnded, Response, ResponseReader, request_bytes

UPLOAD_CHUNK = 65536


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: ssl.SSLContext | None = None
    host_header: str | None = None

    @property
    def authority(self) -> str:
        return self.host_header or f"{self.host}:{self.port}"

    def tls_server_name(self) -> str:
        return self.host_header or self.host

    def connect(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.tls_server_name())
        return sock


@dataclass
class ScenarioResult:
    name: str
    responses: list[Response] = field(default_factory=list)
    expected_responses: int = 1
    ending: str = "?"           # FIN, RST or TIMEOUT (+NB when bytes followed the last response)
    elapsed: float = 0.0
    released_after: float | None = None  # seconds from the server's EOF to its final close
    note: str = ""

    @property
    def intact(self) -> bool:
        """Every expected response arrived whole."""
        done = [r for r in self.responses if r.complete]
        return len(done) >= self.expected_responses

    @property
    def complete_responses(self) -> int:
        return sum(r.complete for r in self.responses)

    @property
    def body_bytes(self) -> int:
        return sum(r.received_length for r in self.responses)

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.update(intact=self.intact, complete_responses=self.complete_responses,
                    body_bytes=self.body_bytes)
        return data


def collect_responses(reader: ResponseReader, responses: list[Response], limit: int,
                      stop_at_close: bool = False, request_http10: bool = False) -> str | None:
    """Append up to `limit` responses (a cut one too); how the connection ended, or None.

    A body without Content-Length runs until the connection ends: its end (FIN, RST, ...)
    is the connection's. `stop_at_close`: stop after an answer that ends the connection
    (Connection: close, ...), as a conforming client does: it reads nothing after it.
    """
    try:
        for _ in range(limit):
            response = reader.read_response()
            responses.append(response)
            if response.ended_by is not None:
                return response.ended_by
            if stop_at_close and response.close_signal(request_http10):
                return None
    except ConnectionEnded as ended:
        partial = getattr(ended, "response", None)
        if partial is not None and partial.status:
            responses.append(partial)
        return ended.kind
    return None


def _read_responses(reader: ResponseReader, result: ScenarioResult, limit: int) -> None:
    """Read up to `limit` responses, then how the connection ends."""
    result.ending = collect_responses(reader, result.responses, limit) or reader.read_end()


def send_unread_upload(sock: socket.socket, target: Target, path: str, size: int,
                       chunk_size: int = UPLOAD_CHUNK) -> tuple[int, str | None]:
    """POST headers and `size` body bytes without reading anything back.

    Returns the bytes sent and how sending stopped early: "reset", "stalled" or None.
    """
    sock.sendall(request_bytes("POST", path, target.authority, content_length=size,
                               headers={"Content-Type": "application/octet-stream"}))
    chunk, sent = b"u" * chunk_size, 0
    try:
        while sent < size:
            sock.sendall(chunk[:size - sent])
            sent += min(chunk_size, size - sent)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return sent, "reset"
    except TimeoutError:
        return sent, "stalled"
    return sent, None


def timed_request(target: Target, timeout: float, path: str = "/") -> float:
    """A normal client: seconds for one request on a new connection (`timeout` if unanswered)."""
    start = time.monotonic()
    try:
        with target.connect(timeout) as sock:
            sock.sendall(request_bytes("GET", path, target.authority, {"Connection": "close"}))
            ResponseReader(sock, start + timeout).read_response()
    except (OSError, ConnectionEnded):
        return timeout
    return time.monotonic() - start


def _count_send_reset(result: ScenarioResult) -> None:
    """A reset met while sending makes later reads return EOF: it still ended by RST."""
    if "reset" in result.note and result.ending.startswith("FIN"):
        result.ending = "RST"


def early_response_upload(target: Target, path: str = "/upload", upload_size: int = 8 << 20,
                          timeout: float = 30.0) -> ScenarioResult:
    """POST a large body the server answers before reading; read only after sending it all."""
    result = ScenarioResult("early_response_upload")
    start = time.monotonic()
    sock = target.connect(timeout)
    try:
        sent, stopped = send_unread_upload(sock, target, path, upload_size)
        if stopped:
            result.note = f"upload {stopped} after {sent} of {upload_size} bytes"
        _read_responses(ResponseReader(sock, start + timeout), result, 1)
        _count_send_reset(result)
    finally:
        result.elapsed = time.monotonic() - start
        sock.close()
    return result


def pipelined(target: Target, requests: list[bytes], expected: int, gap: float = 0.05,
              read_delay: float = 0.3, timeout: float = 30.0,
              name: str = "pipelined") -> ScenarioResult:
    """Send the first request, then the rest `gap` seconds later, wait, then read
    responses until the connection ends.

    The later requests arrive while the server is busy with the first, so they sit
    unread in its socket when it closes: the case where a plain close() resets
    the connection under responses the client has not read yet.
    """
    result = ScenarioResult(name, expected_responses=expected)
    start = time.monotonic()
    sock = target.connect(timeout)
    try:
        try:
            sock.sendall(requests[0])
            time.sleep(gap)
            sock.sendall(b"".join(requests[1:]))
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            result.note = "reset while sending"
        time.sleep(read_delay)
        _read_responses(ResponseReader(sock, start + timeout), result, len(requests))
        _count_send_reset(result)
    finally:
        result.elapsed = time.monotonic() - start
        sock.close()
    return result


def pipelined_after_close(target: Target, close_path: str = "/big?close=1", follow: int = 5,
                          **kwargs: Any) -> ScenarioResult:
    """A response that ends the connection, with requests pipelined behind it.

    The first request asks for Connection: close itself, which every server honours
    (gunicorn ignores an app's Connection header; the sample ASGI app adds one too).
    Requests after our own Connection: close are what RFC 9112 section 9.6 forbids a
    client: the tests use it to force every server to close; `graceful-close probe`
    does not (probe_clients.close_pipeline lets the server decide).
    """
    first = request_bytes("GET", close_path, target.authority, {"Connection": "close"})
    rest = [request_bytes("GET", "/", target.authority)] * follow
    return pipelined(target, [first, *rest], expected=1, name="pipelined_after_close", **kwargs)


def _watch_release(sock: socket.socket, result: ScenarioResult, eof_at: float, hold: float,
                   trickle_every: float | None) -> None:
    """After the server's EOF, hold the socket open; note when the server drops it.

    The drop is seen as RST: either at once (the server aborted safely) or on the
    next byte we send (the server's socket is gone). After a FIN, recv() keeps
    returning b"" even once a RST has come, so the RST is read from SO_ERROR.
    """
    sock.setblocking(False)
    next_trickle = time.monotonic() if trickle_every is not None else None
    while time.monotonic() - eof_at < hold:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            result.released_after = time.monotonic() - eof_at
            return
        try:
            if trickle_every is not None and next_trickle is not None \
                    and time.monotonic() >= next_trickle:
                sock.send(b"t")
                next_trickle += trickle_every
            if sock.recv(1) == b"":
                pass  # EOF seen again; keep holding
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
            result.released_after = time.monotonic() - eof_at
            return
        time.sleep(0.02)


def old_client_request(path: str, authority: str) -> bytes:
    """An HTTP/1.0 GET without a Connection header: the server ends the connection after
    answering it. Old clients are the ones that never close (the Apache FIN_WAIT_2 notes),
    and such an implicit close lingers under lingering_close=auto too (an explicit
    Connection: close from the client closes at once there: it sends nothing more)."""
    return request_bytes("GET", path, authority).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)


def _hold_scenario(name: str, target: Target, path: str, hold: float,
                   trickle_every: float | None, timeout: float) -> ScenarioResult:
    result = ScenarioResult(name)
    start = time.monotonic()
    sock = target.connect(timeout)
    try:
        sock.sendall(old_client_request(path, target.authority))
        reader = ResponseReader(sock, start + timeout)
        _read_responses(reader, result, 1)
        if result.ending.startswith("FIN"):
            _watch_release(sock, result, time.monotonic(), hold, trickle_every)
    finally:
        result.elapsed = time.monotonic() - start
        sock.close()
    return result


def never_closing(target: Target, path: str = "/", hold: float = 10.0,
                  timeout: float = 30.0) -> ScenarioResult:
    """Send an HTTP/1.0 GET, read the response and the server's EOF, then never close (the
    buggy old client)."""
    return _hold_scenario("never_closing", target, path, hold, None, timeout)


def trickling(target: Target, path: str = "/", every: float = 0.5, hold: float = 10.0,
              timeout: float = 30.0) -> ScenarioResult:
    """Like never_closing, but keep sending a byte every `every` seconds during the linger."""
    return _hold_scenario("trickling", target, path, hold, every, timeout)
