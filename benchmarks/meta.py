"""What machine and which versions a run measured."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
import time
from importlib import metadata

from .plan import Plan

PACKAGES = ("gunicorn", "uvicorn", "uvicorn-worker", "h11", "httptools", "uvloop", "graceful-close")


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_meta(plan: Plan, command: str, nofile: int) -> dict:
    wrk = _run(["wrk", "--version"]).splitlines()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command,
        "nproc": _run(["nproc"]),
        "free": _run(["free", "-m"]),
        "uname": _run(["uname", "-a"]),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in PACKAGES},
        "wrk": wrk[0] if wrk else "not installed",
        "git": _run(["git", "rev-parse", "--short", "HEAD"]),
        "rlimit_nofile": nofile,
        "plan": dataclasses.asdict(plan),
    }
