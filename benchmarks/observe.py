"""Observations of a server process from outside: RSS, CPU, the machine's other load.

Worker pid, fds and TCP states come from graceful_close.diagnostics.processes (shared with the tests)."""

from __future__ import annotations

import resource
import time

import psutil


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def cpu_and_switches(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system, all threads) and context switches of a process so far."""
    proc = psutil.Process(pid)
    times, switches = proc.cpu_times(), proc.num_ctx_switches()
    return times.user + times.system, switches.voluntary + switches.involuntary


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
