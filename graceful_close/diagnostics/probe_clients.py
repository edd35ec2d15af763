"""Black-box clients of `graceful-close probe`: how a server ends HTTP/1.1 connections.

Built on wire.ResponseReader and scenarios.Target. Every client is bounded: by
request count, by bytes read (CappedReader) and by wall time. They only send
GET requests, except upload() and drain_upload(), which POST a throw-away body.

Every client does only what a conforming client may do (RFC 9112): it never sends
a request after a `Connection: close` of its own, nor after it has read an answer that
ends the connection (`Connection: close`, an HTTP/1.0 answer: section 9.6), and it reads
no answer after such an answer. Requests pipelined before that answer was read are the
only ones that follow it. The server decides to close (an HTTP/1.0 request, an answer
with `Connection: close`, its request cap, its idle timeout), or the client keeps
sending an upload that the server answered before reading it (section 9.3 lets a
client finish sending a body).

A reset that arrives after the server's FIN does not show up in recv() on
Linux (the EOF is returned first), so peer_reset() asks the kernel for the
socket's TCP state: CLOSE after an EOF means the peer answered with RST.
"""

from __future__ import annotations

import fcntl
import select
import socket
import ssl
import sys
import termios
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .scenarios import UPLOAD_CHUNK, Target, collect_responses
from .wire import ConnectionEnded, Response, ResponseReader, request_bytes

TCP_CLOSE_STATE = 7  # Linux tcp_states.h: TCP_CLOSE, where a socket lands after RST
RESET_SETTLE = 0.1   # seconds to let a reset provoked by our last bytes come back
END_WAIT = 2.0       # after an answer that ends the connection: time for the server's FIN
OPEN_WAIT = 2.0      # after an early answer: how long a connection may stay open unexplained
FOLLOW_GAP = 0.05    # in-flight pipelined requests leave this long after the first request
READ_DELAY = 0.3     # a client busy elsewhere reads this late
DRAIN_CHUNK = 65536
IDLE_SLACK = 1.0     # wait this much past an announced Keep-Alive timeout for the close
EARLY_WAIT = 1.0     # before the last chunk of an upload: time for an early answer to show
#                      (curl waits as long for a 100 Continue)


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


def queued_bytes(sock: socket.socket) -> int | None:
    """Bytes waiting unread in our receive queue (encrypted bytes on TLS), where known."""
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"),
                              sys.byteorder)
    except OSError:
        return None


def ending_after_eof(sock: socket.socket, kind: str, settle: float = RESET_SETTLE) -> str:
    """'FIN' becomes 'FIN+RST' when the server reset the connection right after its FIN."""
    if not kind.startswith("FIN"):
        return kind
    time.sleep(settle)
    return kind.replace("FIN", "FIN+RST", 1) if peer_reset(sock) else kind


def get(target: Target, path: str, close: bool = False) -> bytes:
    return request_bytes("GET", path, target.authority, {"Connection": "close"} if close else None)


def get_http10(target: Target, path: str) -> bytes:
    """An HTTP/1.0 GET without keep-alive: the server closes after answering it."""
    return request_bytes("GET", path, target.authority).replace(b" HTTP/1.1\r\n",
                                                                b" HTTP/1.0\r\n", 1)


@dataclass
class Exchange:
    """What one connection saw: responses, how it ended, timings (seconds)."""

    responses: list[Response] = field(default_factory=list)
    ending: str = "?"
    elapsed: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-ready details per client

    @property
    def complete(self) -> int:
        return sum(r.complete for r in self.responses)

    @property
    def partial(self) -> list[Response]:
        return [r for r in self.responses if not r.complete]

    @property
    def first(self) -> Response | None:
        return self.responses[0] if self.responses else None

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        for response in data["responses"]:
            response.pop("body_prefix", None)
        data["complete"] = self.complete
        return data


def _read(reader: CappedReader, exchange: Exchange, limit: int, stop_at_close: bool = False,
          request_http10: bool = False) -> None:
    """Read up to `limit` responses (`stop_at_close`: none after an answer that ends the
    connection); then how the connection ends, or 'OPEN' if it stays up."""
    exchange.ending = collect_responses(reader, exchange.responses, limit, stop_at_close,
                                        request_http10) or "OPEN"


def closing_answer(exchange: Exchange, request_http10: bool = False) -> str | None:
    """What in the last answer read ends the connection ('Connection: close', ...), or None."""
    last = exchange.responses[-1] if exchange.responses else None
    return last.close_signal(request_http10) if last is not None else None


def _end_after_last(reader: CappedReader, wait: float) -> str:
    """Every expected response is in: how does the connection end within `wait` s?

    'OPEN' when it does not: e.g. on TLS a lingering server cannot half-close and
    waits for the client to close first; the client already has every byte.
    """
    reader.deadline = time.monotonic() + wait
    ending = reader.read_end()
    return "OPEN" if ending.startswith("TIMEOUT") else ending  # TIMEOUT+nB: it answered more


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


