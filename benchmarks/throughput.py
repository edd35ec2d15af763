"""Items 1 and 2: keep-alive and Connection: close throughput with wrk."""

from __future__ import annotations

import statistics

from graceful_close.launch import ServerProcess

from .plan import Plan
from .servers import VARIANTS
from .wrk import run_wrk


def alternating(rep: int) -> tuple[str, ...]:
    """stock first on even repetitions, graceful first on odd ones."""
    return VARIANTS if rep % 2 == 0 else VARIANTS[::-1]


def measure_throughput(servers: dict[str, ServerProcess], plan: Plan, close: bool,
                       log=print) -> dict:
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    errors: dict[str, int] = {v: 0 for v in VARIANTS}
    command = ""
    for variant in VARIANTS:  # warm-up, not counted
        run_wrk(servers[variant].port, 1, plan.wrk_connections, close=close)
    for rep in range(plan.reps):
        for variant in alternating(rep):
            result = run_wrk(servers[variant].port, plan.throughput_seconds, plan.wrk_connections,
                             close=close)
            runs[variant].append(result.requests_per_sec)
            errors[variant] += result.socket_errors + result.non_2xx
            command = result.command.replace(f":{servers[variant].port}/", ":PORT/")
            log(f"    {'close' if close else 'keep-alive'} rep {rep + 1} {variant}: "
                f"{result.requests_per_sec:.0f} req/s, errors {result.socket_errors}")
    medians = {v: statistics.median(runs[v]) for v in VARIANTS}
    return {
        "runs": runs, "median": medians, "errors": errors, "command": command,
        "ratio": medians["graceful"] / medians["stock"] if medians["stock"] else float("nan"),
    }
