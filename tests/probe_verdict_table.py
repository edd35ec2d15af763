"""The probe's verdicts on every behaviour server of tests/probe_servers.py, as one table.

    python -m tests.probe_verdict_table [--evidence] [--real] [--probe-source DIR]

--real adds the real servers of the probe's tests (nginx, Apache, hypercorn, waitress,
uvicorn and gunicorn stock and ours), with the options those tests pass. --probe-source
runs the probe from another checkout's graceful_close (for example `git archive main
graceful_close | tar -x -C /tmp/before`), to compare before and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from tests.probe_servers import BehaviourServer

SCENARIOS = ("pipeline", "close-pipeline", "idle", "upload", "drain")
QUICK = ("--timeout", "2", "--drain-time", "1", "--idle-max", "1.5", "--upload-size", "1M",
         "--pipeline", "30", "--big-path", "/big", "--upload-path", "/upload")
# (column, behaviour and its options, extra probe options)
SERVERS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("1 close", ("no-keepalive",), ()),
    ("1 http10", ("no-keepalive", "--http10"), ()),
    ("2 413 idle 4s", ("early-413-keep-alive", "--idle", "4"), ()),
    ("3 whole body", ("whole-body-first",), ()),
    ("4 early 200", ("early-200-reset",), ()),
    ("5 no length", ("no-length-reset",), ()),
    ("6 close+wait", ("close-then-wait",), ()),
    ("7 first/read", ("first-of-each-read",), ()),
    ("8 close, more", ("close-but-answers-more",), ("--close-path", "/big?close=1")),
    ("9 413 close", ("close-413-waits",), ()),
]
LABEL = {"pass": "PASS", "fail": "FAIL", "warn": "WARN", "not-exercised": "NOT EX."}
SAMPLE_ASGI = "graceful_close.diagnostics.sample_apps:asgi_app"
SAMPLE_WSGI = "graceful_close.diagnostics.sample_apps:wsgi_app"
REAL_QUICK = ("--drain-time", "1.5", "--timeout", "5")
SAMPLE = ("--big-path", "/big?close=1&size=2000000", "--upload-path", "/upload?size=1000000")


def real_servers() -> list[tuple[str, Callable[[], AbstractContextManager[Any]], str,
                                 tuple[str, ...]]]:
    """(column, server factory, URL path, probe options): the servers and options of
    tests/test_probe_real_servers.py and tests/test_probe.py."""
    from graceful_close.diagnostics.launch import (
        GUNICORN_WORKERS,
        UVICORN_PROTOCOLS,
        gunicorn_server,
        uvicorn_server,
    )
    from tests.real_servers import BIG_PATH, UPLOAD_PATH, PythonServer, RealServer

    static = ("--big-path", BIG_PATH, "--upload-path", UPLOAD_PATH)
    found: list[tuple[str, Callable[[], AbstractContextManager[Any]], str, tuple[str, ...]]] = [
        ("nginx", lambda: RealServer("nginx"), "/index.html",
         (*static, "--idle-max", "1", *REAL_QUICK)),
        ("nginx always", lambda: RealServer("nginx", extra="lingering_close always;\n    "
                                            "keepalive_timeout 2s 2;"), "/index.html",
         (*static, "--idle-max", "3", *REAL_QUICK)),
        ("Apache", lambda: RealServer("apache", extra="KeepAliveTimeout 2"), "/index.html",
         (*static, "--idle-max", "3", *REAL_QUICK)),
        ("hypercorn", lambda: PythonServer([sys.executable, "-m", "hypercorn", "-b",
                                            "127.0.0.1:{port}", "--keep-alive", "1",
                                            SAMPLE_ASGI]), "/",
         ("--close-path", SAMPLE[1], *SAMPLE[2:], "--idle-max", "3", *REAL_QUICK)),
        ("waitress", lambda: PythonServer([sys.executable, "-m", "waitress",
                                           "--listen=127.0.0.1:{port}",
                                           "--max-request-body-size=1024", SAMPLE_WSGI]), "/",
         ("--big-path", "/big?size=2000000", *SAMPLE[2:], "--idle-max", "1", *REAL_QUICK)),
    ]
    for flavour, index in (("stock", 0), ("ours", 1)):
        protocol = UVICORN_PROTOCOLS["httptools"][index]
        found.append((f"uvicorn {flavour}", lambda p=protocol: uvicorn_server(
            SAMPLE_ASGI, p, args=["--timeout-keep-alive", "1"]), "/",
            (*SAMPLE, "--drain-time", "2", "--idle-max", "5")))
        for kind in ("gthread", "sync"):
            worker = GUNICORN_WORKERS[kind][index]
            found.append((f"{kind} {flavour}", lambda w=worker: gunicorn_server(
                SAMPLE_WSGI, w, args=["--keep-alive", "1"],
                env={"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "50"}), "/",
                (*SAMPLE, "--drain-time", "4", "--pipeline", "120", "--idle-max", "5")))
    return found


def probe(url: str, options: tuple[str, ...], source: Path | None) -> dict:
    done = subprocess.run([sys.executable, "-m", "graceful_close.diagnostics.cli", "probe",
                           url, "--json", *options], capture_output=True, text=True,
                          timeout=180, cwd=source)
    return json.loads(done.stdout) if done.stdout.strip() else {"error": done.stderr}


def run(behaviour: tuple[str, ...], extra: tuple[str, ...], source: Path | None) -> dict:
    with BehaviourServer(*behaviour) as server:
        return probe(server.url, (*QUICK, *extra), source)


def run_real(factory: Callable[[], AbstractContextManager[Any]], path: str,
             options: tuple[str, ...], source: Path | None) -> dict:
    with factory() as server:
        return probe(f"http://127.0.0.1:{server.port}{path}", options, source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evidence", action="store_true", help="print every verdict's evidence")
    parser.add_argument("--probe-source", type=Path, help="directory holding graceful_close/")
    parser.add_argument("--real", action="store_true", help="the real servers too")
    args = parser.parse_args()
    with ThreadPoolExecutor(3) as pool:
        reports = list(pool.map(lambda s: run(s[1], s[2], args.probe_source), SERVERS))
    columns = [(name, " ".join(behaviour + extra)) for name, behaviour, extra in SERVERS]
    if args.real:
        real = real_servers()
        reports += [run_real(factory, path, options, args.probe_source)  # one at a time
                    for _, factory, path, options in real]
        columns += [(name, " ".join(options)) for name, _, _, options in real]
    print("| scenario | " + " | ".join(name for name, _ in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for scenario in SCENARIOS:
        cells = []
        for report in reports:
            found = {v["scenario"]: v for v in report.get("scenarios", [])}.get(scenario)
            cells.append(f"{LABEL[found['status']]} {found['finding']}" if found else "error")
        print(f"| {scenario} | " + " | ".join(cells) + " |")
    if args.evidence:
        for (name, how), report in zip(columns, reports, strict=True):
            print(f"\n## {name}: {how}")
            for v in report.get("scenarios", []):
                print(f"- {v['scenario']}: {LABEL[v['status']]} | {v['outcome']} | {v['ending']} | "
                      f"{v['evidence']}" + (f" | hint: {v['hint']}" if v.get("hint") else ""))
            if "error" in report:
                print(report["error"])


if __name__ == "__main__":
    main()