def _send(sock: socket.socket, data: bytes, exchange: Exchange) -> bool:
    """sendall, noting (not raising) a reset or a server that stopped reading."""
    try:
        sock.sendall(data)
        return True
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        exchange.note = "reset while sending"
    except TimeoutError:
        exchange.note = "the server stopped reading while we sent"
    return False


def pipeline(target: Target, path: str, count: int, timeout: float, max_bytes: int,
             group: int = 20, group_gap: float = 0.01) -> Exchange:
    """`count` pipelined GETs (the last asks for Connection: close), read only after sending.

    They go out in groups `group_gap` apart so that some arrive while the server is
    already answering: a server that stops early (a request cap) then has unread
    requests in its socket, the case where close() turns into RST.
    """
    exchange = Exchange()
    start = time.monotonic()
    requests = [get(target, path)] * (count - 1) + [get(target, path, close=True)]
    with target.connect(timeout) as sock:
        for at in range(0, count, group):
            if not _send(sock, b"".join(requests[at:at + group]), exchange):
                break
            time.sleep(group_gap)
        time.sleep(READ_DELAY)
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, count, stop_at_close=True)
        if exchange.ending == "OPEN":  # every response read, or one that ends the connection
            exchange.ending = _end_after_last(reader, min(timeout, END_WAIT))
        exchange.extra["closing_answer"] = closing_answer(exchange)
        exchange.ending = ending_after_eof(sock, exchange.ending)
    exchange.elapsed = time.monotonic() - start
    return exchange


def _answers_then_end(reader: CappedReader, wait: float) -> tuple[int, str]:
    """After the answer the server should close after: how many more answers come (to the
    requests pipelined behind it) and how the connection ends, within `wait` s.

    Only reads: a conforming client would ignore those answers; the server sending them
    tells that it did not close after its answer. 'OPEN' when it does not end in time.
    """
    reader.deadline = time.monotonic() + wait
    more: list[Response] = []
    ending = collect_responses(reader, more, 1000)
    if ending is None or ending.startswith("TIMEOUT"):
        ending = "OPEN"
    return sum(r.status > 0 for r in more), ending


def close_pipeline(target: Target, path: str, http10: bool, follow_path: str, follow: int,
                   same_write: bool, timeout: float, max_bytes: int) -> Exchange:
    """A request the server answers and then closes, `follow` GETs pipelined behind it.

    The server decides to close: `http10` sends an HTTP/1.0 GET (no keep-alive),
    otherwise `path` is one whose answer carries Connection: close. The pipelined
    GETs go out in the same write as the request (`same_write`: they are pending
    when the server closes) or FOLLOW_GAP later, while the response is still
    arriving (in flight: they may reach the server after it has closed). A server
    that closes with them unread, or that lingers only on input already pending,
    resets the connection and destroys the part of its response still in flight.
    """
    exchange = Exchange()
    start = time.monotonic()
    first = get_http10(target, path) if http10 else get(target, path)
    rest = get(target, follow_path) * follow
    with target.connect(timeout) as sock:
        if same_write:
            _send(sock, first + rest, exchange)
        elif _send(sock, first, exchange):
            time.sleep(FOLLOW_GAP)
            exchange.extra["queued_at_follow"] = queued_bytes(sock)
            _send(sock, rest, exchange)
        time.sleep(READ_DELAY)
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, 1)
        exchange.extra["answered_behind"] = 0
        if exchange.ending == "OPEN":
            exchange.extra["answered_behind"], exchange.ending = _answers_then_end(
                reader, min(timeout, END_WAIT))
        exchange.extra["closing_answer"] = closing_answer(exchange, request_http10=http10)
        exchange.ending = ending_after_eof(sock, exchange.ending)
    exchange.elapsed = time.monotonic() - start
    return exchange


