"""Where a worker spends its time under wrk: py-spy samples of one worker process.

    python -m benchmarks.profile --target sync [--close] [--seconds 8]

Runs wrk against the stock and the graceful variant in turn, samples the worker
with py-spy (pip install py-spy; it needs ptrace, e.g. root) and prints, per
variant, the share of on-CPU samples per thread and the functions that own the
most samples. This is the evidence behind the throughput gaps in RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from graceful_close.diagnostics.processes import worker_pid

from .observe import cpu_and_switches
from .servers import TARGETS, VARIANTS
from .wrk import ensure_wrk, run_wrk


def _collapsed(pid: int, seconds: float, out: Path) -> list[tuple[list[str], int]]:
    """py-spy raw (collapsed) stacks with thread ids: [(frames, samples)]."""
    subprocess.run(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
                    "--rate", "250", "--threads", "--format", "raw", "--nonblocking",
                    "--output", str(out)], check=True, capture_output=True)
    stacks = []
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _function(frame: str) -> str:
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]}" if where else name


def _is_ours(frame: str) -> bool:
    """A frame of the library (the sample app, also in the package, runs in both variants)."""
    return "graceful_close/" in frame and "sample_apps.py" not in frame


def summarize(stacks: list[tuple[list[str], int]], top: int = 12) -> list[str]:
    total = sum(count for _, count in stacks) or 1
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        threads[frames[0]] += count
        own[_function(frames[-1])] += count
        for fn in {_function(f) for f in frames[1:]}:
            inclusive[fn] += count
    ours = sum(count for frames, count in stacks if any(_is_ours(f) for f in frames))
    lines = [f"  samples inside graceful_close code (inclusive): {100 * ours / total:.1f}%",
             "  threads (share of on-CPU samples):"]
    lines += [f"    {100 * c / total:5.1f}%  {t}" for t, c in threads.most_common()]
    lines.append("  functions with the most samples, inclusive of callees:")
    lines += [f"    {100 * c / total:5.1f}%  {fn}" for fn, c in inclusive.most_common(top)]
    lines.append("  functions with the most samples of their own:")
    lines += [f"    {100 * c / total:5.1f}%  {fn}" for fn, c in own.most_common(top)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=list(TARGETS), default="sync")
    parser.add_argument("--close", action="store_true", help="wrk with Connection: close")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--loop", default="uvloop")
    args = parser.parse_args(argv)
    if not shutil.which("py-spy"):
        raise SystemExit("py-spy is missing: pip install py-spy")
    ensure_wrk()
    target = TARGETS[args.target]
    for variant in VARIANTS:
        with target.make(variant, loop=args.loop) as server, tempfile.TemporaryDirectory() as tmp:
            pid = worker_pid(server.pid)
            run_wrk(server.port, 1, 16, close=args.close)  # warm up
            cpu0, sw0 = cpu_and_switches(pid)
            result: dict = {}

            def load_server(port: int = server.port, into: dict = result) -> None:
                into["wrk"] = run_wrk(port, args.seconds + 1, 16, close=args.close)

            load = threading.Thread(target=load_server)
            load.start()
            stacks = _collapsed(pid, args.seconds, Path(tmp) / "raw.txt")
            load.join()
            cpu1, sw1 = cpu_and_switches(pid)
            wrk = result["wrk"]
            print(f"{target.label} {variant} ({'Connection: close' if args.close else 'keep-alive'}):"
                  f" {wrk.requests_per_sec:.0f} req/s, worker CPU "
                  f"{(cpu1 - cpu0) / wrk.requests * 1e6:.0f} us/request, "
                  f"{(sw1 - sw0) / wrk.requests:.2f} context switches/request")
            print("\n".join(summarize(stacks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
