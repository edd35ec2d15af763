"""Prometheus metrics of the lingering close (needs `pip install 'graceful-close[diagnostics]'`).

Two ways to count:

* one process (uvicorn without --workers): GracefulCloseCollector() reads this
  process's counters directly; register it with prometheus_client's REGISTRY and
  expose it however the app already exposes metrics;
* many worker processes (gunicorn): every worker writes <pid>.json snapshots to
  $GRACEFUL_CLOSE_METRICS_DIR (graceful_close.metrics); the collector in the
  master sums them. In gunicorn.conf.py:

      from graceful_close.metrics.prometheus import when_ready, child_exit  # noqa: F401

  when_ready (master, before workers fork) creates the directory if the variable
  is unset, clears stale snapshots, registers the collector and serves /metrics on
  $GRACEFUL_CLOSE_METRICS_ADDR:$GRACEFUL_CLOSE_METRICS_PORT (127.0.0.1:9464).
  child_exit folds a dead worker's last snapshot into retired.json at once, so
  counters never go down when workers are replaced (max_requests, crashes, HUP).

* many processes without such hooks (uvicorn --workers N): set the variable for
  the server and run `graceful-close metrics --dir DIR --port 9464` beside it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.counters import PROCESS_COUNTERS
from ..core.linger import EndReason
from . import METRICS_DIR_ENV

if sys.platform != "win32":  # flock is POSIX; elsewhere the thread lock alone serialises
    import fcntl

PORT_ENV = "GRACEFUL_CLOSE_METRICS_PORT"
ADDR_ENV = "GRACEFUL_CLOSE_METRICS_ADDR"
DEFAULT_PORT = 9464
DEFAULT_ADDR = "127.0.0.1"
RETIRED_FILE = "retired.json"   # summed totals of workers that exited
LOCK_FILE = ".lock"

# Counter fields of core.counters.Counters -> (metric name without _total, help).
PLAIN_COUNTERS = {
    "lingering_started": ("graceful_close_lingering_started",
                          "Connections handed to the lingering close (half-closed, draining)."),
    "aborted_with_rst": ("graceful_close_aborted_with_rst",
                         "Lingering closes ended by a deliberate RST after a deadline, sent only "
                         "when the client had acknowledged every response byte."),
    "bytes_discarded": ("graceful_close_bytes_discarded",
                        "Bytes read and thrown away while lingering."),
    "keepalive_cap_hits": ("graceful_close_keepalive_cap_hits",
                           "Connections closed after keepalive_requests requests."),
    "keepalive_age_hits": ("graceful_close_keepalive_age_hits",
                           "Connections closed because they were older than keepalive_time."),
    "user_agent_disables": ("graceful_close_user_agent_disables",
                            "Responses without keep-alive because of the User-Agent rules."),
    "drain_answered_close": ("graceful_close_drain_answered_close",
                             "Requests answered with Connection: close on a connection kept open "
                             "for a stopping server's drain window."),
    "drain_idle_closed": ("graceful_close_drain_idle_closed",
                          "Idle keep-alive connections closed at once at a stop (unused for "
                          "longer than the drain window)."),
    "drain_window_closed": ("graceful_close_drain_window_closed",
                            "Idle keep-alive connections still open when a stop's drain window "
                            "ended, closed then."),
}
ENDED_FIELDS = {reason.value: "ended_" + reason.value for reason in EndReason}
COUNTER_FIELDS = tuple(PLAIN_COUNTERS) + tuple(ENDED_FIELDS.values())

log = logging.getLogger("graceful_close")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, int]) -> None:
    tmp = path.with_suffix(".tmp-retired")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise merges between scrapes and child_exit (threads and processes)."""
    with _THREAD_LOCK:
        if sys.platform == "win32":
            yield
            return
        with open(directory / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


_THREAD_LOCK = threading.Lock()


def retire_worker(directory: str | Path, pid: int) -> bool:
    """Fold worker `pid`'s last snapshot into retired.json and remove it; False if none."""
    directory = Path(directory)
    path = directory / f"{pid}.json"
    with _dir_lock(directory):
        snapshot = _read_json(path)
        if not path.exists():
            return False
        retired = _read_json(directory / RETIRED_FILE)
        for name in COUNTER_FIELDS:
            retired[name] = retired.get(name, 0) + snapshot.get(name, 0)
        retired["workers_retired"] = retired.get("workers_retired", 0) + 1
        # Crash between these two lines: that worker counted twice; never counted zero times.
        _write_json(directory / RETIRED_FILE, retired)
        path.unlink(missing_ok=True)
    return True


def sum_snapshots(directory: str | Path) -> tuple[dict[str, int], int, int]:
    """(counter totals over live and exited workers, lingering now, live workers)."""
    directory = Path(directory)
    for path in directory.glob("*.json"):
        if path.stem.isdigit() and not _alive(int(path.stem)):
            retire_worker(directory, int(path.stem))
    with _dir_lock(directory):
        totals = {name: 0 for name in COUNTER_FIELDS}
        retired = _read_json(directory / RETIRED_FILE)
        for name in COUNTER_FIELDS:
            totals[name] += retired.get(name, 0)
        lingering_now = live = 0
        for path in directory.glob("*.json"):
            if not path.stem.isdigit():
                continue
            snapshot = _read_json(path)
            live += 1
            lingering_now += snapshot.get("lingering_now", 0)
            for name in COUNTER_FIELDS:
                totals[name] += snapshot.get(name, 0)
    return totals, lingering_now, live


class GracefulCloseCollector:
    """prometheus_client collector: this process's counters, or the sum over a directory."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)  # workers may not have started yet

    def _values(self) -> tuple[dict[str, int], int, int]:
        if self.directory is None:
            snapshot = PROCESS_COUNTERS.snapshot()
            return ({name: snapshot[name] for name in COUNTER_FIELDS},
                    snapshot["lingering_now"], 1)
        return sum_snapshots(self.directory)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals, lingering_now, workers = self._values()
        for field, (name, help_text) in PLAIN_COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=totals[field])
        ended = CounterMetricFamily("graceful_close_lingering_ended",
                                    "Lingering closes that ended, by reason (eof is the clean end).",
                                    labels=["reason"])
        for reason, field in ENDED_FIELDS.items():
            ended.add_metric([reason], totals[field])
        yield ended
        yield GaugeMetricFamily("graceful_close_lingering",
                                "Connections lingering right now (live workers).",
                                value=lingering_now)
        yield GaugeMetricFamily("graceful_close_workers_reporting",
                                "Worker processes whose snapshots are summed (1 without a "
                                "directory).", value=workers)


def register(directory: str | Path | None = None, registry: Any = None) -> GracefulCloseCollector:
    """Register a collector with `registry` (prometheus_client's default REGISTRY)."""
    if registry is None:
        from prometheus_client import REGISTRY as registry
    collector = GracefulCloseCollector(directory)
    registry.register(collector)
    return collector


def serve(port: int, addr: str = DEFAULT_ADDR, registry: Any = None) -> Any:
    """Serve `registry` on http://addr:port/metrics from a daemon thread; returns the server."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import REGISTRY, make_wsgi_app

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = make_server(addr, port, make_wsgi_app(registry or REGISTRY), Server,
                        handler_class=QuietHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True,
                     name="graceful-close-prometheus").start()
    return httpd


def clear_snapshots(directory: Path) -> None:
    """Start of a master: snapshots of an earlier run would be summed with ours."""
    for path in directory.iterdir():
        if path.suffix == ".json" or path.name.startswith(f"{RETIRED_FILE[:-5]}."):
            path.unlink(missing_ok=True)


def when_ready(server: Any) -> None:
    """gunicorn hook (master): metrics directory, collector, /metrics endpoint."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if not directory:
        directory = tempfile.mkdtemp(prefix="graceful-close-metrics-")
        os.environ[METRICS_DIR_ENV] = directory  # the workers forked after this inherit it
        master = os.getpid()

        def remove_directory() -> None:
            if os.getpid() == master:  # forked workers inherit atexit handlers: master only
                shutil.rmtree(directory, True)

        atexit.register(remove_directory)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    clear_snapshots(path)
    try:
        port = int(os.environ.get(PORT_ENV, DEFAULT_PORT))
    except ValueError:
        raise SystemExit(f"graceful-close: invalid {PORT_ENV}={os.environ[PORT_ENV]!r}: "
                         "expected a port number") from None
    addr = os.environ.get(ADDR_ENV, DEFAULT_ADDR)
    register(path)
    httpd = serve(port, addr)
    # Workers are forked from this master: they must not keep the listening socket.
    os.register_at_fork(after_in_child=httpd.socket.close)
    server.log.info("graceful-close metrics on http://%s:%d/metrics (snapshots in %s)",
                    addr, httpd.server_port, directory)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (master): a worker exited; keep its totals."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory:
        retire_worker(directory, worker.pid)