def upload(target: Target, path: str, size: int, timeout: float, max_bytes: int,
           follow_path: str, hold: float) -> Exchange:
    """POST `size` throw-away bytes without reading, then read the answer.

    A server that answers early (401, 413) and closes without draining the rest of
    the body resets the connection under its own answer. After an early answer we wait
    up to `hold` seconds (past the server's idle timeout) for the connection to end.
    Once our whole body is sent, one GET on a connection still open (allowed: the
    request is complete) tells a live connection from a stuck one, unless the answer
    ended the connection (Connection: close): then nothing is sent after it.
    extra: sent, answered_after (B sent when the answer was readable), open_for (s),
    next ('answered 200', 'no answer', ...), closing_answer.
    """
    exchange = Exchange()
    start = time.monotonic()
    with target.connect(timeout) as sock:
        sent, stopped, answered_after = _send_upload_watching(sock, target, path, size)
        exchange.extra["answered_after"] = answered_after
        if stopped == "reset":
            exchange.note = f"reset while sending, after {sent} of {size} B"
        elif stopped == "stalled":
            exchange.note = f"the server stopped reading after {sent} of {size} B"
        exchange.extra["sent"] = sent
        # --timeout for the answer from the end of sending (sending has its own bound)
        reader = CappedReader(sock, time.monotonic() + timeout, max_bytes)
        _read(reader, exchange, 1)
        answered = time.monotonic()
        exchange.extra["closing_answer"] = closing = closing_answer(exchange)
        if exchange.ending == "OPEN":  # answered: does it close, and how?
            early = answered_after is not None or stopped is not None
            exchange.ending = _end_after_last(reader, hold if early else min(hold, END_WAIT))
        exchange.extra["open_for"] = round(time.monotonic() - answered, 3)
        if exchange.ending == "OPEN" and sent == size and exchange.complete and not closing:
            exchange.extra["next"] = _next_request(sock, reader, target, follow_path,
                                                   min(timeout, OPEN_WAIT))
        if exchange.ending.startswith("FIN") and exchange.note.startswith("reset"):
            exchange.ending = "RST"  # a reset while sending makes later reads return EOF
        else:
            exchange.ending = ending_after_eof(sock, exchange.ending)
    exchange.elapsed = time.monotonic() - start
    return exchange


def _send_upload_watching(sock: socket.socket, target: Target, path: str,
                          size: int) -> tuple[int, str | None, int | None]:
    """POST headers and `size` body bytes without reading anything back.

    Returns the bytes sent, how sending stopped early ("reset", "stalled" or None) and
    how many bytes had been sent when an answer was first waiting to be read (None if
    only after the whole upload): an early answer shows up while we still send. Before
    the last chunk we wait up to EARLY_WAIT s for it, as a client waits for 100 Continue:
    an upload that fits in the socket buffers is sent before a server that answers
    early has even read the request head.
    """
    sock.sendall(request_bytes("POST", path, target.authority, content_length=size,
                               headers={"Content-Type": "application/octet-stream"}))
    chunk, sent, answered_after = b"u" * UPLOAD_CHUNK, 0, None
    try:
        while sent < size:
            last = size - sent <= UPLOAD_CHUNK
            if answered_after is None and select.select([sock], [], [],
                                                        EARLY_WAIT if last else 0)[0]:
                answered_after = sent
            sock.sendall(chunk[:size - sent])
            sent += min(UPLOAD_CHUNK, size - sent)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return sent, "reset", answered_after
    except TimeoutError:
        return sent, "stalled", answered_after
    return sent, None, answered_after


def _next_request(sock: socket.socket, reader: CappedReader, target: Target, path: str,
                  wait: float) -> str:
    """One more GET on a connection left open after an early answer: is it still served?"""
    try:
        sock.sendall(get(target, path, close=True))
    except (OSError, ssl.SSLError):
        return "reset"
    reader.deadline = time.monotonic() + wait
    try:
        response = reader.read_response()
    except ConnectionEnded as ended:
        return {"TIMEOUT": "no answer", "FIN": "closed unanswered",
                "RST": "reset"}.get(ended.kind, ended.kind)
    return f"answered {response.status}"


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
            signal = reader.read_response().close_signal()
            if signal:  # a conforming client sends nothing more on this connection
                out[index] = f"not sent (its answer carried {signal})"
                return
            time.sleep(wait)
            out[index] = _request_on_closing(sock, reader, target, path)
    except ConnectionEnded as ended:
        out[index] = f"setup failed ({ended.kind})"
    except OSError as exc:
        out[index] = f"setup failed ({exc.strerror or exc})"


