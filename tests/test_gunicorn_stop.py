"""Issue 12 items 1 and 2 for gunicorn sync and gthread: a stop or a --max-requests restart
is never slower than the stock worker's, stock measured in the same test.

Lingering protects bytes in flight. An idle connection whose response was acknowledged
and whose client sent nothing more has none, so a stopping worker closes it at once (as
nginx does), and lingers only where unread input or unacknowledged output is at stake.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import GUNICORN_WORKERS, ServerProcess, gunicorn_server
from graceful_close.diagnostics.wire import ResponseReader, request_bytes
from tests.helpers import idle_keepalive_clients, seconds_to_exit

REPO = Path(__file__).resolve().parent.parent
APP = "tests.apps_gunicorn:app"
KINDS = ("sync", "gthread")
SLACK = 2.0  # issue 12 asks for stock + 0.5 s; asserted with room for a loaded machine


def _server(kind: str, ours: bool, *args: str) -> ServerProcess:
    threads = ["--threads", "4"] if kind == "gthread" else []
    # Default settings (linger_timeout 5 s): what a stop used to wait for.
    return gunicorn_server(APP, GUNICORN_WORKERS[kind][1 if ours else 0],
                           args=["--pythonpath", str(REPO), *threads, *args])


def _sigterm_with_idle_clients(start_server, kind: str, ours: bool) -> float:
    server = start_server(_server(kind, ours))
    clients = idle_keepalive_clients(server.port, 3, timeout=15)
    time.sleep(0.3)  # every response acknowledged
    seconds = seconds_to_exit(server, signal.SIGTERM)
    for sock in clients:
        sock.close()
    return seconds


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_with_idle_keepalive_clients_is_not_slower_than_stock(start_server, kind: str) -> None:
    """Item 1: 3 idle connections, then SIGTERM. Stock gthread keeps idle connections 2 s
    (for a request racing the stop), stock sync has closed them already; we used to add a
    lingering close of linger_timeout (5 s) on top."""
    stock = _sigterm_with_idle_clients(start_server, kind, ours=False)
    ours = _sigterm_with_idle_clients(start_server, kind, ours=True)
    print(f"{kind}: SIGTERM to exit with 3 idle clients: stock {stock:.2f} s, ours {ours:.2f} s")
    assert ours <= stock + SLACK, (stock, ours)


def _restart_gap(start_server, kind: str, ours: bool) -> float:
    """--max-requests 4 with 3 idle clients: seconds from the 4th response until a new
    connection is answered again (one worker: the arbiter replaces it after it exits)."""
    server = start_server(_server(kind, ours, "--max-requests", "4"))
    time.sleep(0.5)  # the launcher's readiness request is counted
    clients = idle_keepalive_clients(server.port, 2, timeout=15)
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as last:
        last.sendall(request_bytes("GET", "/", "x", {"Connection": "close"}))
        ResponseReader(last, time.monotonic() + 15).read_response()
    restarted_at = time.monotonic()
    while True:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as probe:
                probe.sendall(request_bytes("GET", "/", "x", {"Connection": "close"}))
                ResponseReader(probe, time.monotonic() + 15).read_response()
            break
        except OSError:
            time.sleep(0.05)
        assert time.monotonic() - restarted_at < 30
    gap = time.monotonic() - restarted_at
    for sock in clients:
        sock.close()
    return gap


@pytest.mark.parametrize("kind", KINDS)
def test_max_requests_restart_is_not_slower_than_stock(start_server, kind: str) -> None:
    """Item 1, the same wait at a --max-requests restart: nothing accepts while the old
    worker waits, so every idle client used to cost linger_timeout of service."""
    stock = _restart_gap(start_server, kind, ours=False)
    ours = _restart_gap(start_server, kind, ours=True)
    print(f"{kind}: service gap at --max-requests with idle clients: stock {stock:.2f} s, "
          f"ours {ours:.2f} s")
    assert ours <= stock + SLACK, (stock, ours)


def test_stop_still_lingers_where_bytes_are_at_stake(start_server) -> None:
    """The other half of item 1: an early 413 to an upload still in flight at SIGTERM
    lingers (within graceful_timeout), so the response arrives whole and ends with FIN."""
    from graceful_close.diagnostics.scenarios import Target, early_response_upload

    server = start_server(_server("gthread", True, "--graceful-timeout", "20"))
    result: dict[str, object] = {}
    upload = threading.Thread(target=lambda: result.update(r=early_response_upload(
        Target("127.0.0.1", server.port), "/upload?size=1000000", 8 << 20, timeout=20)))
    upload.start()
    time.sleep(0.3)  # the 413 is out, the upload goes on
    server.signal(signal.SIGTERM)
    upload.join(30)
    got = result["r"]
    assert got.intact and got.ending == "FIN", got.as_dict()  # type: ignore[attr-defined]
    assert server.wait(30) is not None


def _quick_stop_seconds(start_server, kind: str, ours: bool, sig: int) -> float:
    """A keep-alive connection whose next request never completes (a byte a second).
    graceful_timeout 8: when the worker does not exit, the arbiter kills it then."""
    server = start_server(_server(kind, ours, "--graceful-timeout", "8"))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    sock.sendall(request_bytes("GET", "/", "x"))
    ResponseReader(sock, time.monotonic() + 15).read_response()
    stop = threading.Event()

    def trickle() -> None:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
            if stop.wait(1.0):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    time.sleep(1.5)
    seconds = seconds_to_exit(server, sig)
    stop.set()
    thread.join(5)
    sock.close()
    return seconds


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
@pytest.mark.parametrize("kind", KINDS)
def test_quick_stop_ends_every_connection_at_once(start_server, kind: str, sig: int) -> None:
    """Item 2: SIGINT and SIGQUIT end every connection at once. Stock gthread does not:
    the pool thread reading the endless request holds the exit until the arbiter's
    SIGKILL (graceful_timeout); ours shuts every connection down first."""
    stock = _quick_stop_seconds(start_server, kind, False, sig)
    ours = _quick_stop_seconds(start_server, kind, True, sig)
    print(f"{kind} {signal.Signals(sig).name}: stock {stock:.2f} s, ours {ours:.2f} s")
    assert ours <= stock + SLACK and ours < 5, (stock, ours)
