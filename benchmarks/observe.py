"""Observations of a server process from outside: worker pid, RSS, fds, TCP states."""

from __future__ import annotations

import os
import subprocess
from collections import Counter

import psutil


def worker_pid(server_pid: int) -> int:
    """gunicorn's one worker (the arbiter's child), or the uvicorn process itself."""
    children = psutil.Process(server_pid).children()
    return children[0].pid if children else server_pid


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_state_counts(port: int, side: str = "server") -> Counter[str]:
    """Counts of TCP states on `port`: the server's sockets (sport) or its clients' (dport).

    ss also lists orphans (sockets no process owns any more, e.g. FIN-WAIT-2 after close)."""
    direction = "sport" if side == "server" else "dport"
    out = subprocess.run(["ss", "-tanH", f"{direction} = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return Counter(line.split()[0] for line in out.splitlines() if line.strip())
