"""How long and how big each measurement is: the full run and the --quick smoke run."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Plan:
    quick: bool = False
    reps: int = 5                      # alternating stock/graceful repetitions
    throughput_seconds: float = 3.0    # per wrk run
    retries: int = 0                   # runs repeated under foreign load (see throughput)
    # more alternating rounds for the noisiest CPU figure (gthread's thread pool)
    extra_reps: dict[str, int] = field(default_factory=lambda: {"gthread": 4})
    wrk_connections: int = 16
    hol_counts: tuple[int, ...] = (0, 10, 100, 1000)
    hol_rate: float = 100.0            # never-closing clients arriving per second
    hol_min_window: float = 3.0        # seconds the normal client measures at least...
    hol_tail: float = 2.0              # ...and this long after the last arrival...
    hol_cap: float = 15.0              # ...but never longer than this per point
    hol_reps: int = 3
    rss_clients: int = 10_000
    rss_paths_clients: int = 3_000     # per way of ending the connections (scale.RSS_PATHS)
    census_clients: int = 20
    census_after: float = 5.0
    census_linger_timeout: float = 2.0  # the 2 s stock gunicorn lingers, for a like-for-like census
    correctness_clients: int = 50
    upload_size: int = 8 << 20
    loop: str = "uvloop"               # uvicorn's event loop (UvicornWorker picks uvloop itself)
    graceful_env: dict[str, str] = field(default_factory=dict)  # defaults: linger_time 30, timeout 5


FULL = Plan()
QUICK = Plan(quick=True, reps=1, extra_reps={}, throughput_seconds=1.0, hol_counts=(0, 10, 100),
             hol_min_window=1.0, hol_tail=0.5, hol_cap=3.0, hol_reps=1, rss_clients=300,
             rss_paths_clients=300, census_clients=3, census_after=3.0, correctness_clients=8,
             upload_size=2 << 20)


def plan_for(quick: bool, reps: int | None = None, loop: str | None = None,
             hol_reps: int | None = None) -> Plan:
    """reps sets the wrk repetitions and, unless hol_reps is given, the head-of-line ones."""
    plan = QUICK if quick else FULL
    if reps is not None:
        plan = replace(plan, reps=reps, hol_reps=reps)
    if hol_reps is not None:
        plan = replace(plan, hol_reps=hol_reps)
    if loop is not None:
        plan = replace(plan, loop=loop)
    return plan


# Seconds that the plan's parameters do not give, from the full run of 2026-12-01
# on the 2-core benchmark machine (results.json "seconds" per item).
START_PAIR = 3.0         # starting and stopping a stock + graceful pair
WRK_OVERHEAD = 0.3       # per wrk run, beyond its -d
HOL_SETTLE = 0.5         # per head-of-line point: crowd teardown and the settle check
CORRECTNESS = 20.0       # stock servers that never end a connection wait SCENARIO_TIMEOUT
RSS_ONE = 9.0            # one server filled with rss_clients sockets and emptied again
CENSUS_OVERHEAD = 5.0    # per variant: start, serve the crowd, stop


def item_seconds(plan: Plan) -> dict[str, float]:
    """Rough duration of each item on one target ("rss": per server measured), without
    the runs repeated under foreign load (throughput.RETRIES)."""
    from .hol import window_for  # hol imports this module

    throughput = 2 * (1 + WRK_OVERHEAD) + 2 * plan.reps * (plan.throughput_seconds + WRK_OVERHEAD)
    return {
        "keepalive": throughput, "close": throughput, "server_close": throughput + START_PAIR,
        "hol": plan.hol_reps * 2 * sum(window_for(n, plan) + HOL_SETTLE for n in plan.hol_counts),
        "correctness": CORRECTNESS,
        "rss": RSS_ONE, "rss_paths": 4 * RSS_ONE,
        "census": 2 * (plan.census_after + CENSUS_OVERHEAD),
    }
