"""Item 3: head-of-line blocking. Latency of a normal client while N clients that
read their response and never close keep arriving."""

from __future__ import annotations

import statistics
import threading
import time

from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.scenarios import Target

from .crowd import NeverClosingCrowd, measure_latency, percentile
from .plan import Plan
from .throughput import alternating


def window_for(n: int, plan: Plan) -> float:
    return min(plan.hol_cap, max(plan.hol_min_window, n / plan.hol_rate + plan.hol_tail))


def hol_point(port: int, n: int, plan: Plan) -> dict:
    target = Target("127.0.0.1", port)
    crowd = NeverClosingCrowd(target)
    window = window_for(n, plan)
    until = time.monotonic() + window
    arrivals = threading.Thread(target=crowd.arrive_at_rate, args=(n, plan.hol_rate),
                                kwargs={"deadline": until}, daemon=True)
    arrivals.start()
    samples = measure_latency(target, until)
    arrivals.join(plan.hol_cap)
    arrived, answered = len(crowd.sockets), crowd.answered
    crowd.close_all()
    lat = samples.seconds
    return {
        "n": n, "window": window, "requests": len(lat), "failed": samples.failed,
        "censored": samples.censored, "arrived": arrived, "crowd_answered": answered,
        "p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat, default=float("nan")),
    }


def wait_responsive(port: int, limit: float = 60.0) -> float:
    """After a point, wait until the server answers a request within 0.5 s again."""
    target = Target("127.0.0.1", port)
    start = time.monotonic()
    while time.monotonic() - start < limit:
        samples = measure_latency(target, time.monotonic() + 0.5, think=0.0)
        if samples.seconds and samples.seconds[0] < 0.5 and not samples.failed:
            break
    return time.monotonic() - start


def measure_hol(servers: dict[str, ServerProcess], plan: Plan, log=print) -> dict:
    points: dict[str, dict[int, list[dict]]] = {v: {n: [] for n in plan.hol_counts}
                                                for v in servers}
    for rep in range(plan.hol_reps):
        for n in plan.hol_counts:
            for variant in alternating(rep):
                point = hol_point(servers[variant].port, n, plan)
                point["settle"] = wait_responsive(servers[variant].port)
                points[variant][n].append(point)
                log(f"    HOL rep {rep + 1} N={n} {variant}: p50 {point['p50'] * 1000:.1f} ms, "
                    f"p99 {point['p99'] * 1000:.1f} ms, max {point['max'] * 1000:.0f} ms, "
                    f"{point['requests']} requests, crowd {point['crowd_answered']}/{point['arrived']}"
                    f" answered")
    summary: dict[str, dict[str, dict]] = {}
    for variant, by_n in points.items():
        summary[variant] = {}
        for n, reps in by_n.items():
            summary[variant][str(n)] = {
                key: statistics.median(r[key] for r in reps)
                for key in ("p50", "p99", "max", "requests", "censored", "failed",
                            "crowd_answered", "arrived", "window")
            }
    return {"points": {v: {str(n): r for n, r in by_n.items()} for v, by_n in points.items()},
            "median": summary}
