"""Limits under pressure, against our gunicorn ThreadWorker and uvicorn httptools
protocol: the bounded lingering set, fd and socket leaks over 10,000 mixed
connections, and a worker that runs out of file descriptors (EMFILE on accept).

These check robustness of our engines (stock servers have no lingering set to
bound); each test says what stock would do where it differs.
"""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from graceful_close.diagnostics.wire import ConnectionEnded, ResponseReader, request_bytes
from tests import reliability_servers
from tests.helpers import count_state, fd_count, wait_until, worker_pid
from tests.reliability_servers import (
    KINDS,
    LINGER_TIME,
    get_ok,
    linger_env,
    make_server,
    reset_close,
    so_error,
)

CLOSE = {"Connection": "close"}


def _settled_fds(pid: int, settle: float = 1.0) -> int:
    time.sleep(settle)
    return fd_count(pid)


def _answered_and_held(port: int, path: str = "/") -> socket.socket:
    """A client that reads its response and the server's FIN, then never closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request_bytes("GET", path, "x", CLOSE))
    reader = ResponseReader(sock, time.monotonic() + 10)
    assert reader.read_response().complete
    assert reader.read_end() == "FIN"
    return sock


# ---- the lingering set is bounded -----------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_twice_max_lingering_never_closing_clients_evicts_the_oldest(start_server,
                                                                    kind: str) -> None:
    """max_lingering=20 and 40 clients that never close (deadlines far away): the 20
    oldest are evicted (a plain close: a byte they send then is answered with RST), the
    20 newest still linger (a byte they send is read and dropped), the worker keeps
    serving, and every fd comes back when clients close."""
    limit = 20
    server = start_server(make_server(kind, linger_env(max_lingering=limit, linger_timeout=30,
                                                       linger_time=60)))
    pid = worker_pid(server.pid)
    assert get_ok(server.port)
    baseline = _settled_fds(pid)
    clients = [_answered_and_held(server.port) for _ in range(limit)]
    # A client acknowledges the server's FIN with a delayed ACK (tens of ms); until then
    # the FIN is unacknowledged and eviction may not reset. Let the first ones age.
    time.sleep(0.5)
    clients += [_answered_and_held(server.port) for _ in range(limit)]
    assert wait_until(lambda: fd_count(pid) <= baseline + limit, 5), (fd_count(pid), baseline)
    for sock in clients:
        sock.send(b"x")
    time.sleep(0.3)
    errors = [so_error(sock) for sock in clients]
    # RST on a client socket in CLOSE-WAIT shows as EPIPE, elsewhere as ECONNRESET
    evicted = [i for i, err in enumerate(errors) if err in (errno.EPIPE, errno.ECONNRESET)]
    assert evicted == list(range(limit)), f"evicted {evicted}; SO_ERROR per client {errors}"
    assert fd_count(pid) - baseline == limit, (fd_count(pid), baseline)
    assert get_ok(server.port), server.log_text()
    assert worker_pid(server.pid) == pid, server.log_text()
    for sock in clients:
        sock.close()
    assert wait_until(lambda: fd_count(pid) <= baseline, 5), (fd_count(pid), baseline)
    assert wait_until(lambda: count_state(server.port, "CLOSE-WAIT") == 0, 5)


# ---- fd and socket leaks over many mixed connections --------------------------------------

def _mixed_connection(port: int, i: int) -> str | None:
    """One connection of kind i % 8; returns a problem or None."""
    kind = i % 8
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = ResponseReader(sock, time.monotonic() + 10)
        try:
            if kind == 0:    # plain request, Connection: close
                sock.sendall(request_bytes("GET", "/", "x", CLOSE))
                ok = reader.read_response().complete
            elif kind == 1:  # keep-alive: three requests, then the client closes
                for _ in range(3):
                    sock.sendall(request_bytes("GET", "/", "x"))
                    if not reader.read_response().complete:
                        return f"{i}: keep-alive response incomplete"
                ok = True
            elif kind == 2:  # read the response, then reset
                sock.sendall(request_bytes("GET", "/", "x", CLOSE))
                ok = reader.read_response().complete
                reset_close(sock)
            elif kind == 3:  # half-close before reading
                sock.sendall(request_bytes("GET", "/", "x"))
                sock.shutdown(socket.SHUT_WR)
                ok = reader.read_response().complete
            elif kind == 4:  # malformed
                sock.sendall(b"\x00 NOT HTTP\r\n\r\n")
                ok = reader.read_response().status == 400
            elif kind == 5:  # pipelined behind a closing response
                sock.sendall(request_bytes("GET", "/", "x", CLOSE) + request_bytes("GET", "/", "x") * 3)
                ok = reader.read_response().complete
            elif kind == 6:  # connect and go away without a word
                return None
            else:            # half a request, then close
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Partial: ")
                return None
        except (OSError, ConnectionEnded) as exc:
            return f"{i}: kind {kind}: {exc!r}"
    return None if ok else f"{i}: kind {kind}: bad response"


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_ten_thousand_mixed_connections_leak_nothing(start_server, kind: str) -> None:
    """10,000 connections (close, keep-alive, reset, half-close, malformed, pipelined,
    silent, partial) from 4 threads: every answer arrives, then the worker's fd count
    returns to its baseline and no socket of its port is left in CLOSE-WAIT."""
    server = start_server(make_server(kind, linger_env()))
    pid = worker_pid(server.pid)
    assert get_ok(server.port)
    baseline = _settled_fds(pid)
    problems: list[str] = []

    def client(start: int) -> None:
        for i in range(start, 10_000, 4):
            problem = _mixed_connection(server.port, i)
            if problem:
                problems.append(problem)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not problems, problems[:20]
    assert wait_until(lambda: fd_count(pid) <= baseline, LINGER_TIME + 5), (
        f"fd leak: {fd_count(pid)} open, baseline {baseline}")
    assert count_state(server.port, "CLOSE-WAIT") == 0
    assert worker_pid(server.pid) == pid, server.log_text()
    assert get_ok(server.port)


# ---- running out of file descriptors -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_emfile_on_accept_the_worker_survives_and_recovers(start_server, kind: str) -> None:
    """The server runs with RLIMIT_NOFILE=64 and 150 never-closing clients arrive at
    once: lingering sockets hold fds, accept() fails with EMFILE. The worker must not
    die (same pid); once the lingerer releases sockets (idle timeout 1 s) the queued
    clients are answered, and normal requests are served again.

    Stock gunicorn workers re-raise EMFILE from accept() and exit (the arbiter
    replaces them); stock uvicorn pauses accepting for a second."""
    nofile = 64
    server = start_server(make_server(kind, linger_env(linger_timeout=1),
                                      prefix=("prlimit", f"--nofile={nofile}:{nofile}", "--")))
    pid = worker_pid(server.pid)
    assert get_ok(server.port)
    clients = []
    for _ in range(150):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(request_bytes("GET", "/", "x", CLOSE))
        clients.append(sock)
    deadline = time.monotonic() + 60
    answered = 0
    for sock in clients:
        try:
            if ResponseReader(sock, deadline).read_response().complete:
                answered += 1
        except (OSError, ConnectionEnded):
            pass
    log = server.log_text()
    for sock in clients:
        sock.close()
    assert worker_pid(server.pid) == pid, f"the worker died and was replaced\n{log[-3000:]}"
    assert answered == len(clients), f"{answered}/{len(clients)} answered\n{log[-3000:]}"
    assert wait_until(lambda: get_ok(server.port, timeout=5), 20), log[-3000:]


def test_a_class_that_does_not_import_fails_the_suite(monkeypatch) -> None:
    """A broken import of our worker must turn the suite red, never into skips."""
    monkeypatch.setitem(reliability_servers.OURS, "gthread", "graceful_close.gunicorn.NoSuchWorker")
    try:
        make_server("gthread", linger_env())
    except pytest.skip.Exception as skipped:  # what it did before: a green run hiding the break
        pytest.fail(f"a broken import skipped the test: {skipped}")
    except pytest.fail.Exception as failed:
        assert "NoSuchWorker does not import" in str(failed)
    else:
        pytest.fail("a worker class that does not import was accepted")
    make_server("gthread", linger_env(), ours=False)  # the stock half needs none of ours
