"""A server process seen from outside: is it answering, which pid is its worker, how many
fds it holds, which TCP states its port has. Shared by the launcher, the tests and the
benchmarks, so each question is answered one way.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Callable

_PROBE_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; its last verdict."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def answers_http(port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None,
                 timeout: float = 2.0) -> bool:
    """One `GET /` on a new connection gets an HTTP/1.x status line back (over TLS with `tls`)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
            with sock:
                sock.sendall(_PROBE_REQUEST)
                return sock.recv(12).startswith(b"HTTP/1.")
    except OSError:  # ssl.SSLError is an OSError too
        return False


def wait_answering(port: int, timeout: float, tls: ssl.SSLContext | None = None) -> bool:
    """The readiness probe: gunicorn logs its port before a worker has booted, so a
    server counts as ready only once it answers a request."""
    return wait_until(lambda: answers_http(port, tls=tls), timeout)


def worker_pids(server_pid: int) -> list[int]:
    """gunicorn's workers (children of the arbiter), hypercorn's (spawned by its parent), or
    the uvicorn or waitress process itself. multiprocessing's resource tracker, which
    hypercorn's parent starts too, is not a worker."""
    import psutil  # diagnostics extra; imported here so launching a server needs none

    workers = []
    for child in psutil.Process(server_pid).children():
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue
        except psutil.Error:
            continue
        workers.append(child.pid)
    return workers or [server_pid]


def worker_pid(server_pid: int) -> int:
    """The one worker of a server started with one worker (or the uvicorn process)."""
    return worker_pids(server_pid)[0]


def fd_count(pid: int) -> int:
    """Open file descriptors of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_states(port: int, side: str = "server") -> list[str]:
    """States of the TCP sockets on `port` from `ss -tan`: the server's (sport) or its
    clients' (dport). ss also lists orphans, sockets no process holds any more."""
    direction = "sport" if side == "server" else "dport"
    out = subprocess.run(["ss", "-tanH", f"{direction} = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def tcp_state_counts(port: int, side: str = "server") -> Counter[str]:
    return Counter(tcp_states(port, side))
