"""Stop and reload signals while a response is in flight and clients linger.

For each signal the server handles: the response in flight completes (except
gunicorn's SIGQUIT, which is gunicorn's quick stop by design), the worker exits
within its bound (gunicorn: --graceful-timeout, even though the lingering
deadlines are a minute away; uvicorn alone: linger_time), and the lingering
clients are released. Run against our gunicorn ThreadWorker, our UvicornWorker
and our uvicorn httptools protocol.
"""

from __future__ import annotations

import errno
import signal
import socket
import threading
import time

import psutil
import pytest

from graceful_close.diagnostics.wire import ConnectionEnded, ResponseReader, request_bytes
from tests.helpers import worker_pid
from tests.reliability_servers import get_ok, linger_env, make_server, so_error

GRACEFUL_TIMEOUT = 4
UVICORN_LINGER_TIME = 3.0
BIG = 16_000_000
SLACK = 5.0

CASES = [
    ("gthread", signal.SIGTERM), ("gthread", signal.SIGHUP), ("gthread", signal.SIGQUIT),
    ("uvicorn-worker", signal.SIGTERM), ("uvicorn-worker", signal.SIGHUP),
    ("uvicorn-worker", signal.SIGQUIT),
    # uvicorn alone handles only SIGTERM and SIGINT (SIGQUIT and SIGHUP end it by their
    # default action); those two are covered through UvicornWorker.
    ("httptools", signal.SIGTERM), ("httptools", signal.SIGINT),
]


class SlowDownload(threading.Thread):
    """GET /big with Connection: close, read slowly: the response is in flight for seconds."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.started_reading = threading.Event()
        self.outcome: tuple[int, bool, str] | str = "not finished"

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                sock.sendall(request_bytes("GET", f"/big?size={BIG}", "x", {"Connection": "close"}))
                reader = _SlowReader(sock, time.monotonic() + 30, self.started_reading)
                response = reader.read_response()
                self.outcome = (response.received_length, response.complete, reader.read_end())
        except (OSError, ConnectionEnded) as exc:
            self.outcome = f"{exc.__class__.__name__}: {exc}"


class _SlowReader(ResponseReader):
    def __init__(self, sock: socket.socket, deadline: float, flag: threading.Event) -> None:
        super().__init__(sock, deadline)
        self.flag = flag

    def _fill(self) -> None:
        self.flag.set()
        time.sleep(0.004)  # about 16 MB/s at most with 64 KiB reads: ~1-3 s in flight
        super()._fill()


def _lingering_clients(port: int, count: int = 5) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(request_bytes("GET", "/", "x", {"Connection": "close"}))
        reader = ResponseReader(sock, time.monotonic() + 10)
        assert reader.read_response().complete and reader.read_end() == "FIN"
        clients.append(sock)
    time.sleep(0.3)  # their delayed ACKs of our FIN go out
    return clients


def _released(sock: socket.socket) -> int:
    """The errno showing the server no longer holds this connection, else 0. It may have
    reset it already; or it closed it quietly (nothing was at stake), and then a byte we
    send now is answered with RST, where a server still lingering would read and drop it."""
    error = so_error(sock)
    if error:
        return error
    try:
        sock.send(b"x")
    except OSError as exc:
        return exc.errno or -1
    deadline = time.monotonic() + 2.0
    while not error and time.monotonic() < deadline:
        time.sleep(0.05)
        error = so_error(sock)  # reading SO_ERROR clears it: keep the first one seen
    return error


@pytest.mark.slow
@pytest.mark.parametrize("kind, sig", CASES, ids=[f"{k}-{s.name}" for k, s in CASES])
def test_signal_with_in_flight_and_lingering_connections(start_server, kind: str,
                                                         sig: signal.Signals) -> None:
    gunicorn = kind != "httptools"
    if gunicorn:
        env = linger_env(linger_timeout=30, linger_time=60)
        args = ["--graceful-timeout", str(GRACEFUL_TIMEOUT)]
        bound = GRACEFUL_TIMEOUT + SLACK
    else:
        env = linger_env(linger_timeout=30, linger_time=UVICORN_LINGER_TIME)
        args = []
        bound = UVICORN_LINGER_TIME + SLACK
    server = start_server(make_server(kind, env, args))
    old_worker = worker_pid(server.pid)
    lingering = _lingering_clients(server.port)
    download = SlowDownload(server.port)
    download.start()
    assert download.started_reading.wait(10)
    time.sleep(0.3)

    signalled = time.monotonic()
    server.signal(sig)
    if sig == signal.SIGHUP:  # gunicorn reloads: new worker, old one stops gracefully
        try:
            psutil.Process(old_worker).wait(bound)
        except psutil.TimeoutExpired:
            pytest.fail(f"old worker still running {bound} s after SIGHUP\n{server.log_text()}")
        except psutil.NoSuchProcess:
            pass
    else:
        assert server.wait(bound) is not None, (
            f"server still running {bound} s after {sig.name}\n{server.log_text()}")
    exited_after = time.monotonic() - signalled
    download.join(30)

    quick_stop = gunicorn and kind == "gthread" and sig == signal.SIGQUIT
    if not quick_stop:
        assert download.outcome == (BIG, True, "FIN"), (download.outcome, server.log_text())
    assert exited_after < bound
    assert "was sent SIGKILL" not in server.log_text(), (
        f"the worker ignored {sig.name} until gunicorn killed it\n{server.log_text()}")
    errors = [_released(sock) for sock in lingering]
    for sock in lingering:
        sock.close()
    assert all(e in (errno.EPIPE, errno.ECONNRESET) for e in errors), (
        f"lingering clients not released: errors {errors}")
    if sig == signal.SIGHUP:
        assert get_ok(server.port), server.log_text()
        assert worker_pid(server.pid) != old_worker
