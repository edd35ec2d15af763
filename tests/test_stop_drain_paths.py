"""Issue 16: every graceful stop path of every server drains by answering, on the real server.

A pool client (graceful_close.diagnostics.pool: 16 persistent connections, 0-50 ms pauses, no
retries) runs while the stop happens; a request that got no complete response (EOF before any
byte, RST, a partial response, no answer) is lost. Connections refused once a server stopped
listening for good (SIGTERM to a whole server) are not requests lost on a pooled connection:
they are counted apart. Stock halves that lose requests are xfail(strict=False), side by side.

Also: the drain's sans-io rule (core.stopping) and settings, the stop with long-idle clients
(quick, as stock), the stop under an active pool (about the drain window), stop_delay and the
drain counters in the exit summary.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest

from benchmarks.churn import BY_NAME, ChurnServer, stop_time_active, stop_time_idle
from graceful_close.core.stopping import StopDrain, drain_window
from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.pool import PoolResult, run_pool
from graceful_close.diagnostics.processes import wait_until, worker_pids
from graceful_close.settings import Settings, SettingsError

LOST = ("eof", "reset", "partial", "timeout")


# ---- the rule (sans-io) ------------------------------------------------------------------------

def test_drain_keeps_recently_used_connections_until_the_window_ends() -> None:
    drain = StopDrain(1.0, now=100.0)
    assert drain.keeps_open(last_used=99.5, now=100.0)        # used 0.5 s ago: stays open
    assert not drain.keeps_open(last_used=98.0, now=100.0)    # idle 2 s: closes at once
    assert not drain.keeps_open(last_used=100.0, now=101.0)   # the window is over
    assert not drain.over(100.9) and drain.over(101.0)
    drain.quicken(100.2)                                      # a quick stop during the drain
    assert drain.over(100.2) and not drain.keeps_open(100.1, 100.2)
    assert not StopDrain(0.0, now=5.0).keeps_open(5.0, 5.0)    # window 0: stock's stop


def test_drain_window_is_bounded_by_the_servers_graceful_timeout() -> None:
    settings = Settings(drain_window=2.0)
    assert drain_window(settings, None) == 2.0
    assert drain_window(settings, 30.0) == 2.0
    assert drain_window(settings, 1.5) == 1.0                 # half a second kept for the closes
    assert drain_window(settings, 0.2) == 0.0


def test_drain_settings_from_the_environment() -> None:
    settings = Settings.from_env({"GRACEFUL_CLOSE_DRAIN_WINDOW": "1.5",
                                  "GRACEFUL_CLOSE_STOP_DELAY": "3"})
    assert (settings.drain_window, settings.stop_delay) == (1.5, 3.0)
    assert (Settings().drain_window, Settings().stop_delay) == (1.0, 0.0)
    with pytest.raises(SettingsError, match="GRACEFUL_CLOSE_STOP_DELAY='-1'"):
        Settings.from_env({"GRACEFUL_CLOSE_STOP_DELAY": "-1"})
    with pytest.raises(SettingsError, match="drain_window"):
        Settings(drain_window=float("nan"))


# ---- each stop path under a pool ------------------------------------------------------------------

def _pool_across(proc: ServerProcess, action: Callable[[ServerProcess], None],
                 seconds: float = 3.5) -> PoolResult:
    box: list[PoolResult] = []
    thread = threading.Thread(target=lambda: box.append(run_pool("127.0.0.1", proc.port, seconds)),
                              daemon=True)
    thread.start()
    time.sleep(1.0)
    action(proc)
    thread.join()
    return box[0]


def _sig(sig: int) -> Callable[[ServerProcess], None]:
    return lambda proc: proc.signal(sig)


def _sigterm_one_worker(proc: ServerProcess) -> None:
    os.kill(worker_pids(proc.pid)[0], signal.SIGTERM)


def _nothing(proc: ServerProcess) -> None:
    """The stop comes from the server itself (--max-requests, --limit-max-requests)."""


# (id, server, workers, max_requests, action, stock loses)
PATHS = [
    ("uvicorn-SIGTERM", "h11", 1, 0, _sig(signal.SIGTERM), True),
    ("uvicorn-limit-max-requests", "httptools", 1, 400, _nothing, True),
    ("uvicorn-workers-limit-max-requests", "h11", 2, 250, _nothing, True),
    ("uvicorn-supervisor-SIGHUP", "httptools", 2, 0, _sig(signal.SIGHUP), True),
    ("UvicornWorker-stop", "uvicorn-worker", 2, 0, _sigterm_one_worker, True),
    ("UvicornWorker-SIGHUP", "uvicorn-worker", 2, 0, _sig(signal.SIGHUP), True),
    ("UvicornWorker-max-requests", "uvicorn-worker", 2, 250, _nothing, True),
    ("gunicorn-SIGTERM-UvicornWorker", "uvicorn-worker", 2, 0, _sig(signal.SIGTERM), True),
    ("asgi-max-requests", "asgi", 2, 250, _nothing, True),
    ("asgi-SIGHUP", "asgi", 2, 0, _sig(signal.SIGHUP), True),
    ("asgi-SIGTERM", "asgi", 1, 0, _sig(signal.SIGTERM), True),
    ("gthread-SIGHUP", "gthread", 2, 0, _sig(signal.SIGHUP), False),
    ("gthread-max-requests", "gthread", 2, 250, _nothing, False),
    ("gevent-SIGHUP", "gevent", 2, 0, _sig(signal.SIGHUP), False),
]


def _path_cases() -> list[object]:
    cases: list[object] = []
    for case_id, name, workers, max_requests, action, stock_loses in PATHS:
        for variant in ("stock", "ours"):
            marks = [pytest.mark.xfail(strict=False, reason="stock closes idle pooled connections "
                                       "under the pool")] if variant == "stock" and stock_loses else []
            cases.append(pytest.param(name, workers, max_requests, action, variant,
                                      id=f"{case_id}-{variant}", marks=marks))
    return cases


@pytest.mark.parametrize(("name", "workers", "max_requests", "action", "variant"), _path_cases())
def test_stop_path_loses_no_pooled_request(name: str, workers: int, max_requests: int,
                                           action: Callable[[ServerProcess], None],
                                           variant: str) -> None:
    server: ChurnServer = BY_NAME[name]
    with server.make(variant, workers=workers, max_requests=max_requests, jitter=0) as proc:
        result = _pool_across(proc, action)
    lost = sum(result.failures[kind] for kind in LOST)
    print(f"{name} {variant}: {result.row()}; {result.closes_announced} answered with "
          f"Connection: close")
    assert result.completed > 100, result.as_dict()
    assert result.closes_announced > 0, result.as_dict()  # a stop did happen under the pool
    assert lost == 0, result.as_dict()


# ---- stop times --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["h11", "uvicorn-worker", "asgi", "gthread"])
def test_stop_with_long_idle_clients_stays_quick(name: str) -> None:
    """3 keep-alive clients idle for longer than the drain window: they close at once, as
    stock closes them (stock gasgi even waits for them until graceful_timeout). The benchmark
    item `stops` compares the times; here only a 10x-loose bound."""
    stock = stop_time_idle(BY_NAME[name], "stock")
    ours = stop_time_idle(BY_NAME[name], "ours")
    print(f"{name}: stop with 3 long-idle clients: stock {stock:.2f}s, ours {ours:.2f}s")
    assert ours <= 10 * (stock + 0.5), (stock, ours)


@pytest.mark.parametrize("name", ["h11", "asgi"])
def test_stop_under_an_active_pool_ends_with_the_window(name: str) -> None:
    took, result = stop_time_active(BY_NAME[name], "ours")
    print(f"{name}: stop under an active pool {took:.2f}s; {result.row()}")
    assert took <= 10 * (Settings().drain_window + 0.5), took
    assert sum(result.failures[kind] for kind in LOST) == 0, result.as_dict()


# ---- stop_delay ----------------------------------------------------------------------------------

def _answer(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"ok\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.lower()


@pytest.mark.parametrize("name", ["h11", "uvicorn-worker", "asgi", "gthread", "gevent"])
@pytest.mark.parametrize("variant", [
    pytest.param("stock", marks=pytest.mark.xfail(strict=True, reason="stock has no stop_delay: "
                                                   "it stops at once on SIGTERM")),
    "ours"])
def test_stop_delay_keeps_serving_normally_after_sigterm(name: str, variant: str) -> None:
    env = {"GRACEFUL_CLOSE_STOP_DELAY": "1.5"}
    proc = BY_NAME[name].make(variant, workers=1, max_requests=0, env=env).start()
    try:
        proc.signal(signal.SIGTERM)
        time.sleep(0.6)
        answer = _answer(proc.port)  # a new connection, well after the SIGTERM
        assert answer.startswith(b"http/1.1 200"), answer
        assert b"connection: close" not in answer, answer  # served normally, not drained yet
        started = time.monotonic()
        assert proc.wait(15) is not None
        assert time.monotonic() - started < 10
    finally:
        proc.stop()


# ---- counters ----------------------------------------------------------------------------------

def test_exit_summary_counts_the_drain() -> None:
    with BY_NAME["h11"].make("ours", workers=1, max_requests=0) as proc:
        _pool_across(proc, _sig(signal.SIGTERM), seconds=2.0)
        assert wait_until(lambda: proc.proc is not None and proc.proc.poll() is not None, 10)
        time.sleep(0.2)
        log = proc.log_text()
    assert "drain_answered_close=" in log, log[-2000:]
