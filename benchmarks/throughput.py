"""Items 1 and 2: keep-alive and Connection: close throughput with wrk."""

from __future__ import annotations

import statistics

from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.processes import worker_pid

from .observe import ForeignLoad, cpu_and_switches
from .plan import Plan
from .servers import VARIANTS
from .wrk import run_wrk

# A run during which other processes used more than this many cores is repeated
# (at most RETRIES times; the last try counts whatever the load).
FOREIGN_LIMIT = 0.25
RETRIES = 3


def alternating(rep: int) -> tuple[str, ...]:
    """stock first on even repetitions, graceful first on odd ones."""
    return VARIANTS if rep % 2 == 0 else VARIANTS[::-1]


def measure_throughput(servers: dict[str, ServerProcess], plan: Plan, close: bool,
                       log=print) -> dict:
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    errors: dict[str, int] = {v: 0 for v in VARIANTS}
    # Where the time goes: worker CPU per request and context switches per request.
    cpu_us: dict[str, list[float]] = {v: [] for v in VARIANTS}
    switches: dict[str, list[float]] = {v: [] for v in VARIANTS}
    workers = {v: worker_pid(servers[v].pid) for v in VARIANTS}
    foreign: dict[str, list[float]] = {v: [] for v in VARIANTS}
    repeated = 0
    command = ""
    for variant in VARIANTS:  # warm-up, not counted
        run_wrk(servers[variant].port, 1, plan.wrk_connections, close=close)
    for rep in range(plan.reps):
        for variant in alternating(rep):
            for _ in range(RETRIES + 1):
                cpu_before, switches_before = cpu_and_switches(workers[variant])
                with ForeignLoad([servers[v].pid for v in VARIANTS]) as load:
                    result = run_wrk(servers[variant].port, plan.throughput_seconds,
                                     plan.wrk_connections, close=close)
                cpu_after, switches_after = cpu_and_switches(workers[variant])
                if load.cores <= FOREIGN_LIMIT:
                    break
                log(f"    (others used {load.cores:.2f} cores: repeating this run)")
                repeated += 1
            foreign[variant].append(load.cores)
            served = max(1, result.requests)
            cpu_us[variant].append((cpu_after - cpu_before) / served * 1e6)
            switches[variant].append((switches_after - switches_before) / served)
            runs[variant].append(result.requests_per_sec)
            errors[variant] += result.socket_errors + result.non_2xx
            command = result.command.replace(f":{servers[variant].port}/", ":PORT/")
            log(f"    {'close' if close else 'keep-alive'} rep {rep + 1} {variant}: "
                f"{result.requests_per_sec:.0f} req/s, errors {result.socket_errors}, "
                f"CPU {cpu_us[variant][-1]:.0f} us/request, others {load.cores:.2f} cores")
    medians = {v: statistics.median(runs[v]) for v in VARIANTS}
    return {
        "runs": runs, "median": medians, "errors": errors, "command": command,
        "cpu_us_per_request": {v: statistics.median(cpu_us[v]) for v in VARIANTS},
        "switches_per_request": {v: statistics.median(switches[v]) for v in VARIANTS},
        "foreign_cores": foreign, "repeated_runs": repeated,
        "ratio": medians["graceful"] / medians["stock"] if medians["stock"] else float("nan"),
    }
