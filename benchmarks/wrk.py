"""wrk: find or install it, run it, parse its summary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

INSTALL_HINT = ("wrk is missing: install the Debian/Ubuntu package with `sudo apt-get install wrk` "
                "(or build it from its sources) and run the benchmarks again")


def ensure_wrk() -> str:
    """Path of wrk; installs the Debian package when missing and we are root with apt-get."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing the Debian package with apt-get", flush=True)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, **quiet).returncode:
            subprocess.run(["apt-get", "update", "-qq"], env=env, **quiet)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, **quiet)
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit(INSTALL_HINT)


@dataclass
class WrkResult:
    requests_per_sec: float
    requests: int
    socket_errors: int
    non_2xx: int
    command: str


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_TOTAL = re.compile(r"(\d+) requests in")
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def run_wrk(port: int, seconds: float, connections: int, threads: int = 1,
            close: bool = False, path: str = "/", header: str | None = None) -> WrkResult:
    argv = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "10s"]
    if close:
        header = "Connection: close"
    if header:
        argv += ["-H", header]
    argv.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = _RPS.search(out)
    if rps is None:
        raise RuntimeError(f"cannot parse wrk output of {' '.join(argv)}:\n{out}")
    errors = _ERRORS.search(out)
    non2xx = _NON2XX.search(out)
    total = _TOTAL.search(out)
    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        requests=int(total.group(1)) if total else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        command=" ".join(["wrk", *argv[1:]]),
    )