def announced_idle_timeout(response: Response) -> float | None:
    """The `timeout=` of a Keep-Alive response header (Apache sends one), if any."""
    for part in (response.header("keep-alive") or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "timeout":
            try:
                return float(value.strip())
            except ValueError:
                return None
    return None


def idle_close(target: Target, path: str, idle_max: float, timeout: float, max_bytes: int,
               offsets: tuple[float, ...] = (-0.005, 0.0)) -> Exchange:
    """Find the server's keep-alive idle timeout, then send requests right at it.

    First connection: one request, then wait for the server to close: the wait is its
    idle timeout. A `Keep-Alive: timeout=N` answer says how long to wait (if N is above
    `idle_max` nothing is tried: extra['announced'] says so); without one we wait at
    most `idle_max`. The moment its FIN arrives we send another request, like a client
    that reused the connection an instant too late. Then more connections send their
    second request at the measured timeout plus `offsets`. A lingering server lets each
    such request end in a clean EOF (the client retries); a plain close() answers it
    with RST. An answer that ends the connection (Connection: close, HTTP/1.0) means
    the server does not keep connections alive: nothing is sent after it
    (extra['no_keep_alive'] says what ended it).
    """
    exchange = Exchange()
    start = time.monotonic()
    with target.connect(timeout) as sock:
        sock.sendall(get(target, path))
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, 1)
        signal = closing_answer(exchange)
        if signal is not None:
            exchange.extra["no_keep_alive"] = signal
            if exchange.ending == "OPEN":
                exchange.ending = _end_after_last(reader, min(timeout, END_WAIT))
            exchange.ending = ending_after_eof(sock, exchange.ending)
            exchange.elapsed = time.monotonic() - start
            return exchange
        if exchange.ending != "OPEN" or exchange.first is None:
            exchange.elapsed = time.monotonic() - start
            return exchange  # no answer, or closed at once: nothing to measure
        announced = announced_idle_timeout(exchange.first)
        exchange.extra["announced"] = announced
        if announced is not None and announced > idle_max:
            exchange.ending = "ANNOUNCED"
            exchange.elapsed = time.monotonic() - start
            return exchange
        answered = time.monotonic()
        reader.deadline = answered + (idle_max if announced is None else announced + IDLE_SLACK)
        exchange.ending = reader.read_end()
        idle = time.monotonic() - answered
        exchange.extra["idle_timeout"] = round(idle, 3)
        if exchange.ending != "FIN":
            exchange.elapsed = time.monotonic() - start
            return exchange  # TIMEOUT: held longer than we wait; RST: reset an idle connection
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
        for offset, result in zip(offsets, results, strict=True):
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


def drain_upload(target: Target, path: str, size: int, window: float, pause: float,
                 timeout: float, max_bytes: int) -> Exchange:
    """An HTTP/1.0 POST answered early: after the answer, keep sending its body.

    Sends the headers (Content-Length `size`) and a first chunk, and reads the early
    answer; the server closes after it (HTTP/1.0: no keep-alive), at once or once it
    has read the body. Like a client that has not noticed the answer yet, we go on
    sending the body in chunks `pause` apart (never past `size`) for `window` seconds
    after the answer, or after the server's FIN when one comes, and see whether the
    server keeps reading: RST means it closed while we still sent. Pauses are empty
    moments: a server that stops when nothing is pending (lighttpd's FIONREAD bug)
    resets at the next chunk. On TLS a server cannot half-close: its close_notify +
    FIN comes when it stops reading, if at all.

    extra: fin_after and reset_after (s after the answer, or None), drained_for (s of
    reading after the FIN, or after the answer without one), bursts_sent, sent.
    """
    exchange = Exchange()
    start = time.monotonic()
    chunk = max(min(DRAIN_CHUNK, size // (int(window / pause) + 3)), 1)
    head = request_bytes("POST", path, target.authority, content_length=size,
                         headers={"Content-Type": "application/octet-stream"})
    head = head.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    exchange.extra.update(window=window, pause=pause, tls=target.tls is not None)
    with target.connect(timeout) as sock:
        if not _send(sock, head + b"d" * chunk, exchange):
            exchange.ending = "RST" if exchange.note.startswith("reset") else "TIMEOUT"
            return exchange
        sent = chunk
        reader = CappedReader(sock, start + timeout, max_bytes)
        _read(reader, exchange, 1)
        exchange.extra["sent"] = sent
        exchange.extra["answered_early"] = sent < size  # the body was not all sent yet
        if exchange.ending not in ("OPEN", "FIN") or not exchange.complete:
            exchange.ending = ending_after_eof(sock, exchange.ending)
            exchange.elapsed = time.monotonic() - start
            return exchange  # no answer, a cut one, or it reset the connection under it
        answered = time.monotonic()
        deadline = answered + window
        sock.setblocking(False)
        bursts, reset_at = 0, None
        # A body without Content-Length ends with the connection: its FIN is already in.
        eof_at: float | None = answered if exchange.ending == "FIN" else None
        next_burst = answered
        while reset_at is None and time.monotonic() < deadline and sent < size:
            now = time.monotonic()
            if now >= next_burst:
                try:
                    sent += sock.send(b"d" * min(chunk, size - sent))
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
                deadline = min(eof_at + window, answered + window + END_WAIT)
            elif seen == "RST":
                reset_at = time.monotonic()
        ended = reset_at or time.monotonic()
        exchange.ending = ("FIN+RST" if eof_at is not None else "RST") if reset_at is not None \
            else ("FIN" if eof_at is not None else "OPEN")
        exchange.extra.update(
            drained_for=round(ended - (eof_at or answered), 3), bursts_sent=bursts, sent=sent,
            still_draining=reset_at is None, body_done=sent >= size,
            fin_after=None if eof_at is None else round(eof_at - answered, 3),
            reset_after=None if reset_at is None else round(reset_at - answered, 3))
    exchange.elapsed = time.monotonic() - start
    return exchange
