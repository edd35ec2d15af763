"""The sans-io linger state: deadlines, byte cap, and which endings may abort."""

from graceful_close.core import Counters, EndReason, LingerState
from graceful_close.core.descriptors import DescriptorBudget
from graceful_close.core.linger import stop_deadline
from graceful_close.settings import Settings

S = Settings(linger_time=30, linger_timeout=5)


def test_eof_is_the_clean_end_and_never_aborts():
    state = LingerState(S, now=100)
    assert state.on_data(10, now=101) is None
    ending = state.on_eof()
    assert ending.reason is EndReason.EOF and not ending.abort_if_acked
    assert state.on_eof() is None and state.on_timer(1000) is None  # ended stays ended


def test_empty_moment_is_not_the_end():
    """lighttpd stopped when FIONREAD said 0; only EOF or a deadline ends a linger."""
    state = LingerState(S, now=0)
    for t in (0.5, 1.0, 4.9):
        assert state.on_timer(t) is None


def test_idle_deadline_moves_with_data_but_total_does_not():
    state = LingerState(S, now=0)
    for t in range(4, 29, 4):  # a byte every 4 s keeps the idle deadline ahead
        assert state.on_data(1, now=t) is None
        assert state.deadline <= 30
    assert state.on_timer(29.9) is None
    ending = state.on_timer(30)
    assert ending.reason is EndReason.TOTAL_TIMEOUT and ending.forced
    assert not ending.abort_if_acked  # a deadline ends with FIN by default (issue 20)


def test_idle_timeout():
    state = LingerState(S, now=10)
    assert state.deadline == 15
    assert state.on_timer(14.99) is None
    assert state.on_timer(15).reason is EndReason.IDLE_TIMEOUT


def test_byte_cap_only_when_set():
    capped = LingerState(S.replace(linger_max_bytes=100), now=0)
    assert capped.on_data(99, now=1) is None
    assert capped.on_data(1, now=1).reason is EndReason.BYTE_CAP
    uncapped = LingerState(S, now=0)
    assert uncapped.on_data(10**12, now=1) is None


def test_abort_disabled_by_setting():
    state = LingerState(S.replace(abort_on_timeout=False), now=0)
    assert state.on_timer(5).abort_if_acked is False


def test_error_and_eviction():
    assert LingerState(S, 0).on_error().reason is EndReason.ERROR
    assert not LingerState(S, 0).on_error().abort_if_acked
    assert not LingerState(S, 0).on_evict().abort_if_acked
    assert LingerState(S.replace(abort_on_timeout=True), 0).on_evict().abort_if_acked


def test_counters_add_up():
    c = Counters()
    c.lingering_started = 3
    c.record_end(EndReason.EOF, 10, aborted=False)
    c.record_end(EndReason.IDLE_TIMEOUT, 5, aborted=True)
    assert c.lingering_now == 1 and c.bytes_discarded == 15 and c.aborted_with_rst == 1
    assert "ended_eof=1" in c.summary()


# ---- the stop rule (issue 20) -------------------------------------------------------------

def test_stop_with_nothing_at_stake_closes_at_once_without_rst():
    state = LingerState(S.replace(abort_on_timeout=True), now=0)
    state.on_data(100, now=0.5)  # a client that sent bytes after our FIN: still nothing at stake now
    ending = state.on_stop(now=1, limit=31, at_stake=False)
    assert ending.reason is EndReason.SHUTDOWN and not ending.abort_if_acked


def test_stop_with_bytes_at_stake_ends_stop_linger_after_the_half_close():
    """Apache's short linger of a dying process: 2 s since the lingering began, not since
    the stop; a trickling client (data every 200 ms) does not extend it."""
    state = LingerState(S, now=10)
    assert state.on_stop(now=10.75, limit=40, at_stake=True) is None
    assert state.deadline == 12
    for t in (11.0, 11.2, 11.4, 11.8):
        assert state.on_data(1, now=t) is None
    ending = state.on_timer(12)
    assert ending.reason is EndReason.SHUTDOWN


def test_stop_ends_at_once_what_lingered_longer_than_stop_linger():
    state = LingerState(S, now=0)
    assert state.on_stop(now=2.5, limit=40, at_stake=True).reason is EndReason.SHUTDOWN


def test_stop_never_lingers_past_the_servers_limit():
    state = LingerState(S.replace(stop_linger=10), now=0)
    assert state.on_stop(now=1, limit=3, at_stake=True) is None
    assert state.deadline == 3
    assert state.on_stop(now=1.5, limit=2, at_stake=True) is None  # a closer limit wins
    assert state.deadline == 2
    assert state.on_stop(now=1.6, limit=9, at_stake=True) is None  # a later one never does
    assert state.deadline == 2


def test_stop_linger_zero_and_a_quick_stop_end_at_once():
    assert LingerState(S.replace(stop_linger=0), now=0).on_stop(0, 30, True).reason is EndReason.SHUTDOWN
    assert LingerState(S, now=0).on_stop(now=0, limit=0, at_stake=True).reason is EndReason.SHUTDOWN


def test_stop_deadline_is_the_earlier_of_stop_linger_and_limit():
    assert stop_deadline(started=5, stop_linger=2, limit=100) == 7
    assert stop_deadline(started=5, stop_linger=2, limit=6) == 6


# ---- the descriptor budget (issue 20) ------------------------------------------------------

def test_descriptor_budget_keeps_a_reserve_and_frees_in_batches():
    budget = DescriptorBudget(limit=64, in_use=14)  # 50 free: 3 kept in reserve
    assert budget.capacity == 47 and budget.batch == 2
    assert budget.to_free(46) == 0
    assert budget.to_free(47) == 2  # at capacity: a small batch
    assert budget.to_free(50) == 5  # beyond it (descriptors opened elsewhere): back under


def test_descriptor_budget_of_a_large_limit_never_frees_in_normal_use():
    budget = DescriptorBudget(limit=1 << 20, in_use=20)
    assert budget.to_free(10_000) == 0 and budget.batch == 32


def test_descriptor_budget_of_a_tiny_limit_still_works():
    budget = DescriptorBudget(limit=8, in_use=10)  # already over: one connection at a time
    assert budget.capacity == 1 and budget.to_free(0) == 0 and budget.to_free(1) == 1
