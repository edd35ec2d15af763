"""python -m benchmarks [--quick] [--targets ...] [--items ...] [--reps N] [--hol-reps N]

Runs stock and graceful servers side by side for every supported worker and
protocol, writes results.json, RESULTS.md and the head-of-line chart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from .churn import BY_NAME as CHURN_SERVERS
from .churn import CHURN_ITEMS, run_items
from .correctness import measure_correctness
from .hol import measure_hol
from .meta import machine_meta
from .plan import START_PAIR, Plan, item_seconds, plan_for
from .report import write_report
from .scale import RSS_PATHS, measure_census, measure_rss
from .servers import TARGETS, VARIANTS, BenchTarget, server_close_args
from .throughput import measure_throughput, reps_for
from .wrk import ensure_wrk

ITEMS = ("keepalive", "close", "server_close", "hol", "rss", "rss_paths", "census", "correctness",
         *CHURN_ITEMS)
PAIR_ITEMS = ("keepalive", "close", "server_close", "hol", "correctness")  # share one stock+graceful pair
NOFILE = 65536
# Servers that can hold 10,000 idle keep-alive connections (gthread stops at
# worker_connections, sync has no keep-alive): their RSS with as many idle clients
# is the reference for what one open connection costs them anyway.
IDLE_REFERENCE = ("uvicorn-worker", "h11", "httptools")


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE for this process; the servers it starts inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in ((limit, max(hard, limit)), (min(limit, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, wanted)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def log(message: str) -> None:
    print(message, flush=True)


def _guarded(entry: dict, item: str, run) -> None:
    """One failing item is recorded and the run goes on."""
    started = time.monotonic()
    try:
        entry[item] = run()
    except Exception as exc:  # every failure is reported in RESULTS.md, the run goes on
        entry[item] = {"error": f"{exc.__class__.__name__}: {exc}"}
        log(traceback.format_exc())
    entry.setdefault("seconds", {})[item] = round(time.monotonic() - started, 1)


def run_target(target: BenchTarget, plan: Plan, items: list[str], entry: dict, save) -> None:
    pair_items = [i for i in items if i in PAIR_ITEMS]
    own_pair_args = server_close_args(target.key)
    if "server_close" in pair_items and own_pair_args is not None:
        pair_items.remove("server_close")
        with contextlib.ExitStack() as stack:
            servers = {v: stack.enter_context(target.make(v, plan.graceful_env, loop=plan.loop,
                                                          extra_args=own_pair_args))
                       for v in VARIANTS}
            log(f"  server_close ({' '.join(own_pair_args)})")
            _guarded(entry, "server_close", lambda: measure_throughput(
                servers, plan, "server_close", log=log, reps=reps_for(plan, target.key)))
            entry["server_close"]["server_args"] = list(own_pair_args)
            save()
    if pair_items:
        with contextlib.ExitStack() as stack:
            servers = {v: stack.enter_context(target.make(v, plan.graceful_env, loop=plan.loop))
                       for v in VARIANTS}
            jobs = {
                **{item: (lambda item=item: measure_throughput(
                    servers, plan, item, log=log, reps=reps_for(plan, target.key)))
                   for item in ("keepalive", "close", "server_close")},
                "hol": lambda: measure_hol(servers, plan, log=log),
                "correctness": lambda: measure_correctness(servers, plan, log=log),
            }
            for item in pair_items:
                log(f"  {item}")
                _guarded(entry, item, jobs[item])
                save()
    if "rss" in items:
        log("  rss")
        _guarded(entry, "rss", lambda: measure_rss(target, plan, log=log))
        save()
        if target.key in IDLE_REFERENCE:
            _guarded(entry, "rss_idle_stock",
                     lambda: measure_rss(target, plan, log=log, idle_stock=True))
            save()
    if "rss_paths" in items:  # issue 18: whoever ends the connection, plan.rss_paths_clients
        log("  rss_paths")
        paths_plan = replace(plan, rss_clients=plan.rss_paths_clients)
        _guarded(entry, "rss_paths", lambda: {
            how: measure_rss(target, paths_plan, log=log, how=how) for how in RSS_PATHS})
        save()
    if "census" in items:
        log("  census")
        _guarded(entry, "census", lambda: measure_census(target, plan, log=log))
        save()


def estimate_seconds(plan: Plan, targets: list[str], items: list[str]) -> float:
    """Rough duration of a run (see plan.item_seconds)."""
    cost = item_seconds(plan)
    total = 0.0
    for key in targets:
        total += START_PAIR * any(i in PAIR_ITEMS for i in items)
        total += sum(cost[i] for i in items)
        if "rss" in items and key in IDLE_REFERENCE:
            total += cost["rss"]
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run with small parameters (writes to benchmarks/out/)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--items", default=",".join(ITEMS),
                        help=f"comma-separated subset of {','.join(ITEMS)}")
    parser.add_argument("--reps", type=int,
                        help="repetitions of each wrk run and (unless --hol-reps) of head-of-line")
    parser.add_argument("--hol-reps", type=int, help="head-of-line repetitions")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), help="uvicorn event loop")
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--merge", action="store_true",
                        help="update the saved results.json with the items run now")
    parser.add_argument("--estimate", action="store_true",
                        help="print how long the selected run would take, and exit")
    parser.add_argument("--runs", type=int, default=5,
                        help="runs of the pool, nginx and stops items (issue 16)")
    parser.add_argument("--churn-seconds", type=float,
                        help="seconds per server and run of pool and nginx (25; --quick 6)")
    parser.add_argument("--churn-servers", default=",".join(CHURN_SERVERS),
                        help=f"servers of pool, nginx and stops: {','.join(CHURN_SERVERS)}")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md and the chart from the saved results.json")
    args = parser.parse_args(argv)
    out_dir = args.out or Path("benchmarks/out" if args.quick else "benchmarks")
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    if args.report_only:
        write_report(json.loads(results_path.read_text()), out_dir)
        return 0

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    items = [i.strip() for i in args.items.split(",") if i.strip()]
    unknown = [t for t in targets if t not in TARGETS] + [i for i in items if i not in ITEMS]
    if unknown:
        parser.error(f"unknown target(s)/item(s): {', '.join(unknown)}")
    churn_items = [i for i in items if i in CHURN_ITEMS]
    if churn_items:  # issue 16: its own servers, runs and report (CHURN.md)
        seconds = args.churn_seconds or (6.0 if args.quick else 25.0)
        run_items(churn_items, args.runs, seconds, 2.0 if args.quick else 5.0,
                  [s.strip() for s in args.churn_servers.split(",") if s.strip()], out_dir, log)
        log(f"wrote {out_dir / 'CHURN.md'}")
        items = [i for i in items if i not in CHURN_ITEMS]
        if not items:
            return 0
    plan = plan_for(args.quick, args.reps, args.loop, args.hol_reps)
    estimate = estimate_seconds(plan, targets, items)
    log(f"estimated duration: {estimate / 60:.0f} min ({estimate:.0f} s) without the runs "
        "repeated while other processes use the CPU")
    if args.estimate:
        return 0
    nofile = raise_nofile()
    if {"keepalive", "close", "server_close"} & set(items):
        ensure_wrk()
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = machine_meta(plan, command.strip(), nofile)
    results: dict = {"meta": meta, "targets": {}}
    if args.merge and results_path.exists():  # re-measure some items of an earlier run
        results = json.loads(results_path.read_text())
        results["meta"].setdefault("merged", []).append(
            {k: meta[k] for k in ("date", "command", "git")})

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1, default=str))

    for key in targets:
        target = TARGETS[key]
        entry = results["targets"].setdefault(key, {"label": target.label})
        missing = target.missing()
        log(f"{target.label}" + (f": skipped, {missing}" if missing else ""))
        if missing:
            entry["skipped"] = missing
            save()
            continue
        run_target(target, plan, items, entry, save)
    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save()
    report = write_report(results, out_dir)
    log(f"wrote {results_path}, {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
