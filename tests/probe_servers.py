"""Raw-socket HTTP/1.1 servers with exactly one behaviour each, for the probe's tests (issue 19).

    python -m tests.probe_servers BEHAVIOUR --port N [--idle S] [--record DIR] [--http10]

Each server listens on 127.0.0.1 and serves every connection in a thread of its own; the
kernel does the TCP, so a close() with client bytes still unread sends RST exactly as in a
real server (a thread per connection changes nothing on the wire). Every behaviour answers
GET /big (BIG bytes), GET /small and GET / ("ok\n"); what it does beyond that, and how it ends
a connection, is the behaviour under test, described on its function.

--record DIR writes, per connection, the bytes received (<n>.bin) and when (<n>.json: the
time and end offset of each read, and the times the server sent an answer that closes the
connection), so that a test can see what a client sent after such an answer.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BIG = 2_000_000            # >= 1 MB: the probe's close-pipeline can show truncation
SMALL = b"ok\n"
HEAD_LIMIT = 65536         # a head longer than this is not a request: 400, close
READ = 65536


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]

    @property
    def content_length(self) -> int:
        return int(self.headers.get("content-length", "0") or 0)

    @property
    def asks_close(self) -> bool:
        """The client's own end of keep-alive: Connection: close, or HTTP/1.0 without keep-alive."""
        tokens = {t.strip() for t in self.headers.get("connection", "").lower().split(",")}
        return "close" in tokens or (self.version == "HTTP/1.0" and "keep-alive" not in tokens)


