"""Observations of a running server from outside: socket states and open fds."""

from __future__ import annotations

import os
import subprocess
import time

import psutil

SAMPLE_WSGI = "graceful_close.sample_apps:wsgi_app"
SAMPLE_ASGI = "graceful_close.sample_apps:asgi_app"


def tcp_states(port: int) -> list[str]:
    """States of every TCP socket whose local port is `port`, from `ss -tan` (includes orphans)."""
    out = subprocess.run(["ss", "-tanH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def count_state(port: int, state: str) -> int:
    return sum(1 for s in tcp_states(port) if s == state)


def worker_pids(server_pid: int) -> list[int]:
    """gunicorn's workers (children of the arbiter), or the uvicorn process itself."""
    proc = psutil.Process(server_pid)
    children = proc.children()
    return [c.pid for c in children] or [server_pid]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
