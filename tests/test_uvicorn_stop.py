"""A stop does not wait for idle keep-alive clients (issue 12 item 1), for uvicorn's zttp
protocol (h11, httptools and the UvicornWorker: tests/test_uvicorn_lifecycle.py), and what
still lingers at a stop: only connections with bytes at stake.

An idle connection (its response sent and acknowledged, nothing unread) is closed at once
on SIGTERM, as stock and nginx do; main up to 54101d7 lingered on it for linger_timeout.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest

from graceful_close.diagnostics.wire import ResponseReader, request_bytes
from tests.uvicorn_servers import TEST_APP, make_server


def _keep_alive_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(request_bytes("GET", "/", "x"))
    assert ResponseReader(sock, time.monotonic() + 5).read_response().complete
    return sock


def _exit_time_with_idle_connections(start_server, kind: str, http: str) -> tuple[float, list[str]]:
    env = {"GRACEFUL_CLOSE_LINGER_TIMEOUT": "5", "GRACEFUL_CLOSE_LINGER_TIME": "30"}
    server = start_server(make_server(kind, http, app=TEST_APP, keep_alive=60, env=env))
    socks = [_keep_alive_connection(server.port) for _ in range(3)]
    try:
        time.sleep(0.3)  # every response acknowledged
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        endings = [ResponseReader(sock, time.monotonic() + 10).read_end() for sock in socks]
        assert server.wait(20) is not None
        return time.monotonic() - started, endings
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("http", ["zttp", "httptools", "h11"])
def test_sigterm_closes_idle_keep_alive_connections_at_once(start_server, http) -> None:
    """Three idle pooled connections, then SIGTERM: ours exits no later than stock (issue
    target: stock + 0.5 s; asserted with slack), and each client sees a FIN."""
    if http == "zttp":
        pytest.importorskip("zttp")
    stock, _ = _exit_time_with_idle_connections(start_server, "stock", http)
    ours, endings = _exit_time_with_idle_connections(start_server, "ours", http)
    print(f"{http}: SIGTERM with 3 idle keep-alive connections: stock {stock:.2f} s, ours {ours:.2f} s")
    assert ours <= stock + 2.0, (stock, ours)
    assert endings == ["FIN"] * 3, endings
