"""Test helpers: the sample apps, socket-state counts, lingering clients, one-connection exchanges.

Observations of a server process (readiness, worker pids, fds, TCP states, wait_until) live in
graceful_close.diagnostics.processes, shared with the benchmarks; they are re-exported here."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable

import pytest
import trustme

from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.processes import (
    fd_count,
    tcp_state_counts,
    tcp_states,
    wait_until,
    worker_pid,
    worker_pids,
)
from graceful_close.diagnostics.scenarios import (
    ScenarioResult,
    Target,
    early_response_upload,
    pipelined_after_close,
)
from graceful_close.diagnostics.wire import ConnectionEnded, Response, ResponseReader, request_bytes

SAMPLE_WSGI = "graceful_close.diagnostics.sample_apps:wsgi_app"
SAMPLE_ASGI = "graceful_close.diagnostics.sample_apps:asgi_app"
SHORT_LINGER = {"GRACEFUL_CLOSE_LINGER_TIMEOUT": "0.5", "GRACEFUL_CLOSE_LINGER_TIME": "2"}
NGINX_LINGER = {"GRACEFUL_CLOSE_LINGER_TIMEOUT": "5", "GRACEFUL_CLOSE_LINGER_TIME": "30"}  # the defaults
# The opt-in RST on a deadline (issue 20 made FIN the default): tests that see a silent
# client's release as the RST it gets run with it.
ABORT_ON_TIMEOUT = {"GRACEFUL_CLOSE_ABORT_ON_TIMEOUT": "true"}
__all__ = ["ABORT_ON_TIMEOUT", "NGINX_LINGER", "SAMPLE_ASGI", "SAMPLE_WSGI", "SHORT_LINGER",
           "SIGTERM_CLIENTS", "StockFixed",
           "assert_close_pipelined_intact", "assert_early_413s_intact", "assert_one_line_refusal",
           "assert_sigterm_no_slower_than_stock", "count_state", "exchange_on_one_connection",
           "expect_stock_failure", "fd_count", "finished_close_clients", "idle_keepalive_clients",
           "exit_summary_after",
           "resets_mid_upload", "seconds_to_exit", "seconds_to_exit_while_trickling",
           "seconds_to_sigterm_with", "tcp_states", "trickle", "trusting", "wait_until",
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


def idle_keepalive_clients(port: int, count: int, timeout: float = 5.0) -> list[socket.socket]:
    """Clients that make one request, read the response and then stay idle without closing
    (a requests Session or a proxy's pool between requests)."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.sendall(request_bytes("GET", "/", "x"))
        ResponseReader(sock, time.monotonic() + timeout).read_response()
        socks.append(sock)
    return socks


def finished_close_clients(port: int, count: int) -> list[socket.socket]:
    """Clients that read a whole Connection: close response and the server's FIN, then keep
    their socket open."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(request_bytes("GET", "/", "x", {"Connection": "close"}))
        reader = ResponseReader(sock, time.monotonic() + 5)
        reader.read_response()
        assert reader.read_end() == "FIN"
        socks.append(sock)
    return socks


def exit_summary_after(server: ServerProcess, requests: list[bytes]) -> dict[str, int]:
    """Each request on a connection of its own: the whole response and the server's FIN read,
    then the client closes. Then SIGTERM, and the counters of the exit summary (the readiness
    probe's connection included)."""
    for request in requests:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(request)
            reader = ResponseReader(sock, time.monotonic() + 5)
            assert reader.read_response() is not None
            assert reader.read_end() == "FIN"
    time.sleep(0.2)  # the last client's EOF has reached a lingering close
    server.signal(signal.SIGTERM)
    assert server.wait(20) is not None
    log = server.log_text()
    lines = re.findall(r"graceful-close: ((?:lingering_started=|no lingering close)[^\n]*)", log)
    assert lines, log[-3000:]  # the exit summary
    line = lines[-1]
    return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", line)}


def resets_mid_upload(port: int, count: int) -> None:
    """Clients that send the start of a 1 MB upload and reset (SO_LINGER 0) while it is unread."""
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(request_bytes("POST", "/upload", "x", content_length=1 << 20) + b"u" * 65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


def seconds_to_exit(server: ServerProcess, sig: int, timeout: float = 40.0) -> float:
    """Send `sig` to the server's master; seconds until it exited."""
    start = time.monotonic()
    server.signal(sig)
    assert server.wait(timeout) is not None, server.log_text()[-2000:]
    return time.monotonic() - start


def seconds_to_sigterm_with(server: ServerProcess,
                            clients: Callable[[int], list[socket.socket]]) -> float:
    """Seconds from SIGTERM to exit for a started `server` while `clients(port)` hold their
    connections (closed afterwards)."""
    socks = clients(server.port)
    seconds = seconds_to_exit(server, signal.SIGTERM)
    for sock in socks:
        sock.close()
    return seconds


def seconds_to_exit_while_trickling(server: ServerProcess, sig: int) -> float:
    """A client reads a Connection: close response and the FIN, then trickles a byte every
    0.2 s so the connection lingers; seconds from `sig` to exit."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(request_bytes("GET", "/", "x", {"Connection": "close"}))
    reader = ResponseReader(sock, time.monotonic() + 5)
    reader.read_response()
    assert reader.read_end() == "FIN"
    stop = threading.Event()
    trickler = threading.Thread(target=trickle, args=([sock], stop, 0.2), daemon=True)
    trickler.start()
    time.sleep(0.5)
    elapsed = seconds_to_exit(server, sig, timeout=20)
    stop.set()
    trickler.join(5)
    sock.close()
    return elapsed


def assert_sigterm_no_slower_than_stock(start_server: Callable[[ServerProcess], ServerProcess],
                                        servers: dict[str, ServerProcess],
                                        clients: Callable[[int], list[socket.socket]],
                                        label: str) -> None:
    """Issue 12: SIGTERM to exit for servers["ours"] within 2 s of servers["stock"] (started
    one after another) while `clients(port)` hold their connections."""
    times = {name: seconds_to_sigterm_with(start_server(server), clients)
             for name, server in servers.items()}
    print(f"{label}: {times}")
    assert times["ours"] <= times["stock"] + 2.0, times


# (clients(port), what they are) for assert_sigterm_no_slower_than_stock, as test params.
# Three clients keep their socket open after reading a whole Connection: close response and
# our FIN (nothing is at stake, so the stop must not wait for them; stock has closed them
# already), or idle after one keep-alive request each (issue 12 item 1).
SIGTERM_CLIENTS = [
    pytest.param(lambda port: finished_close_clients(port, 3),
                 "3 clients holding finished connections", id="holding-finished"),
    pytest.param(lambda port: idle_keepalive_clients(port, 3),
                 "3 idle keep-alive clients", id="idle-keepalive"),
]


def assert_one_line_refusal(script: str, what: str) -> None:
    """`script` runs gunicorn patched so it no longer routes closes to our worker: the worker
    refuses to start with one line naming gunicorn 27 and `what`, and no traceback."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "graceful-close" in line]
    assert done.returncode != 0
    assert len(ours) == 1 and "gunicorn 27" in ours[0] and what in ours[0], ours
    assert "Traceback" not in done.stderr


def assert_close_pipelined_intact(target: Target, size: int) -> list[ScenarioResult]:
    """Three times: a `size` Connection: close response with GETs pipelined behind it arrives
    intact and ends with FIN."""
    results = [pipelined_after_close(target, f"/big?close=1&size={size}", timeout=20)
               for _ in range(3)]
    summary = [(r.body_bytes, r.ending) for r in results]
    assert all(r.intact and r.ending == "FIN" for r in results), summary
    return results


def assert_early_413s_intact(target: Target) -> None:
    """Three times: a 1 MB 413 answered before the app reads an 8 MB upload (read by the
    client after sending it all) arrives whole, then FIN."""
    results = [early_response_upload(target, "/upload?size=1000000", 8 << 20, timeout=20)
               for _ in range(3)]
    summary = [(r.body_bytes, r.ending, r.note) for r in results]
    assert all(r.intact and r.ending == "FIN" and not r.note for r in results), summary
    assert all(r.responses[0].status == 413 and r.body_bytes == 1_000_000 for r in results)


# Issue 16: the servers whose stock stop closes idle pooled connections under a pool (the churn
# tests' stock halves that lose requests), and the stock/ours cases of every churn server.
CHURN_STOCK_LOSES = frozenset({"asgi", "uvicorn-worker", "httptools", "h11", "zttp", "hypercorn"})


def churn_cases(names: Iterable[str], why_stock_loses: str) -> list[object]:
    """pytest params (name, variant) for every churn server, stock then ours; a stock half in
    CHURN_STOCK_LOSES is xfail(strict=False) with `why_stock_loses` (an upstream fix shows as
    XPASS)."""
    import pytest

    cases: list[object] = []
    for name in names:
        for variant in ("stock", "ours"):
            marks = []
            if variant == "stock" and name in CHURN_STOCK_LOSES:
                marks.append(pytest.mark.xfail(strict=False, reason=f"stock {name}: {why_stock_loses}"))
            cases.append(pytest.param(name, variant, id=f"{name}-{variant}", marks=marks))
    return cases
