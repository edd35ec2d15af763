"""Black-box clients of `graceful-close probe`: how a server ends HTTP/1.1 connections.

Built on wire.ResponseReader and scenarios.Target. Every client is bounded: by
request count, by bytes read (CappedReader) and by wall time. They only send
GET requests, except upload(), which POSTs a throw-away body.

A reset that arrives after the server's FIN does not show up in recv() on
Linux (the EOF is returned first), so peer_reset() asks the kernel for the
socket's TCP state: CLOSE after an EOF means the peer answered with RST.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from .scenarios import Target, collect_responses, send_unread_upload
from .wire import ConnectionEnded, Response, ResponseReader, request_bytes

TCP_CLOSE_STATE = 7  # Linux tcp_states.h: TCP_CLOSE, where a socket lands after RST
RESET_SETTLE = 0.1   # seconds to let a reset provoked by our last bytes come back
KEEP_OPEN_WAIT = 1.0  # after an answer: a server that closes does so at once
END_WAIT = 2.0        # after a Connection: close answer: time for the server's FIN


class CappedReader(ResponseReader):
    """A ResponseReader that gives up (as 'CAP') once `max_bytes` body bytes were read."""

    def __init__(self, sock: socket.socket, deadline: float, max_bytes: int) -> None:
        super().__init__(sock, deadline)
        self.max_bytes = max_bytes
        self.body_bytes = 0

    def _take(self, n: int, response: Response) -> None:
        allowed = max(self.max_bytes - self.body_bytes, 0)
        before = response.received_length
        try:
            super()._take(min(n, allowed), response)
        finally:
            self.body_bytes += response.received_length - before
        if n > allowed:
            raise ConnectionEnded("CAP")


def peer_reset(sock: socket.socket) -> bool | None:
    """After an EOF: did the peer also send RST? None where the kernel cannot tell us."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return None
    return info[0] == TCP_CLOSE_STATE


def ending_after_eof(sock: socket.socket, kind: str, settle: float = RESET_SETTLE) -> str:
    """'FIN' becomes 'FIN+RST' when the server reset the connection right after its FIN."""
    if not kind.startswith("FIN"):
        return kind
    time.sleep(settle)
    return kind.replace("FIN", "FIN+RST", 1) if peer_reset(sock) else kind


def get(target: Target, path: str, close: bool = False) -> bytes:
    return request_bytes("GET", path, target.authority, {"Connection": "close"} if close else None)


@dataclass
class Exchange:
    """What one connection saw: responses, how it ended, timings (seconds)."""

    responses: list[Response] = field(default_factory=list)
    ending: str = "?"
    elapsed: float = 0.0
    note: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def complete(self) -> int:
        return sum(r.complete for r in self.responses)

    @property
    def partial(self) -> list[Response]:
        return [r for r in self.responses if not r.complete]

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        for response in data["responses"]:
            response.pop("body_prefix", None)
        data["complete"] = self.complete
        return data


def _read(reader: CappedReader, exchange: Exchange, limit: int) -> None:
    """Read up to `limit` responses; then how the connection ends, or 'OPEN' if it stays up."""
    exchange.ending = collect_responses(reader, exchange.responses, limit) or "OPEN"


def _end_after_last(reader: CappedReader, wait: float) -> str:
    """Every expected response is in: how does the connection end within `wait` s?

    'OPEN' when it does not: e.g. on TLS a lingering server cannot half-close and
    waits for the client to close first; the client already has every byte.
    """
    reader.deadline = time.monotonic() + wait
    ending = reader.read_end()
    return "OPEN" if ending == "TIMEOUT" else ending


def preflight(target: Target, path: str, timeout: float, max_bytes: int) -> Exchange:
    """One plain GET with Connection: close: is anybody there, and what does it answer."""
    exchange = Exchange()
    start = time.monotonic()
    with target.connect(timeout) as sock:
        sock.sendall(get(target, path, close=True))
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, 1)  # the answer is all we need; its end does not matter here
    exchange.elapsed = time.monotonic() - start
    return exchange


