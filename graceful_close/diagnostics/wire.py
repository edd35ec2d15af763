"""A minimal HTTP/1.1 response reader over a raw socket, for the scenario clients.

It tells apart what an HTTP library hides: how many body bytes arrived before
the connection ended, and whether it ended with FIN (clean EOF) or RST.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field


class ConnectionEnded(Exception):
    """The connection ended (kind is 'FIN', 'RST' or 'TIMEOUT') while reading."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind
        self.response: Response | None = None  # what had arrived of the response being read


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    expected_length: int | None = None  # from Content-Length; None if chunked/until-EOF
    received_length: int = 0
    complete: bool = False
    body_prefix: bytes = b""  # first bytes of the body, for messages like a 413 text
    version: str = ""         # of the status line: "HTTP/1.1", "HTTP/1.0"
    ended_by: str | None = None  # FIN, RST or TIMEOUT: the end of a body that runs until the
    #                              connection ends (no Content-Length), or that cut this one

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def length_unknown(self) -> bool:
        """No Content-Length: the client cannot tell a whole body from a cut one by its size."""
        return self.expected_length is None

    def close_signal(self, request_http10: bool = False) -> str | None:
        """What in this answer ends the connection after it (RFC 9112 section 9.3), or None.

        'Connection: close'; an HTTP/1.0 status line without keep-alive; an answer without
        keep-alive to an HTTP/1.0 request (`request_http10`); or a body that runs until the
        connection ends (no Content-Length, not chunked).
        """
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if "close" in tokens:
            return "Connection: close"
        if self.version == "HTTP/1.0" and "keep-alive" not in tokens:
            return "an HTTP/1.0 status line"
        if request_http10 and "keep-alive" not in tokens:
            return "an answer to an HTTP/1.0 request without keep-alive"
        if self.ended_by is not None and self.complete and self.length_unknown:
            return "a body without Content-Length (it ends with the connection)"
        return None


class ResponseReader:
    """Reads successive responses from one socket, tracking how the connection ends."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = bytearray()
        self.ended: str | None = None

    def _fill(self) -> None:
        if self.ended:
            raise ConnectionEnded(self.ended)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectionEnded("TIMEOUT")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            raise ConnectionEnded("TIMEOUT") from None
        except ssl.SSLEOFError:  # TCP FIN without TLS close_notify: still an orderly end
            self.ended = "FIN"
            raise ConnectionEnded("FIN") from None
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            self.ended = "RST"
            raise ConnectionEnded("RST") from None
        if not data:
            self.ended = "FIN"
            raise ConnectionEnded("FIN")
        self.buffer += data

    def _line(self) -> bytes:
        while True:
            at = self.buffer.find(b"\r\n")
            if at >= 0:
                line = bytes(self.buffer[:at])
                del self.buffer[:at + 2]
                return line
            self._fill()

    def _take(self, n: int, response: Response) -> None:
        while n > 0:
            if not self.buffer:
                self._fill()
            chunk = self.buffer[:n]
            if len(response.body_prefix) < 256:
                response.body_prefix += bytes(chunk[:256 - len(response.body_prefix)])
            del self.buffer[:len(chunk)]
            response.received_length += len(chunk)
            n -= len(chunk)

    def read_response(self, head_request: bool = False) -> Response:
        """Read one response; on a premature end, the partial Response is on the exception."""
        response = Response()
        try:
            self._read_into(response, head_request)
        except ConnectionEnded as ended:
            ended.response = response
            if response.status:
                response.ended_by = ended.kind
            raise
        return response

    def _read_into(self, response: Response, head_request: bool) -> None:
        while True:
            status_line = self._line()
            parts = status_line.split(b" ", 2)
            response.version = parts[0].decode("latin-1")
            response.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            response.headers = {}
            while line := self._line():
                name, _, value = line.decode("latin-1").partition(":")
                response.headers[name.strip().lower()] = value.strip()
            if not 100 <= response.status < 200:
                break  # skip interim 1xx responses
        if head_request or response.status in (204, 304):
            response.complete = True
            return
        if "chunked" in response.headers.get("transfer-encoding", "").lower():
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                self._take(size, response)
                self._line()
            response.complete = True
            return
        length = response.headers.get("content-length")
        if length is not None:
            response.expected_length = int(length)
            self._take(response.expected_length, response)
            response.complete = True
            return
        try:  # no framing: the body runs until the connection ends (self.ended says how)
            while True:
                self._take(len(self.buffer) or 1, response)
        except ConnectionEnded as ended:
            response.complete = ended.kind == "FIN"
            response.ended_by = ended.kind

    def read_end(self) -> str:
        """After the last expected response: how the connection ends (FIN, RST, TIMEOUT)."""
        extra = len(self.buffer)
        self.buffer.clear()
        try:
            while True:
                self._fill()
                extra += len(self.buffer)
                self.buffer.clear()
        except ConnectionEnded as ended:
            return ended.kind if not extra else f"{ended.kind}+{extra}B"


def request_bytes(method: str, path: str, host: str, headers: dict[str, str] | None = None,
                  body: bytes = b"", content_length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if content_length is None and (body or method in ("POST", "PUT")):
        content_length = len(body)
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
