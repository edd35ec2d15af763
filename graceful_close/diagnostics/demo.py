"""`graceful-close demo`: stock and graceful servers side by side, on loopback.

For every supported worker/protocol it starts the stock server and ours with the
sample app, runs the probe's scenarios against each, measures the worst stall of
a normal client while clients that never close arrive, and prints one table.
Stock rows are expected to fail: that is the point of the demonstration.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .console import table_console
from .launch import (
    ASGI_WORKERS,
    GUNICORN_WORKERS,
    UVICORN_PROTOCOLS,
    ServerProcess,
    gunicorn_server,
    uvicorn_server,
)
from .probe import FAIL, NOT_EXERCISED, PASS, WARN, ProbeConfig, ProbeReport, Verdict, run_probe
from .scenarios import Target, never_closing, timed_request

if TYPE_CHECKING:
    from rich.console import Console

SAMPLE_WSGI = "graceful_close.diagnostics.sample_apps:wsgi_app"
SAMPLE_ASGI = "graceful_close.diagnostics.sample_apps:asgi_app"
KEEPALIVE_SECONDS = "1"          # short keep-alive so the idle scenario takes ~2 s
OUR_ENV = {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "100"}  # shows a request cap ending in FIN
BIG_PATH = "/big?close=1&size=2000000"
UPLOAD_PATH = "/upload?size=1000000"
UPLOAD_SIZE = 8 << 20
DRAIN_WINDOW = 3.0               # longer than stock gunicorn's 2 s close_graceful
NEVER_CLOSING = 20               # clients that read their response and never close ...
ARRIVAL_GAP = 0.05               # ... arriving one per 50 ms
NORMAL_TIMEOUT = 3.0             # a normal request slower than this counts as 3 s
STOP_WAIT = 5.0
PARALLEL_SERVERS = 3             # servers probed at once (they mostly wait on timers)

COLUMNS = (  # (scenario key, column title)
    ("close-pipeline", "2 MB response\n(close) + 5\npipelined"),
    ("upload", "early 413\n(1 MB) to an\n8 MB upload"),
    ("pipeline", "200 pipelined\n(ours: cap\n100)"),
    ("idle", "request at\nidle timeout\n(1 s)"),
    ("drain", f"upload goes\non after 413\n(for {DRAIN_WINDOW:g} s)"),
    ("stall", f"worst stall\n({NEVER_CLOSING} never-\nclosing)"),
)


@dataclass(frozen=True)
class DemoServer:
    family: str     # gunicorn or uvicorn
    kind: str       # sync, gthread, uvicorn-worker, asgi, gevent, h11, httptools, zttp
    graceful: bool
    spec: str       # worker class or --http value

    @property
    def label(self) -> str:
        return f"{self.family} {self.kind} {'graceful' if self.graceful else 'stock'}"

    def process(self) -> ServerProcess:
        env = OUR_ENV if self.graceful else {}
        if self.family == "gunicorn":
            # One worker; gthread gets two threads (not sync: gunicorn would swap it for gthread).
            args = ["--keep-alive", KEEPALIVE_SECONDS, "--graceful-timeout", "3"]
            if self.kind == "gthread":
                args += ["--threads", "2"]
            app = SAMPLE_ASGI if self.kind in ASGI_WORKERS else SAMPLE_WSGI
            return gunicorn_server(app, self.spec, args=args, env=env)
        return uvicorn_server(SAMPLE_ASGI, self.spec, env=env,
                              args=["--timeout-keep-alive", KEEPALIVE_SECONDS,
                                    "--timeout-graceful-shutdown", "3"])


def demo_servers(only: str | None = None) -> list[DemoServer]:
    servers = []
    if only in (None, "gunicorn"):
        for kind, (stock, ours) in GUNICORN_WORKERS.items():
            servers += [DemoServer("gunicorn", kind, False, stock),
                        DemoServer("gunicorn", kind, True, ours)]
    if only in (None, "uvicorn"):
        for kind, (stock, ours) in UVICORN_PROTOCOLS.items():
            servers += [DemoServer("uvicorn", kind, False, stock),
                        DemoServer("uvicorn", kind, True, ours)]
    return servers


@dataclass
class DemoRow:
    server: DemoServer
    report: ProbeReport | None = None
    worst_stall: float | None = None     # seconds
    normal_requests: int = 0
    error: str = ""
    elapsed: float = 0.0

    def verdict(self, scenario: str) -> Verdict | None:
        if self.report is None:
            return None
        return next((v for v in self.report.verdicts if v.scenario == scenario), None)

    def as_dict(self) -> dict[str, object]:
        return {"server": self.server.label, "family": self.server.family,
                "kind": self.server.kind, "graceful": self.server.graceful,
                "spec": self.server.spec, "error": self.error,
                "elapsed": round(self.elapsed, 2),
                "worst_stall_ms": None if self.worst_stall is None
                else round(self.worst_stall * 1000),
                "normal_requests": self.normal_requests,
                "cells": {key: cell(self, key)[0] for key, _ in COLUMNS} if not self.error else {},
                "probe": self.report.as_dict() if self.report else None}


@dataclass
class DemoResult:
    rows: list[DemoRow] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def errors(self) -> list[DemoRow]:
        return [row for row in self.rows if row.error]

    def as_dict(self) -> dict[str, object]:
        return {"elapsed": round(self.elapsed, 2), "rows": [row.as_dict() for row in self.rows]}


def _normal_request(port: int) -> float:
    """Seconds for one request on a new connection (NORMAL_TIMEOUT when it did not finish)."""
    return timed_request(Target("127.0.0.1", port), NORMAL_TIMEOUT)


def _reason(exc: Exception) -> str:
    """One short line for the table: a server that did not start says why in the last line
    of its log (e.g. a missing extra), not with its whole command line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    reason = lines[0]
    if reason.startswith("server did not start") and len(lines) > 1:
        reason = f"server did not start: {lines[-1]}"
    return reason if len(reason) <= 100 else reason[:99] + "…"


