"""uvicorn under gunicorn: graceful_close.gunicorn.UvicornWorker (our protocols) against
the uvicorn-worker package's UvicornWorker (stock protocols), in the same run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import GUNICORN_WORKERS, ServerProcess, gunicorn_server
from graceful_close.diagnostics.scenarios import Target, early_response_upload, pipelined_after_close
from graceful_close.diagnostics.wire import ResponseReader, request_bytes
from tests.helpers import SAMPLE_ASGI, count_state, tcp_states, trickle, wait_until, worker_pids
from tests.uvicorn_servers import LINGER_TIME, SHORT

STOCK, OURS = GUNICORN_WORKERS["uvicorn-worker"]
OURS_H11 = "graceful_close.uvicorn_worker.UvicornH11Worker"
WORKERS = [pytest.param(STOCK, id="stock"), pytest.param(OURS, id="ours"),
           pytest.param(OURS_H11, id="ours-h11")]


def _server(worker: str, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    return gunicorn_server(SAMPLE_ASGI, worker, args=["--keep-alive", "1", *args],
                           env={**SHORT, **(env or {})})


@pytest.fixture(scope="module")
def servers():
    started: dict[str, ServerProcess] = {}

    def get(worker: str) -> Target:
        if worker not in started:
            started[worker] = _server(worker).start()
        return Target("127.0.0.1", started[worker].port)

    yield get
    for server in started.values():
        # SIGTERM: on SIGINT gunicorn sends SIGQUIT, which stock uvicorn-worker ignores until
        # gunicorn's SIGKILL (graceful_timeout later); see test_sigquit_stops_our_worker.
        server.signal(signal.SIGTERM)
        server.wait(10)
        server.stop()


@pytest.mark.parametrize("worker", WORKERS)
def test_pipelined_requests_behind_a_connection_close_response(servers, worker) -> None:
    result = pipelined_after_close(servers(worker), "/big?close=1&size=2000000")
    if worker == STOCK:
        assert not (result.intact and result.ending == "FIN"), result.as_dict()
    else:
        assert result.intact and result.ending == "FIN", result.as_dict()
        assert result.body_bytes == 2_000_000


@pytest.mark.parametrize("worker", WORKERS[:2])
def test_early_413_is_whole_and_the_connection_ends(servers, worker) -> None:
    """Stock never re-arms the keep-alive timer after discarding the unread body."""
    result = early_response_upload(servers(worker), "/upload?size=1000000", timeout=5.0)
    assert result.responses and result.responses[0].complete, result.as_dict()
    assert result.ending == ("TIMEOUT" if worker == STOCK else "FIN"), result.as_dict()


def test_sigterm_with_lingering_connections_stays_within_the_bounds(start_server) -> None:
    """Trickling clients linger until linger_time; the worker stops within linger_time
    (+2 s), well inside --graceful-timeout, and its counters reach the metrics dir."""
    metrics = tempfile.mkdtemp(prefix="gc-uvicorn-worker-")
    server = start_server(_server(OURS, "--graceful-timeout", "10",
                                  env={"GRACEFUL_CLOSE_METRICS_DIR": metrics}))
    worker_pid = worker_pids(server.pid)[0]
    socks = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(request_bytes("GET", "/", "x").replace(b" HTTP/1.1", b" HTTP/1.0", 1))
        reader = ResponseReader(sock, time.monotonic() + 5)
        assert reader.read_response().complete and reader.read_end() == "FIN"
        socks.append(sock)
    stop = threading.Event()

    threading.Thread(target=trickle, args=(socks, stop), daemon=True).start()
    try:
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(LINGER_TIME + 10) is not None, server.log_text()
        assert time.monotonic() - started < LINGER_TIME + 2, server.log_text()
        assert count_state(server.port, "CLOSE-WAIT") == 0, tcp_states(server.port)
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    snapshot = Path(metrics) / f"{worker_pid}.json"
    assert wait_until(snapshot.exists, timeout=2), list(Path(metrics).iterdir())
    counts = json.loads(snapshot.read_text())
    assert counts["lingering_started"] >= 5, counts
    assert counts["ended_total_timeout"] + counts["ended_shutdown"] >= 5, counts


@pytest.mark.parametrize("worker", WORKERS[:2])
def test_sigquit_stops_our_worker(start_server, worker) -> None:
    """gunicorn's quick stop (SIGINT to the arbiter sends SIGQUIT to workers): stock
    uvicorn-worker only clears a flag nobody reads and runs on until SIGKILL."""
    server = start_server(_server(worker, "--graceful-timeout", "3"))
    started = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.wait(10) is not None
    elapsed = time.monotonic() - started
    if worker == STOCK:
        assert elapsed > 2.5, server.log_text()
        assert "SIGKILL" in server.log_text()
    else:
        assert elapsed < LINGER_TIME + 2, server.log_text()
        assert "SIGKILL" not in server.log_text()


def test_a_bad_setting_stops_gunicorn_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-b", "127.0.0.1:0", "-k", OURS, SAMPLE_ASGI],
        env={**os.environ, "GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "-5"},
        capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert ("graceful-close: invalid GRACEFUL_CLOSE_KEEPALIVE_REQUESTS='-5': expected an integer "
            ">= 0 (0 = no cap)"
            in proc.stderr.splitlines()), proc.stderr
    assert "Traceback" not in proc.stderr and "Booting worker" not in proc.stderr
