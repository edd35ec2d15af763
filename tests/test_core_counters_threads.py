"""Issue 12 item 12: counters stay exact when gthread's pool threads count at once.

KeepAlivePolicy.decide runs on every pool thread; `counter += 1` on an attribute is a
read, an add and a write, and a thread switch in between loses an update. Only the rare
paths count (a cap hit, a connection that ends), and they take one lock; the keep-alive
hot path counts nothing.
"""

from __future__ import annotations

import sys
import threading

from graceful_close.core import Counters, EndReason, KeepAlivePolicy
from graceful_close.settings import Settings

THREADS = 8
CALLS = 20_000


def _hammer(work) -> None:
    start = threading.Barrier(THREADS)

    def run() -> None:
        start.wait()
        for _ in range(CALLS):
            work()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show at once
    try:
        threads = [threading.Thread(target=run) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)


def test_policy_counters_are_exact_under_threads() -> None:
    counters = Counters()
    cap = KeepAlivePolicy(Settings(keepalive_requests=1), counters)
    age = KeepAlivePolicy(Settings(keepalive_requests=0, keepalive_time=1), counters)

    def work() -> None:
        assert not cap.decide(1, 0.0, 0.0).keep_alive  # every call hits the request cap
        assert not age.decide(1, 0.0, 5.0).keep_alive  # and the age cap

    _hammer(work)
    assert counters.keepalive_cap_hits == THREADS * CALLS
    assert counters.keepalive_age_hits == THREADS * CALLS


def test_engine_counters_are_exact_under_threads() -> None:
    counters = Counters()

    def work() -> None:
        counters.started()
        counters.record_end(EndReason.EOF, 3, aborted=False)

    _hammer(work)
    assert counters.lingering_started == counters.ended_eof == THREADS * CALLS
    assert counters.bytes_discarded == 3 * THREADS * CALLS
    assert counters.lingering_now == 0
