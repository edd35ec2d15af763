"""Issue 16: every graceful stop path of every server drains by answering, on the real server.

A pool client (graceful_close.diagnostics.pool: 16 persistent connections, 0-50 ms pauses, no
retries) runs while the stop happens; a request that got no complete response (EOF before any
byte, RST, a partial response, no answer) is lost. Connections refused once a server stopped
listening for good (SIGTERM to a whole server) are not requests lost on a pooled connection:
they are counted apart. Stock halves that lose requests are xfail(strict=False), side by side.

Stop times, stop_delay and the rule itself: test_stop_drain_times.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from benchmarks.churn import BY_NAME, ChurnServer
from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.pool import PoolResult, run_pool
from graceful_close.diagnostics.processes import worker_pids

LOST = ("eof", "reset", "partial", "timeout")


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
    """SIGTERM to the worker holding the most pooled connections: under load one worker can
    accept all 16, and a stop of the other would put nothing under the pool."""
    import psutil

    def held(pid: int) -> int:
        try:
            return sum(1 for c in psutil.Process(pid).net_connections("tcp")
                       if c.status == psutil.CONN_ESTABLISHED)
        except psutil.Error:
            return -1

    os.kill(max(worker_pids(proc.pid), key=held), signal.SIGTERM)


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
    # hypercorn's SIGTERM to the whole server is not here: its parent keeps the listening
    # socket open until its workers have exited, so the pool's new connections, queued in the
    # backlog after the drain answered Connection: close, are reset when the parent closes it
    # (measured: 11-16 resets, one per pooled connection, stock alike). A worker's drain
    # cannot reach the parent's socket.
    ("hypercorn-SIGHUP", "hypercorn", 2, 0, _sig(signal.SIGHUP), True),
    ("hypercorn-max-requests", "hypercorn", 2, 250, _nothing, True),
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


