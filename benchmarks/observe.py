"""Observations of a server process from outside: worker pid, RSS, fds, TCP states."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from collections import Counter

import psutil


def worker_pid(server_pid: int) -> int:
    """gunicorn's one worker (the arbiter's child), or the uvicorn process itself."""
    children = psutil.Process(server_pid).children()
    return children[0].pid if children else server_pid


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def cpu_and_switches(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system, all threads) and context switches of a process so far."""
    proc = psutil.Process(pid)
    times, switches = proc.cpu_times(), proc.num_ctx_switches()
    return times.user + times.system, switches.voluntary + switches.involuntary


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_state_counts(port: int, side: str = "server") -> Counter[str]:
    """Counts of TCP states on `port`: the server's sockets (sport) or its clients' (dport).

    ss also lists orphans (sockets no process owns any more, e.g. FIN-WAIT-2 after close)."""
    direction = "sport" if side == "server" else "dport"
    out = subprocess.run(["ss", "-tanH", f"{direction} = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return Counter(line.split()[0] for line in out.splitlines() if line.strip())


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system


def _own_seconds(pids: list[int]) -> float:
    """CPU of this process, of its children it has waited for (wrk), and of `pids`."""
    me = psutil.Process().cpu_times()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.user + me.system + kids.ru_utime + kids.ru_stime
    for pid in pids:
        try:
            total += sum(cpu_and_switches(p)[0] for p in [pid] + [c.pid for c in
                                                          psutil.Process(pid).children()])
        except psutil.NoSuchProcess:
            pass
    return total


class ForeignLoad:
    """Cores that other processes on the machine used during a `with` block.

    The benchmark shares 2 cores with whatever else runs; a run during which others
    took a real share of the CPU measures them, not the server."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cores = 0.0

    def __enter__(self) -> ForeignLoad:
        self._start = (time.monotonic(), _busy_seconds(), _own_seconds(self.pids))
        return self

    def __exit__(self, *exc: object) -> None:
        t0, busy0, own0 = self._start
        elapsed = max(1e-6, time.monotonic() - t0)
        others = (_busy_seconds() - busy0) - (_own_seconds(self.pids) - own0)
        self.cores = max(0.0, others / elapsed)
