"""What lingering costs is bounded: clients that never close, or keep trickling,
are released by the deadlines; shutdown waits at most linger_time for them; no
socket is left in CLOSE_WAIT and no fd leaks; a herd of never-closing clients
does not stop the server from serving others.

Stock uvicorn never lingers (it closes at once, with RST when input is unread:
see test_uvicorn_scenarios), so these tests bound ours rather than compare.
Settings: linger_timeout 1 s, linger_time 3 s, --timeout-keep-alive 1 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from graceful_close.diagnostics.scenarios import never_closing, old_client_request, trickling
from graceful_close.diagnostics.wire import ConnectionEnded, ResponseReader, request_bytes
from tests.helpers import (
    ABORT_ON_TIMEOUT,
    SAMPLE_ASGI,
    count_state,
    fd_count,
    tcp_states,
    trickle,
    wait_until,
)
from tests.uvicorn_servers import LINGER_TIME, LINGER_TIMEOUT, Fleet, make_server

SLACK = 5.0  # loose bound on top of a deadline


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    yield fleet
    fleet.stop()


@pytest.mark.parametrize("http, loop", [("httptools", "asyncio"), ("h11", "asyncio"),
                                        ("httptools", "uvloop")])
def test_never_closing_client_is_released_after_the_idle_deadline(fleet, http, loop) -> None:
    # abort_on_timeout=true: the release is seen as the RST the client gets
    result = never_closing(fleet.target("ours", http, loop, env=ABORT_ON_TIMEOUT),
                           hold=LINGER_TIME + SLACK)
    assert result.responses[0].complete and result.ending == "FIN", result.as_dict()
    assert result.released_after is not None, result.as_dict()
    assert result.released_after < LINGER_TIMEOUT + SLACK


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_trickling_client_is_released_by_linger_time(fleet, http) -> None:
    """A byte every 0.3 s resets the idle deadline; linger_time still ends it."""
    result = trickling(fleet.target("ours", http), every=0.3, hold=LINGER_TIME + SLACK)
    assert result.responses[0].complete and result.ending == "FIN", result.as_dict()
    assert result.released_after is not None, result.as_dict()
    assert LINGER_TIMEOUT < result.released_after < LINGER_TIME + SLACK


def _open_never_closing(port: int, count: int) -> list[socket.socket]:
    """Clients that read their whole response and the server's FIN, then sit there. HTTP/1.0:
    the server ends the connection (an explicit Connection: close from the client would be
    closed at once under lingering_close=auto, without lingering)."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(old_client_request("/", "x"))
        reader = ResponseReader(sock, time.monotonic() + 5)
        assert reader.read_response().complete
        assert reader.read_end() == "FIN"
        socks.append(sock)
    return socks


def _half_closed(port: int) -> int:
    return count_state(port, "FIN-WAIT-1") + count_state(port, "FIN-WAIT-2")


def test_herd_of_never_closing_clients_does_not_stop_service(fleet) -> None:
    server = fleet.get("ours", "httptools")
    port = server.port
    baseline_fds = fd_count(server.pid)
    socks = _open_never_closing(port, 200)
    try:
        # The server holds them half-closed (FIN_WAIT_1 until the client acks our FIN).
        assert _half_closed(port) >= 150, tcp_states(port)
        with requests.Session() as session:
            for _ in range(30):
                assert session.get(f"http://127.0.0.1:{port}/", timeout=5).text == "ok\n"
        for _ in range(20):
            assert requests.get(f"http://127.0.0.1:{port}/big?size=100000", timeout=5).ok
        # Released at the idle deadline: a plain close (issue 20), so what stays in FIN_WAIT_2
        # is the kernel's orphan (tcp_fin_timeout), no longer a descriptor of the server.
        assert wait_until(lambda: fd_count(server.pid) <= baseline_fds + 3,
                          timeout=LINGER_TIMEOUT + SLACK), (fd_count(server.pid), baseline_fds)
        assert count_state(port, "CLOSE-WAIT") == 0, tcp_states(port)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("http, sig", [pytest.param("httptools", signal.SIGTERM, id="httptools-SIGTERM"),
                                       pytest.param("h11", signal.SIGINT, id="h11-SIGINT")])
def test_shutdown_with_lingering_connections_is_bounded(start_server, http, sig) -> None:
    """Trickling clients would linger for ever without linger_time: the stop must
    still end within linger_time (+2 s), idle keep-alive clients must see a FIN
    (lingering close), and no socket may stay in CLOSE_WAIT."""
    server = start_server(make_server("ours", http, keep_alive=30))
    port = server.port
    lingering = _open_never_closing(port, 5)
    idle = []
    for _ in range(5):  # idle keep-alive connections: the stop closes them
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(request_bytes("GET", "/", "x"))
        assert ResponseReader(sock, time.monotonic() + 5).read_response().complete
        idle.append(sock)
    stop = threading.Event()
    trickler = threading.Thread(target=trickle, args=(lingering, stop), daemon=True)
    trickler.start()
    try:
        started = time.monotonic()
        server.signal(sig)
        for sock in idle:  # FIN, not RST: their close went through the lingering close
            assert ResponseReader(sock, time.monotonic() + 5).read_end() == "FIN"
        assert server.wait(LINGER_TIME + 2 + SLACK) is not None, server.log_text()
        elapsed = time.monotonic() - started
        assert elapsed < LINGER_TIME + 2, (elapsed, server.log_text())
        assert count_state(port, "CLOSE-WAIT") == 0, tcp_states(port)
    finally:
        stop.set()
        for sock in lingering + idle:
            sock.close()


@pytest.mark.parametrize("kind", [
    pytest.param("stock", marks=pytest.mark.xfail(strict=False, reason="stock resets it")), "ours"])
@pytest.mark.parametrize("http", ["h11", "httptools", "zttp"])
def test_idle_keep_alive_connection_is_closed_through_the_lingering_close(fleet, kind, http) -> None:
    """--timeout-keep-alive ends an idle connection with FIN; ours then drains what the
    client still sends (a request that crossed the timeout), stock resets it."""
    if http == "zttp":
        pytest.importorskip("zttp")
    t = fleet.target(kind, http)
    with t.connect(5) as sock:
        sock.sendall(request_bytes("GET", "/", t.authority))
        reader = ResponseReader(sock, time.monotonic() + 5)
        assert reader.read_response().complete
        try:
            reader.read_response()
        except ConnectionEnded as ended:
            assert ended.kind == "FIN"
        else:
            raise AssertionError("the idle connection was not closed")
        sock.sendall(request_bytes("GET", "/", t.authority))  # too late: discarded, no RST
        time.sleep(0.2)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert error == 0, error


def test_a_bad_setting_fails_startup_with_a_one_line_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "uvicorn", SAMPLE_ASGI, "--port", "0",
         "--http", "graceful_close.uvicorn:HttpToolsProtocol"],
        env={**os.environ, "GRACEFUL_CLOSE_LINGER_TIMEOUT": "-1"},
        capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("graceful-close: invalid GRACEFUL_CLOSE_LINGER_TIMEOUT='-1': "
                                   "expected a number of seconds > 0 and <= 86400"), proc.stderr
