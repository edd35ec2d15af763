"""Items 1-3: CPU per request and throughput under wrk, three workloads.

- keepalive: plain keep-alive requests (gunicorn sync ends every connection anyway);
- close (client-close): the client sends `Connection: close`, as nginx does to its upstreams;
- server_close: the server ends every connection: the ASGI app answers `Connection: close`
  (GET /?close=1); gunicorn's WSGI workers ignore a WSGI app's hop-by-hop headers, so their
  pair runs with `--keep-alive 0` instead (servers.server_close_args).

The headline is CPU per request: user + system CPU of the server's whole process tree (the
gunicorn arbiter and its worker, or the uvicorn process) over the requests wrk completed,
ours / stock. Rounds alternate between stock and ours (stock first on even rounds), so both
see the same machine: other processes on this 2-core machine slow both halves of a round
alike, and the ratio of their medians is what we report, with the spread of the per-round
ratios (ours of round i over stock of round i).
"""

from __future__ import annotations

import statistics

import psutil

from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.processes import worker_pid

from .observe import ForeignLoad, cpu_and_switches
from .plan import Plan
from .servers import VARIANTS
from .wrk import run_wrk

# A run during which other processes used more than this many cores is repeated
# (at most plan.retries times; the last try counts whatever the load).
FOREIGN_LIMIT = 0.25

WORKLOADS = {
    # item: (wrk -H header or None, path)
    "keepalive": (None, "/"),
    "close": ("Connection: close", "/"),
    "server_close": (None, "/?close=1"),
}
WORKLOAD_LABELS = {"keepalive": "keep-alive", "close": "client-close",
                   "server_close": "server-close"}


def alternating(rep: int) -> tuple[str, ...]:
    """stock first on even repetitions, graceful first on odd ones."""
    return VARIANTS if rep % 2 == 0 else VARIANTS[::-1]


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants so far."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def reps_for(plan: Plan, key: str) -> int:
    """gthread's CPU figure is the noisiest (its thread pool): it gets more rounds."""
    return plan.reps + plan.extra_reps.get(key, 0)


def measure_throughput(servers: dict[str, ServerProcess], plan: Plan, workload: str,
                       log=print, reps: int | None = None) -> dict:
    header, path = WORKLOADS[workload]
    reps = plan.reps if reps is None else reps
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    errors: dict[str, int] = {v: 0 for v in VARIANTS}
    cpu_us: dict[str, list[float]] = {v: [] for v in VARIANTS}       # whole process tree
    worker_us: dict[str, list[float]] = {v: [] for v in VARIANTS}    # the worker alone
    switches: dict[str, list[float]] = {v: [] for v in VARIANTS}
    workers = {v: worker_pid(servers[v].pid) for v in VARIANTS}
    foreign: dict[str, list[float]] = {v: [] for v in VARIANTS}
    repeated = 0
    command = ""
    for variant in VARIANTS:  # warm-up, not counted
        run_wrk(servers[variant].port, 1, plan.wrk_connections, header=header, path=path)
    for rep in range(reps):
        for variant in alternating(rep):
            for attempt in range(plan.retries + 1):
                tree_before = tree_cpu(servers[variant].pid)
                cpu_before, switches_before = cpu_and_switches(workers[variant])
                with ForeignLoad([servers[v].pid for v in VARIANTS]) as load:
                    result = run_wrk(servers[variant].port, plan.throughput_seconds,
                                     plan.wrk_connections, header=header, path=path)
                cpu_after, switches_after = cpu_and_switches(workers[variant])
                tree_after = tree_cpu(servers[variant].pid)
                if load.cores <= FOREIGN_LIMIT or attempt == plan.retries:
                    break
                log(f"    (others used {load.cores:.2f} cores: repeating this run)")
                repeated += 1
            foreign[variant].append(load.cores)
            served = max(1, result.requests)
            cpu_us[variant].append((tree_after - tree_before) / served * 1e6)
            worker_us[variant].append((cpu_after - cpu_before) / served * 1e6)
            switches[variant].append((switches_after - switches_before) / served)
            runs[variant].append(result.requests_per_sec)
            errors[variant] += result.socket_errors + result.non_2xx
            command = result.command.replace(f":{servers[variant].port}/", ":PORT/")
            log(f"    {WORKLOAD_LABELS[workload]} rep {rep + 1} {variant}: "
                f"{result.requests_per_sec:.0f} req/s, errors {result.socket_errors}, "
                f"CPU {cpu_us[variant][-1]:.1f} us/request, others {load.cores:.2f} cores")
    medians = {v: statistics.median(runs[v]) for v in VARIANTS}
    cpu_median = {v: statistics.median(cpu_us[v]) for v in VARIANTS}
    paired = [g / s for g, s in zip(cpu_us["graceful"], cpu_us["stock"], strict=True) if s]
    return {
        "workload": workload, "rounds": reps, "runs": runs, "median": medians,
        "errors": errors, "command": command,
        "cpu_us_runs": cpu_us,
        "cpu_us_per_request": cpu_median,
        "cpu_ratio": cpu_median["graceful"] / cpu_median["stock"] if cpu_median["stock"] else float("nan"),
        "cpu_ratio_rounds": paired,
        "cpu_ratio_spread": [min(paired), max(paired)] if paired else None,
        "worker_cpu_us_per_request": {v: statistics.median(worker_us[v]) for v in VARIANTS},
        "switches_per_request": {v: statistics.median(switches[v]) for v in VARIANTS},
        "foreign_cores": foreign, "repeated_runs": repeated,
        "ratio": medians["graceful"] / medians["stock"] if medians["stock"] else float("nan"),
    }