def pipeline(target: Target, path: str, count: int, timeout: float, max_bytes: int,
             group: int = 20, group_gap: float = 0.01, read_delay: float = 0.3) -> Exchange:
    """`count` pipelined GETs (the last asks for Connection: close), read only after sending.

    They go out in groups `group_gap` apart so that some arrive while the server is
    already answering: a server that stops early (a request cap) then has unread
    requests in its socket, the case where close() turns into RST.
    """
    exchange = Exchange()
    start = time.monotonic()
    requests = [get(target, path)] * (count - 1) + [get(target, path, close=True)]
    with target.connect(timeout) as sock:
        try:
            for at in range(0, count, group):
                sock.sendall(b"".join(requests[at:at + group]))
                time.sleep(group_gap)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            exchange.note = "reset while sending"
        time.sleep(read_delay)
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, count)
        if exchange.ending == "OPEN":  # every response read: the server should now close
            exchange.ending = _end_after_last(reader, min(timeout, END_WAIT))
        exchange.ending = ending_after_eof(sock, exchange.ending)
    exchange.elapsed = time.monotonic() - start
    return exchange


def close_pipeline(target: Target, path: str, follow: int, timeout: float, max_bytes: int,
                   gap: float = 0.05, read_delay: float = 0.3) -> Exchange:
    """A GET with Connection: close, `follow` GETs pipelined behind it, reading late.

    With a response larger than the socket buffers, the later requests reach the
    server while it is still sending: close() with them unread resets the
    connection and the client loses the tail of the response.
    """
    exchange = Exchange()
    start = time.monotonic()
    with target.connect(timeout) as sock:
        try:
            sock.sendall(get(target, path, close=True))
            time.sleep(gap)
            sock.sendall(get(target, "/") * follow)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            exchange.note = "reset while sending"
        time.sleep(read_delay)
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, 1)
        if exchange.ending == "OPEN":
            exchange.ending = _end_after_last(reader, min(timeout, END_WAIT))
        exchange.ending = ending_after_eof(sock, exchange.ending)
    exchange.elapsed = time.monotonic() - start
    return exchange


def upload(target: Target, path: str, size: int, timeout: float, max_bytes: int,
           chunk: int = 65536) -> Exchange:
    """POST `size` throw-away bytes without reading, then read the answer.

    A server that answers early (401, 413) and closes without draining the rest of
    the body resets the connection under its own answer.
    """
    exchange = Exchange()
    start = time.monotonic()
    with target.connect(timeout) as sock:
        sent, stopped = send_unread_upload(sock, target, path, size, chunk)
        if stopped == "reset":
            exchange.note = f"reset while sending, after {sent} of {size} bytes"
        elif stopped == "stalled":
            exchange.note = f"server stopped reading after {sent} of {size} bytes"
        exchange.extra["sent"] = sent
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, 1)
        if exchange.ending == "OPEN":  # answered: does it close now, and how?
            exchange.ending = _end_after_last(reader, min(timeout, KEEP_OPEN_WAIT))
        if exchange.ending.startswith("FIN") and exchange.note.startswith("reset"):
            exchange.ending = "RST"  # a reset while sending makes later reads return EOF
        else:
            exchange.ending = ending_after_eof(sock, exchange.ending)
    exchange.elapsed = time.monotonic() - start
    return exchange


def _request_on_closing(sock: socket.socket, reader: CappedReader, target: Target,
                        path: str) -> str:
    """Send one request on a connection the server is closing; how does it end?

    'answered' (the server still served it), 'FIN' (a clean EOF: safe to retry),
    'FIN+RST' (EOF, then the server's kernel reset the connection) or 'RST'.
    """
    try:
        sock.sendall(get(target, path))
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return "RST"
    try:
        reader.read_response()
        return "answered"
    except ConnectionEnded as ended:
        if ended.kind == "FIN":
            return ending_after_eof(sock, "FIN")
        return ended.kind


def _idle_attempt(target: Target, path: str, wait: float, timeout: float, max_bytes: int,
                  out: list[str], index: int) -> None:
    start = time.monotonic()
    try:
        with target.connect(timeout) as sock:
            reader = CappedReader(sock, start + timeout + wait, max_bytes)
            sock.sendall(get(target, path))
            reader.read_response()
            time.sleep(wait)
            out[index] = _request_on_closing(sock, reader, target, path)
    except ConnectionEnded as ended:
        out[index] = f"setup failed ({ended.kind})"
    except OSError as exc:
        out[index] = f"setup failed ({exc.strerror or exc})"