def parse_head(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, path, version = (lines[0].split(" ") + ["", "", ""])[:3]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Request(method, path, version, headers)


@dataclass
class Recorder:
    directory: Path | None
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_id(self) -> int:
        with self.lock:
            self.count += 1
            return self.count


class Conn:
    """One accepted connection: buffered reads, answers, and the ways to end it."""

    def __init__(self, sock: socket.socket, recorder: Recorder, idle: float) -> None:
        self.sock, self.recorder, self.idle = sock, recorder, idle
        self.buffer = bytearray()
        self.stream = bytearray()            # every byte received (when recording)
        self.reads: list[tuple[float, int]] = []
        self.closing_answers: list[float] = []
        self.closed = False

    def fill(self, timeout: float) -> bool:
        """Read once into the buffer: False at the client's EOF, at a reset or after `timeout` s."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(READ)
        except (TimeoutError, OSError):
            return False
        if data:
            self.buffer += data
            if self.recorder.directory is not None:
                self.stream += data
                self.reads.append((time.monotonic(), len(self.stream)))
        return bool(data)

    def head(self, timeout: float | None = None) -> Request | None:
        """The next request head; None at EOF, or after `timeout` (the idle timeout) s idle."""
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > HEAD_LIMIT:
                self.answer(400, b"bad request\n", close=True)
                return None
            if not self.fill(self.idle if timeout is None else timeout):
                return None
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer[:] = rest
        return parse_head(head)

    def skip_body(self, request: Request) -> bool:
        """Read and discard the request's body (Content-Length): False if the client went away."""
        left = request.content_length
        while True:
            taken = min(left, len(self.buffer))
            del self.buffer[:taken]
            left -= taken
            if left <= 0:
                return True
            if not self.fill(10.0):
                return False

    def answer(self, status: int, body: bytes, *, close: bool = False, version: str = "HTTP/1.1",
               length: bool = True) -> bool:
        """Send one response; `close` adds Connection: close; `length` False: no Content-Length
        (the body then ends with the connection)."""
        head = [f"{version} {status} {'OK' if status < 400 else 'Error'}", "Server: probe-test",
                "Content-Type: application/octet-stream"]
        if length:
            head.append(f"Content-Length: {len(body)}")
        if close:
            head.append("Connection: close")
        if close or version == "HTTP/1.0" or not length:
            self.closing_answers.append(time.monotonic())
        try:
            self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            return True
        except OSError:
            return False

    def read_until_eof(self, limit: float = 30.0) -> None:
        """Read and discard until the client's EOF (or `limit` s): the client closes first."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and self.fill(max(deadline - time.monotonic(), 0.01)):
            self.buffer.clear()

    def linger(self) -> None:
        """A lingering close: FIN now, then read and discard until the client's EOF."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.read_until_eof(5.0)
        self.close()

    def close(self) -> None:
        """A plain close(): FIN when every byte the client sent was read, RST otherwise."""
        if not self.closed:
            self.closed = True
            self.sock.close()
            self.save()

    def save(self) -> None:
        if self.recorder.directory is None:
            return
        n = self.recorder.next_id()
        (self.recorder.directory / f"{n}.bin").write_bytes(bytes(self.stream))
        (self.recorder.directory / f"{n}.json").write_text(json.dumps(
            {"reads": self.reads, "closing_answers": self.closing_answers}))


def body_for(request: Request) -> bytes:
    if request.path.startswith("/big"):
        return b"0123456789abcdef" * (BIG // 16)
    return SMALL


def keep_alive(conn: Conn, on_request: Callable[[Conn, Request], bool]) -> None:
    """Serve requests until the idle timeout (then a plain close: FIN, nothing is unread), the
    client's EOF, or `on_request` returning False (it has ended the connection)."""
    while (request := conn.head()) is not None:
        if not on_request(conn, request):
            return
    conn.close()


def ordinary(conn: Conn, request: Request) -> bool:
    """A keep-alive GET (or a POST whose body is read first); False when the client asked to close."""
    if not conn.skip_body(request):
        return False
    conn.answer(200, body_for(request), close=request.asks_close)
    if request.asks_close:
        conn.linger()
        return False
    return True


# --- the behaviours -------------------------------------------------------------------------

def no_keepalive(conn: Conn, opts: argparse.Namespace) -> None:
    """Item 1: no keep-alive. Every answer carries Connection: close (--http10: an HTTP/1.0
    status line and no Connection header), then a plain close(): FIN, as nothing is left
    unread; a request sent after that FIN meets RST. --linger: a lingering close instead
    (FIN, then it reads until the client's EOF), so that what a client sends after the
    answer is recorded."""
    request = conn.head()
    if request is None or not conn.skip_body(request):
        conn.close()
        return
    if opts.http10:
        conn.answer(200, body_for(request), version="HTTP/1.0")
    else:
        conn.answer(200, body_for(request), close=True)
    conn.linger() if opts.linger else conn.close()


def early_413_keep_alive(conn: Conn, opts: argparse.Namespace) -> None:
    """Item 2: a POST gets a whole 413 at once (no Connection: close), then the server reads
    the body and keeps the connection alive; it ends an idle connection with FIN at --idle
    seconds (a long idle timeout, like the 75 s of the issue)."""
    def on_request(conn: Conn, request: Request) -> bool:
        if request.method != "POST":
            return ordinary(conn, request)
        conn.answer(413, b"too large\n")
        return conn.skip_body(request)
    keep_alive(conn, on_request)


def whole_body_first(conn: Conn, opts: argparse.Namespace) -> None:
    """Item 3: reads the whole body before it answers (like a server that buffers the request
    before calling the app); a POST then gets 413 with Connection: close and a plain close():
    FIN, since everything was read."""
    def on_request(conn: Conn, request: Request) -> bool:
        if request.method != "POST":
            return ordinary(conn, request)
        if conn.skip_body(request):
            conn.answer(413, b"too large\n", close=True)
        conn.close()
        return False
    keep_alive(conn, on_request)


def early_200_reset(conn: Conn, opts: argparse.Namespace) -> None:
    """Item 4: a POST gets a 200 of 3 B at once, its body unread, then a plain close(): RST as
    soon as the client sends more of the body."""
    def on_request(conn: Conn, request: Request) -> bool:
        if request.method != "POST":
            return ordinary(conn, request)
        conn.answer(200, SMALL)
        conn.close()
        return False
    keep_alive(conn, on_request)


def no_length_reset(conn: Conn, opts: argparse.Namespace) -> None:
    """Item 5: every answer without Content-Length (the body ends with the connection), then a
    plain close(): RST when the client's bytes are still unread (pipelined GETs, the rest of a
    POST body, answered with 413 at once), never a FIN then."""
    request = conn.head()
    if request is None:
        conn.close()
        return
    status = 413 if request.method == "POST" else 200
    conn.answer(status, b"too large\n" if status == 413 else body_for(request), length=False)
    conn.close()


def close_then_wait(conn: Conn, opts: argparse.Namespace) -> None:
    """Item 6: the first answer carries Connection: close; the server then reads (and discards)
    until the client closes, without a FIN of its own, and never answers again."""
    request = conn.head()
    if request is not None and conn.skip_body(request):
        conn.answer(200, body_for(request), close=True)
        conn.read_until_eof()
    conn.close()


def first_of_each_read(conn: Conn, opts: argparse.Namespace) -> None:
    """Item 7: answers only the first request of what one read returned and drops the rest
    without an answer (three GETs in one write: one answer); keep-alive otherwise, so an idle
    connection ends with FIN at --idle s. A request asking to close (HTTP/1.0, Connection:
    close) gets Connection: close and a plain close(): RST when more is pending or arrives."""
    while True:
        while b"\r\n\r\n" not in conn.buffer:
            if len(conn.buffer) > HEAD_LIMIT or not conn.fill(conn.idle):
                conn.close()
                return
        head = bytes(conn.buffer).partition(b"\r\n\r\n")[0]
        conn.buffer.clear()   # the rest of this read: dropped, unanswered
        request = parse_head(head)
        conn.answer(200, body_for(request), close=request.asks_close)
        if request.asks_close:
            conn.close()
            return


def close_but_answers_more(conn: Conn, opts: argparse.Namespace) -> None:
    """Item 8: a GET with close=1 in its query is answered with Connection: close, but the
    server goes on reading and answers the requests pipelined behind it; an idle connection
    ends with FIN at --idle s."""
    def on_request(conn: Conn, request: Request) -> bool:
        if not conn.skip_body(request):
            return False
        conn.answer(200, body_for(request), close="close=1" in request.path)
        return True
    keep_alive(conn, on_request)


def close_413_waits(conn: Conn, opts: argparse.Namespace) -> None:
    """Item 9: a POST gets a whole 413 with Connection: close at once; the server then reads
    the rest (and anything else) until the client closes. Keep-alive GETs otherwise."""
    def on_request(conn: Conn, request: Request) -> bool:
        if request.method != "POST":
            return ordinary(conn, request)
        conn.answer(413, b"too large\n", close=True)
        conn.read_until_eof()
        conn.close()
        return False
    keep_alive(conn, on_request)


BEHAVIOURS: dict[str, Callable[[Conn, argparse.Namespace], None]] = {
    "no-keepalive": no_keepalive,
    "early-413-keep-alive": early_413_keep_alive,
    "whole-body-first": whole_body_first,
    "early-200-reset": early_200_reset,
    "no-length-reset": no_length_reset,
    "close-then-wait": close_then_wait,
    "first-of-each-read": first_of_each_read,
    "close-but-answers-more": close_but_answers_more,
    "close-413-waits": close_413_waits,
}


class BehaviourServer:
    """One behaviour server as a subprocess on 127.0.0.1 and an ephemeral port."""

    def __init__(self, behaviour: str, *options: str, record: Path | None = None) -> None:
        self.argv = [sys.executable, "-m", "tests.probe_servers", behaviour, *options]
        if record is not None:
            self.argv += ["--record", str(record)]
        self.record = record
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> BehaviourServer:
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, cwd=root)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.record is not None:
                time.sleep(0.3)  # the connections the client just closed are saved
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("behaviour", choices=sorted(BEHAVIOURS))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--idle", type=float, default=1.0, help="keep-alive idle timeout (s)")
    parser.add_argument("--record", type=Path)
    parser.add_argument("--http10", action="store_true")
    parser.add_argument("--linger", action="store_true")
    opts = parser.parse_args(argv)
    recorder = Recorder(opts.record)
    handler = BEHAVIOURS[opts.behaviour]
    listener = socket.create_server(("127.0.0.1", opts.port))
    print(listener.getsockname()[1], flush=True)

    def serve(sock: socket.socket) -> None:
        conn = Conn(sock, recorder, opts.idle)
        try:
            handler(conn, opts)
        finally:
            conn.close()

    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
