"""Test helpers: the sample apps, socket-state counts, lingering clients, one-connection exchanges.

Observations of a server process (readiness, worker pids, fds, TCP states, wait_until) live in
graceful_close.diagnostics.processes, shared with the benchmarks; they are re-exported here."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import warnings

import trustme

from graceful_close.diagnostics.processes import (
    fd_count,
    tcp_state_counts,
    tcp_states,
    wait_until,
    worker_pid,
    worker_pids,
)
from graceful_close.diagnostics.wire import ConnectionEnded, Response, ResponseReader, request_bytes

SAMPLE_WSGI = "graceful_close.diagnostics.sample_apps:wsgi_app"
SAMPLE_ASGI = "graceful_close.diagnostics.sample_apps:asgi_app"
__all__ = ["SAMPLE_ASGI", "SAMPLE_WSGI", "StockFixed", "count_state", "exchange_on_one_connection",
           "expect_stock_failure", "fd_count", "tcp_states", "trickle", "trusting", "wait_until",
           "worker_pid", "worker_pids"]


class StockFixed(UserWarning):
    """A stock server passed a check it used to fail: an upstream fix to look at."""


def expect_stock_failure(failed: bool, what: str) -> None:
    """Where one test checks stock and ours together: a stock server that no longer fails
    is reported (a warning in the summary), not turned into a red run."""
    if not failed:
        warnings.warn(StockFixed(f"stock no longer fails: {what}"), stacklevel=2)


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A new client context that trusts the test CA (a new one per user: httpx sets ALPN on
    the context it is given)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def count_state(port: int, state: str) -> int:
    return tcp_state_counts(port)[state]


def trickle(socks: list[socket.socket], stop: threading.Event, every: float = 0.3) -> None:
    """Send one byte on every socket each `every` seconds until `stop` (a lingering client)."""
    while not stop.wait(every):
        for sock in socks:
            try:
                sock.send(b"t")
            except OSError:
                pass


def exchange_on_one_connection(port: int, headers_per_request: list[dict[str, str]],
                               pause: float = 0.0) -> tuple[list[Response], str]:
    """Requests one after another on one connection; the responses and how it ended."""
    responses = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = ResponseReader(sock, time.monotonic() + 10)
        for headers in headers_per_request:
            try:
                sock.sendall(request_bytes("GET", "/", "x", headers))
                responses.append(reader.read_response())
            except (ConnectionEnded, OSError) as ended:
                return responses, getattr(ended, "kind", "RST")
            if responses[-1].header("connection") == "close":
                return responses, reader.read_end()
            time.sleep(pause)
    return responses, "open"
