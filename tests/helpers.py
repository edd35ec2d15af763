"""Observations of a running server from outside: socket states and open fds."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import psutil

from graceful_close.diagnostics.wire import ConnectionEnded, Response, ResponseReader, request_bytes

SAMPLE_WSGI = "graceful_close.diagnostics.sample_apps:wsgi_app"
SAMPLE_ASGI = "graceful_close.diagnostics.sample_apps:asgi_app"


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


def trickle(socks: list[socket.socket], stop: threading.Event, every: float = 0.3) -> None:
    """Send one byte on every socket each `every` seconds until `stop` (a lingering client)."""
    while not stop.wait(every):
        for sock in socks:
            try:
                sock.send(b"t")
            except OSError:
                pass


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


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