def worst_stall(port: int) -> tuple[float, int]:
    """While never-closing clients arrive, a normal client's slowest request (s) and count."""
    target = Target("127.0.0.1", port)
    holders = []
    latencies: list[float] = []
    done = threading.Event()

    def normal_client() -> None:
        while not done.is_set():
            latencies.append(_normal_request(port))
            time.sleep(0.01)  # a busy but polite client: leave CPU to the other demo servers

    normal = threading.Thread(target=normal_client, daemon=True)
    normal.start()
    for _ in range(NEVER_CLOSING):
        holder = threading.Thread(target=never_closing, args=(target,),
                                  kwargs={"hold": 2.5, "timeout": 5.0}, daemon=True)
        holder.start()
        holders.append(holder)
        time.sleep(ARRIVAL_GAP)
    time.sleep(0.5)
    done.set()
    normal.join(NORMAL_TIMEOUT + 1)
    for holder in holders:
        holder.join(6)
    return (max(latencies) if latencies else NORMAL_TIMEOUT), len(latencies)


def run_one(server: DemoServer) -> DemoRow:
    row = DemoRow(server)
    start = time.monotonic()
    proc = server.process()
    try:
        proc.start()
        url = f"http://127.0.0.1:{proc.port}/"
        row.report = run_probe(ProbeConfig(url=url, big_path=BIG_PATH, upload_path=UPLOAD_PATH,
                                           upload_size=UPLOAD_SIZE, idle_max=5.0,
                                           drain_time=DRAIN_WINDOW, timeout=10.0))
        row.worst_stall, row.normal_requests = worst_stall(proc.port)
    except Exception as exc:
        row.error = _reason(exc)
    finally:
        # SIGTERM: both servers stop gracefully and quickly (SIGINT makes a gunicorn
        # running uvicorn workers wait out its graceful timeout).
        proc.signal(signal.SIGTERM)
        if proc.proc is not None and proc.wait(STOP_WAIT) is None:
            proc.stop()
    row.elapsed = time.monotonic() - start
    return row


