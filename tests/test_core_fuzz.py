"""Hypothesis fuzz of the sans-io core: no order of events breaks its invariants.

A small model engine drives many LingerStates with one Counters object through
random interleavings of data, EOF, error, timer, eviction and shutdown events
on a clock that never goes backwards, the way both real engines do. Checked
after every step:
  - the next deadline never lies beyond started + linger_time, and the total
    deadline never moves;
  - no ending comes before its deadline (no premature close), and on_timer at
    .deadline always ends the connection (so an engine that waits for .deadline
    ends every connection);
  - an ended state stays ended: every later event returns None and changes nothing;
  - counters add up: lingering_started == sum of ended_* + lingering_now, and
    lingering_now equals the connections the model still holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from graceful_close.core import Counters, Ending, EndReason, LingerState
from graceful_close.settings import Settings

MAY_ABORT = {EndReason.IDLE_TIMEOUT, EndReason.TOTAL_TIMEOUT, EndReason.BYTE_CAP,
             EndReason.EVICTED, EndReason.SHUTDOWN}

settings_strategy = st.builds(
    Settings,
    linger_time=st.floats(0.001, 100.0, allow_nan=False),
    linger_timeout=st.floats(0.001, 100.0, allow_nan=False),
    linger_max_bytes=st.one_of(st.none(), st.integers(1, 1 << 20)),
    abort_on_timeout=st.booleans(),
)

# (kind, connection index, clock advance, bytes)
event_strategy = st.tuples(
    st.sampled_from(["open", "data", "eof", "error", "timer", "evict", "shutdown", "at_deadline"]),
    st.integers(0, 7),
    st.one_of(st.just(0.0), st.floats(0.0, 50.0, allow_nan=False)),
    st.integers(0, 1 << 18),
)


@dataclass
class Conn:
    state: LingerState
    ended: Ending | None = None


def _check_ending(conn: Conn, ending: Ending, now: float, cfg: Settings) -> None:
    state = conn.state
    assert state.ending is ending
    assert ending.abort_if_acked == (cfg.abort_on_timeout and ending.reason in MAY_ABORT)
    if ending.reason is EndReason.TOTAL_TIMEOUT:
        assert now >= state.started + cfg.linger_time
    if ending.reason is EndReason.IDLE_TIMEOUT:
        assert now >= state.last_read + cfg.linger_timeout
    if ending.reason is EndReason.BYTE_CAP:
        assert cfg.linger_max_bytes is not None and state.discarded >= cfg.linger_max_bytes


def _check_open(conn: Conn, cfg: Settings, total_before: float) -> None:
    state = conn.state
    assert state.total_deadline == total_before == state.started + cfg.linger_time
    assert state.deadline <= state.started + cfg.linger_time
    assert state.deadline == min(state.idle_deadline, state.total_deadline)


@settings(max_examples=400, deadline=None)
@given(cfg=settings_strategy, events=st.lists(event_strategy, max_size=120))
def test_no_event_order_breaks_the_invariants(cfg: Settings, events: list) -> None:
    counters = Counters()
    conns: list[Conn] = []
    now = 1000.0
    for kind, index, advance, nbytes in events:
        now += advance
        if kind == "open" or not conns:
            conns.append(Conn(LingerState(cfg, now)))
            counters.started()
            continue
        conn = conns[index % len(conns)]
        state = conn.state
        total_before = state.total_deadline
        discarded_before, last_read_before = state.discarded, state.last_read
        if kind == "at_deadline":  # an engine that sleeps until .deadline and wakes exactly then
            now = max(now, state.deadline)
        if conn.ended is None and kind == "timer" and now < state.deadline:
            assert state.on_timer(now) is None, "ended before its deadline"
            _check_open(conn, cfg, total_before)
            continue
        if kind == "data":
            ending = state.on_data(nbytes, now)
        elif kind in ("timer", "at_deadline"):
            ending = state.on_timer(now)
        else:
            ending = {"eof": state.on_eof, "error": state.on_error, "evict": state.on_evict,
                      "shutdown": state.on_shutdown}[kind]()
        if conn.ended is not None:
            assert ending is None, "an ended state ended again"
            assert state.ending is conn.ended
            assert (state.discarded, state.last_read) == (discarded_before, last_read_before)
            continue
        if kind == "at_deadline":
            assert ending is not None, "on_timer at .deadline did not end the connection"
        if ending is None:
            _check_open(conn, cfg, total_before)
            continue
        _check_ending(conn, ending, now, cfg)
        conn.ended = ending
        counters.record_end(ending.reason, state.discarded, aborted=ending.abort_if_acked)
        _check_counters(counters, conns)

    # Liveness: whatever happened, waking at each open connection's deadline ends it.
    for conn in conns:
        if conn.ended is None:
            ending = conn.state.on_timer(max(now, conn.state.deadline))
            assert ending is not None
            conn.ended = ending
            counters.record_end(ending.reason, conn.state.discarded, ending.abort_if_acked)
    _check_counters(counters, conns)
    assert counters.lingering_now == 0


def _check_counters(counters: Counters, conns: list[Conn]) -> None:
    ended_sum = sum(getattr(counters, "ended_" + reason.value) for reason in EndReason)
    open_now = sum(conn.ended is None for conn in conns)
    assert counters.lingering_started == len(conns)
    assert counters.lingering_started == ended_sum + counters.lingering_now
    assert counters.lingering_now == open_now >= 0
    assert counters.bytes_discarded == sum(c.state.discarded for c in conns if c.ended)
    assert counters.snapshot()["lingering_now"] == open_now


@settings(max_examples=300, deadline=None)
@given(cfg=settings_strategy,
       reads=st.lists(st.tuples(st.floats(0.0, 10.0, allow_nan=False), st.integers(1, 1 << 16)),
                      max_size=200))
def test_a_steady_trickle_never_outlives_linger_time(cfg: Settings, reads: list) -> None:
    """Slowloris in the core: data arriving before each idle deadline keeps the
    connection, but never past started + linger_time."""
    now = 0.0
    state = LingerState(cfg, now)
    for gap, nbytes in reads:
        now += min(gap, cfg.linger_timeout * 0.99)  # always within the idle deadline
        ending = state.on_data(nbytes, now)
        if ending is not None:
            assert ending.reason in (EndReason.TOTAL_TIMEOUT, EndReason.BYTE_CAP)
            assert now >= cfg.linger_time or ending.reason is EndReason.BYTE_CAP
            return
        assert now < cfg.linger_time
        assert state.deadline <= cfg.linger_time
    ending = state.on_timer(cfg.linger_time)
    assert ending is not None and ending.reason in (EndReason.TOTAL_TIMEOUT,
                                                    EndReason.IDLE_TIMEOUT)
