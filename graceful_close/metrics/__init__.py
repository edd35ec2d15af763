"""Counters leave the worker process here: a log summary at exit and, for
multi-process servers, a JSON snapshot per worker that a collector can sum.

Set GRACEFUL_CLOSE_METRICS_DIR to a directory and every worker writes
<dir>/<pid>.json about once a second and once more at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from pathlib import Path

from ..core.counters import PROCESS_COUNTERS, Counters

METRICS_DIR_ENV = "GRACEFUL_CLOSE_METRICS_DIR"
SNAPSHOT_INTERVAL = 1.0
SERVER_LOGGERS = ("gunicorn.error", "uvicorn.error", "hypercorn.error", "waitress")

log = logging.getLogger("graceful_close")
_started_in_pid: int | None = None
_stop_writer = threading.Event()
_flushed = False


def write_snapshot(directory: Path, counters: Counters = PROCESS_COUNTERS) -> None:
    """Atomically replace this process's snapshot file."""
    path = directory / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(counters.snapshot()))
    os.replace(tmp, path)


def _write_forever(directory: Path, stop: threading.Event) -> None:
    while not stop.wait(SNAPSHOT_INTERVAL):
        try:
            write_snapshot(directory)
        except OSError:
            log.debug("graceful-close: cannot write metrics snapshot", exc_info=True)


def maybe_start_for_worker() -> None:
    """Called by every worker of ours at start: snapshots if configured, summary at exit."""
    global _started_in_pid
    if _started_in_pid == os.getpid():
        return
    _started_in_pid = os.getpid()
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        threading.Thread(target=_write_forever, args=(path, _stop_writer), daemon=True,
                         name="graceful-close-metrics").start()
    atexit.register(flush_at_worker_exit)  # a fallback: gunicorn workers leave with os._exit


def flush_at_worker_exit() -> None:
    """Last snapshot and the one-line summary; workers call it when their loop ends."""
    global _flushed
    if _flushed:
        return
    _flushed = True
    _stop_writer.set()
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory:
        try:
            write_snapshot(Path(directory))
        except OSError:
            pass
    _summary_logger().info(PROCESS_COUNTERS.summary())


def _summary_logger() -> logging.Logger:
    """Our logger when the application set up logging for it; otherwise the server's own
    error log, so the exit summary shows up where operators already look."""
    if log.hasHandlers() and log.isEnabledFor(logging.INFO):
        return log
    for name in SERVER_LOGGERS:
        server_log = logging.getLogger(name)
        if server_log.hasHandlers() and server_log.isEnabledFor(logging.INFO):
            return server_log
    return log