def run_demo(only: str | None = None, progress: Callable[[str], None] | None = None,
             parallel: int = PARALLEL_SERVERS) -> DemoResult:
    started = time.monotonic()
    servers = demo_servers(only)

    def run(server: DemoServer) -> DemoRow:
        row = run_one(server)
        if progress:
            status = f"error: {row.error}" if row.error else "done"
            progress(f"  {server.label:34} {status} ({row.elapsed:.1f} s)")
        return row

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        rows = list(pool.map(run, servers))
    return DemoResult(rows, time.monotonic() - started)


def _bytes_cell(v: Verdict) -> str:
    received = v.data.get("received")
    ending = {"FIN+RST": "FIN+RST", "OPEN": "open"}.get(str(v.data.get("ending")),
                                                             str(v.data.get("ending")))
    if v.status in (PASS, WARN):
        return f"intact, {ending}"
    return f"{received} B, {ending}"


def cell(row: DemoRow, scenario: str) -> tuple[str, bool | None]:
    """Text of one table cell and whether it is good (None: neutral)."""
    if scenario == "stall":
        if row.worst_stall is None:
            return "-", None
        return f"{row.worst_stall * 1000:.0f} ms", row.worst_stall < 1.0
    v = row.verdict(scenario)
    if v is None:
        return "-", None
    good = None if v.status not in (PASS, FAIL) else v.status == PASS
    if v.finding == "no-keep-alive":  # idle: nothing to test on a worker without keep-alive
        return "no keep-alive", None
    if v.status == NOT_EXERCISED:
        return "not exercised", good
    if scenario in ("close-pipeline", "upload"):
        return _bytes_cell(v), good
    if scenario == "pipeline":
        ending = {"FIN+RST": "FIN+RST"}.get(str(v.data["ending"]), str(v.data["ending"]))
        return f"{v.data['complete']}/{v.data['requests']}, {ending}", good
    if scenario == "idle":
        if (v.data.get("idle_timeout") or 0) <= 0.05 and v.status == PASS:
            return "no keep-alive", good
        return ("clean EOF" if v.status == PASS else "RST"), good
    drained = v.data.get("drained_for", 0.0)
    if v.status == PASS:
        return f">= {drained:.1f} s", good
    return f"{drained:.1f} s, RST", good


def render_demo(result: DemoResult, console: Console | None = None) -> None:
    from rich.table import Table

    if console is None:
        console = table_console(150)
    # Piped or NO_COLOR, the table has no colours: bad cells get a '!' and the legend says so.
    coloured = console.color_system is not None
    table = Table(title="graceful-close demo: stock vs graceful on 127.0.0.1 (sample app)",
                  title_justify="left", show_lines=False)
    table.add_column("server", no_wrap=True)
    table.add_column("variant", no_wrap=True)
    for _, title in COLUMNS:
        table.add_column(title, no_wrap=True)
    previous_kind = None
    for row in result.rows:
        if previous_kind is not None and row.server.kind != previous_kind:
            table.add_section()
        previous_kind = row.server.kind
        name = f"{row.server.family} {row.server.kind}"
        flavour = "graceful" if row.server.graceful else "stock"
        if row.error:
            table.add_row(name, flavour, f"[red]could not run: {row.error}[/]",
                          *[""] * (len(COLUMNS) - 1))
            continue
        cells = []
        for key, _ in COLUMNS:
            text, good = cell(row, key)
            style = "green" if good else "red" if good is False else "yellow"
            mark = "! " if good is False and not coloured else ""
            cells.append(f"[{style}]{mark}{text}[/]")
        table.add_row(name, f"[bold]{flavour}[/]" if row.server.graceful else flavour, *cells)
    console.print(table)
    console.print(
        f"{len(result.rows)} servers in {result.elapsed:.0f} s. {'Red' if coloured else '!'}: "
        "the client lost response "
        "bytes, met RST, or waited >= 1 s.\n'N B, RST': only N body bytes arrived, then RST. "
        "'open': the server kept the connection open after its answer.",
        highlight=False)
