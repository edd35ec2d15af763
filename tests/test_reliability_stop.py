"""Issue 20 part 1: one stop rule in every engine, against the real servers, stock and ours
side by side (the scenarios and the timing are benchmarks.reliability's; here only loose
bounds).

A client uploads, gets its early 413, and then trickles a byte every 200 ms, or goes quiet;
0.75 s later the server is told to stop. Before the rule, gunicorn sync and gthread lingered
through a graceful stop for up to linger_time (29 s against stock's 1.5 s) or linger_timeout
(4.5 s for the quiet client). Now every engine closes what has nothing at stake at once and
gives the rest stop_linger (2 s) from its half-close, never past the graceful timeout.
"""

from __future__ import annotations

import pytest

from benchmarks.reliability import stop_seconds

ALL = ("sync", "gthread", "gevent", "asgi", "uvicorn-worker", "h11", "httptools", "zttp")
SLACK = 2.0  # the issue asks for stock + 0.5 s (benchmarks.reliability); room for a loaded machine
BOUND = 10.0  # far below the 29 s of the old rule


def _compare(key: str, case: str) -> tuple[float, float]:
    stock = stop_seconds(key, "stock", "asyncio", case)
    ours = stop_seconds(key, "graceful", "asyncio", case)
    print(f"{key} {case}: stock {stock:.2f} s, ours {ours:.2f} s")
    return stock, ours


@pytest.mark.parametrize("key", ALL)
def test_trickling_client_at_a_graceful_stop(key: str) -> None:
    """SIGTERM while a client trickles after its 413: no slower than stock on any server."""
    if key == "zttp":
        pytest.importorskip("zttp")
    stock, ours = _compare(key, "trickle")
    assert ours <= stock + SLACK and ours < BOUND, (stock, ours)


@pytest.mark.parametrize("key", ("sync", "gthread", "gevent", "asgi", "httptools"))
def test_quiet_client_after_its_413_at_a_graceful_stop(key: str) -> None:
    """The client drained its upload and went quiet: nothing is at stake, the stop does
    not wait for it (it used to wait linger_timeout on sync and gthread)."""
    stock, ours = _compare(key, "quiet")
    assert ours <= stock + SLACK and ours < BOUND, (stock, ours)


@pytest.mark.parametrize("key", ("sync", "gthread", "uvicorn-worker", "httptools"))
def test_trickling_client_at_a_quick_stop(key: str) -> None:
    """SIGQUIT (gunicorn) or SIGINT (uvicorn): as fast as stock, the trickler included."""
    stock, ours = _compare(key, "quick")
    assert ours <= stock + SLACK and ours < 5, (stock, ours)
