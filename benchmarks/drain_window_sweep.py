"""The drain window's default, measured: the pool client under churn against ours with
GRACEFUL_CLOSE_DRAIN_WINDOW in {0, 0.1, 0.25, 0.5, 1, 2} s; failed / requests of 2 runs each.

    python -m benchmarks.drain_window_sweep httptools uvicorn-worker
"""

from __future__ import annotations

import functools
import sys

from graceful_close.diagnostics.pool import run_pool

from .churn import BY_NAME, churn

WINDOWS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)


def main(names: list[str], seconds: float = 15.0, runs: int = 2) -> None:
    for name in names:
        server = BY_NAME[name]
        for window in WINDOWS:
            env = {"GRACEFUL_CLOSE_DRAIN_WINDOW": str(window)}
            results = []
            for _ in range(runs):
                with server.make("ours", env=env) as proc:
                    result = churn(proc, seconds, 5.0, functools.partial(run_pool, "127.0.0.1", proc.port))
                results.append(f"{result.failed}/{result.requests}")
            print(f"{name} window {window:g} s: failed {', '.join(results)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["httptools", "uvicorn-worker"])