def idle_close(target: Target, path: str, idle_max: float, timeout: float, max_bytes: int,
               offsets: tuple[float, ...] = (-0.005, 0.0)) -> Exchange:
    """Find the server's keep-alive idle timeout, then send requests right at it.

    First connection: one request, then wait (at most `idle_max`) for the server to
    close; the wait is its idle timeout. The moment its FIN arrives we send another
    request, like a client that reused the connection an instant too late. Then more
    connections send their second request at the measured timeout plus `offsets`.
    A lingering server lets each such request end in a clean EOF (the client retries);
    a plain close() answers it with RST.
    """
    exchange = Exchange()
    start = time.monotonic()
    with target.connect(timeout) as sock:
        sock.sendall(get(target, path))
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, 1)
        if exchange.ending != "OPEN":
            exchange.elapsed = time.monotonic() - start
            return exchange  # no answer: nothing to measure
        answered = time.monotonic()
        reader.deadline = answered + idle_max
        exchange.ending = reader.read_end()
        idle = time.monotonic() - answered
        exchange.extra["idle_timeout"] = round(idle, 3)
        if exchange.ending != "FIN":
            exchange.elapsed = time.monotonic() - start
            return exchange  # TIMEOUT: held longer than idle_max; RST: reset an idle connection
        reader.deadline = time.monotonic() + timeout
        attempts = {"after its FIN": _request_on_closing(sock, reader, target, path)}
    if idle > 0.05:  # a server without keep-alive closes at once: nothing to aim at
        results = [""] * len(offsets)
        threads = [threading.Thread(target=_idle_attempt,
                                    args=(target, path, max(idle + offset, 0.0), timeout,
                                          max_bytes, results, i), daemon=True)
                   for i, offset in enumerate(offsets)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(idle + timeout + 1)
        for offset, result in zip(offsets, results):
            attempts[f"{offset * 1000:+.0f} ms"] = result or "no result"
    exchange.extra["attempts"] = attempts
    exchange.elapsed = time.monotonic() - start
    return exchange


def _poll_end(sock: socket.socket) -> str | None:
    """Non-blocking: 'RST' (reset, or gone), 'EOF' (FIN / TLS close_notify) or None."""
    try:
        data = sock.recv(65536)
        if not data:
            return "RST" if peer_reset(sock) else "EOF"
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass
    except ssl.SSLEOFError:
        return "RST" if peer_reset(sock) else "EOF"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
        return "RST"
    return "RST" if peer_reset(sock) else None


def drain_after_fin(target: Target, path: str, window: float, pause: float, burst: int,
                    timeout: float, max_bytes: int) -> Exchange:
    """After the server's FIN, keep sending bursts of pipelined GETs `pause` apart.

    The first request asks for Connection: close and one more request follows it at
    once, so the server has unread input when it closes. Measures how long the server
    keeps reading (draining) after its FIN, up to `window` seconds, and how it ends:
    RST (it closed while we were still sending) or still draining at the window's
    end, when we close first. Pauses are empty moments: a server that stops when
    nothing is pending (lighttpd's FIONREAD bug) resets at the next burst.

    On TLS a server cannot half-close (there is no FIN before it stops reading): the
    bursts start right after the response and its close_notify + FIN is noted as
    'eof_after', whenever it comes.
    """
    exchange = Exchange()
    start = time.monotonic()
    tls = target.tls is not None
    with target.connect(timeout) as sock:
        sock.sendall(get(target, path, close=True) + get(target, path))
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, 1)
        if exchange.ending == "OPEN" and not tls:
            exchange.ending = reader.read_end()
        elif exchange.ending == "OPEN":
            exchange.ending = "FIN"  # not yet: see eof_after
        if not exchange.ending.startswith("FIN"):
            exchange.elapsed = time.monotonic() - start
            return exchange  # RST at close (no lingering at all) or it never closed
        began = time.monotonic()
        sock.setblocking(False)
        payload = get(target, path) * burst
        bursts, reset_at, eof_at = 0, None, None if tls else began
        next_burst = began
        while reset_at is None and time.monotonic() - began < window:
            now = time.monotonic()
            if now >= next_burst:
                try:
                    sock.send(payload)  # partial is fine: the count of bursts is what matters
                    bursts += 1
                except (BlockingIOError, ssl.SSLWantWriteError):
                    pass  # the server stopped reading and its window is full: still no reset
                except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
                    reset_at = now
                    break
                next_burst += pause
            time.sleep(0.02)
            seen = _poll_end(sock)
            if seen == "EOF" and eof_at is None:
                eof_at = time.monotonic()
            elif seen == "RST":
                reset_at = time.monotonic()
        exchange.ending = "FIN+RST" if reset_at is not None else "FIN"
        exchange.extra.update(
            drained_for=round((reset_at or time.monotonic()) - began, 3),
            bursts_sent=bursts, still_draining=reset_at is None, window=window, pause=pause,
            tls=tls, eof_after=None if eof_at is None else round(eof_at - began, 3))
    exchange.elapsed = time.monotonic() - start
    return exchange
