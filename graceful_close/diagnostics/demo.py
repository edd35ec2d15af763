"""`graceful-close demo`: stock and graceful servers side by side, on loopback.

For every supported worker/protocol it starts the stock server and ours with the
sample app, runs the probe's scenarios against each, measures the worst stall of
a normal client while clients that never close arrive, and prints one table that
reads at 100 columns (short headings, a legend below). Stock rows are expected to
fail: that is the point of the demonstration. The exit status is 1 when a server
could not start or one of ours failed a scenario (DemoResult.failed).

The servers are data: FAMILIES lists each family's kinds (stock and ours) and how
to launch one; a new server is a new entry there.
"""

from __future__ import annotations

import re
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
    HYPERCORN_CONFIG,
    UVICORN_PROTOCOLS,
    ServerProcess,
    gunicorn_server,
    hypercorn_server,
    uvicorn_server,
    waitress_server,
)
from .probe import NOT_EXERCISED, PASS, WARN, ProbeConfig, ProbeReport, Verdict, run_probe
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

# (scenario key, column heading, what the legend says of it). Headings stay short so that
# the table reads at 100 columns (issue 17 item 10); the legend below says the rest.
COLUMNS = (
    ("close-pipeline", "2 MB close\n+pipelined",
     "a 2 MB Connection: close response with 5 requests pipelined behind it"),
    ("upload", "early 413\nto upload",
     "a 1 MB 413 answered before the app reads an 8 MB upload"),
    ("pipeline", "200\npipelined", "200 requests pipelined on one connection (ours: cap 100)"),
    ("idle", "at idle\ntimeout", "a request sent just as the 1 s keep-alive timeout ends"),
    ("drain", "upload on\nafter 413", f"the upload goes on for {DRAIN_WINDOW:g} s after the early 413"),
    ("stall", "worst\nstall", f"a normal client's slowest request while {NEVER_CLOSING} "
                                "clients that never close arrive"),
)
LEGEND_MARK = ("{mark}: lost response bytes, a reset (RST), a connection left open after the "
               "answer, or a wait >= 1 s.")
CELL_LEGEND = ("whole: every response byte arrived; 'N kB, RST': N kB of the body, then a reset.\n"
               "FIN, RST, open, EOF: how the connection ended; n/a: no keep-alive to time out.")


def _gunicorn_process(kind: str, spec: str, env: dict[str, str]) -> ServerProcess:
    # One worker; gthread gets two threads (stock sync would become gthread with them).
    args = ["--keep-alive", KEEPALIVE_SECONDS, "--graceful-timeout", "3"]
    if kind == "gthread":
        args += ["--threads", "2"]
    app = SAMPLE_ASGI if kind in ASGI_WORKERS else SAMPLE_WSGI
    return gunicorn_server(app, spec, args=args, env=env)


def _uvicorn_process(kind: str, spec: str, env: dict[str, str]) -> ServerProcess:
    return uvicorn_server(SAMPLE_ASGI, spec, env=env,
                          args=["--timeout-keep-alive", KEEPALIVE_SECONDS,
                                "--timeout-graceful-shutdown", "3"])


def _hypercorn_process(kind: str, spec: str, env: dict[str, str]) -> ServerProcess:
    return hypercorn_server(SAMPLE_ASGI, spec == HYPERCORN_CONFIG, env=env,
                            args=["--keep-alive", KEEPALIVE_SECONDS, "--graceful-timeout", "3"])


def _waitress_process(kind: str, spec: str, env: dict[str, str]) -> ServerProcess:
    # waitress reads a whole body before the app runs: its own 413 (a small
    # max_request_body_size) is what answers an upload early. Idle connections close at
    # channel_timeout, checked every cleanup_interval.
    return waitress_server(SAMPLE_WSGI, spec == WAITRESS_OURS, env=env,
                           args=["--max-request-body-size=1024", f"--channel-timeout={KEEPALIVE_SECONDS}",
                                 "--cleanup-interval=1"])


# The close-pipeline request of one family (default: an HTTP/1.0 GET of BIG_PATH). hypercorn's
# h11 answers an HTTP/1.0 GET with requests in the same write 400 (stock and ours alike): there
# the app's own Connection: close on an HTTP/1.1 GET is used, as its probe tests do.
CLOSE_PATHS: dict[str, str] = {"hypercorn": BIG_PATH}

HYPERCORN_KINDS = {"asyncio": ("hypercorn", HYPERCORN_CONFIG)}
WAITRESS_OURS = "graceful_close.waitress"
WAITRESS_KINDS = {"wsgi": ("waitress", WAITRESS_OURS)}

# family: (its kinds as {kind: (stock spec, our spec)}, how to launch one kind with a spec).
FAMILIES: dict[str, tuple[dict[str, tuple[str, str]],
                          Callable[[str, str, dict[str, str]], ServerProcess]]] = {
    "gunicorn": (GUNICORN_WORKERS, _gunicorn_process),
    "uvicorn": (UVICORN_PROTOCOLS, _uvicorn_process),
    "hypercorn": (HYPERCORN_KINDS, _hypercorn_process),
    "waitress": (WAITRESS_KINDS, _waitress_process),
}


@dataclass(frozen=True)
class DemoServer:
    family: str     # a key of FAMILIES
    kind: str       # sync, gthread, uvicorn-worker, asgi, gevent, h11, httptools, zttp
    graceful: bool
    spec: str       # worker class or --http value

    @property
    def name(self) -> str:
        return f"{self.family} {self.kind}"

    @property
    def label(self) -> str:
        return f"{self.name} {'graceful' if self.graceful else 'stock'}"

    def process(self) -> ServerProcess:
        return FAMILIES[self.family][1](self.kind, self.spec, OUR_ENV if self.graceful else {})


def demo_servers(only: str | None = None) -> list[DemoServer]:
    servers = []
    for family, (kinds, _launch) in FAMILIES.items():
        if only in (None, family):
            for kind, (stock, ours) in kinds.items():
                servers += [DemoServer(family, kind, False, stock),
                            DemoServer(family, kind, True, ours)]
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
                "cells": {key: cell(self, key)[0] for key, *_ in COLUMNS} if not self.error else {},
                "probe": self.report.as_dict() if self.report else None}


@dataclass
class DemoResult:
    rows: list[DemoRow] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def errors(self) -> list[DemoRow]:
        return [row for row in self.rows if row.error]

    @property
    def failed(self) -> list[DemoRow]:
        """What makes the demo exit 1: servers that did not start, and our servers that failed
        a scenario (a stock failure is the demonstration)."""
        return [row for row in self.rows if row.error or (
            row.server.graceful and row.report is not None and row.report.failed)]

    def as_dict(self) -> dict[str, object]:
        return {"elapsed": round(self.elapsed, 2), "rows": [row.as_dict() for row in self.rows]}


def _normal_request(port: int) -> float:
    """Seconds for one request on a new connection (NORMAL_TIMEOUT when it did not finish)."""
    return timed_request(Target("127.0.0.1", port), NORMAL_TIMEOUT)


_ERROR_LINE = re.compile(r"^(?:\w+(?:Error|Exception)|graceful-close): ")


def _reason(exc: Exception) -> str:
    """One line for the note under the table: a server that did not start says why in its log
    (the last "SomethingError: ..." or "graceful-close: ..." line there, e.g. a missing extra;
    else its last line), not with its whole command line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    reason = lines[0]
    if len(lines) > 1 and reason.startswith(("server did not start", "server never answered")):
        errors = [line for line in lines[1:] if _ERROR_LINE.match(line)]
        reason = f"{reason.split(':')[0]}: {(errors or lines)[-1]}"
    return reason if len(reason) <= 200 else reason[:199] + "…"


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
                                           drain_time=DRAIN_WINDOW, timeout=10.0,
                                           close_path=CLOSE_PATHS.get(server.family)))
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
    ending = {"FIN+RST": "FIN+RST", "OPEN": "open"}.get(str(v.data.get("ending")),
                                                         str(v.data.get("ending")))
    if v.status in (PASS, WARN):
        return f"whole, {ending}"
    received = v.data.get("received")
    amount = f"{received / 1000:.0f} kB" if isinstance(received, (int, float)) else "cut"
    return f"{amount}, {ending}"


def cell(row: DemoRow, scenario: str) -> tuple[str, bool | None]:
    """Text of one table cell and whether it is good (None: neutral, nothing was tried).
    Bad is what the legend says a client suffers: lost bytes, RST, a connection left open
    after the answer (FAIL and WARN verdicts both), or a stall of 1 s or more."""
    if scenario == "stall":
        if row.worst_stall is None:
            return "-", None
        return f"{row.worst_stall * 1000:.0f} ms", row.worst_stall < 1.0
    v = row.verdict(scenario)
    if v is None:
        return "-", None
    if v.finding == "no-keep-alive":  # idle, on a server without keep-alive: nothing to time out
        return "n/a", None
    if v.status == NOT_EXERCISED:
        return "not tried", None
    good = v.status == PASS
    if scenario in ("close-pipeline", "upload"):
        return _bytes_cell(v), good
    if scenario == "pipeline":
        ending = {"FIN+RST": "FIN+RST"}.get(str(v.data["ending"]), str(v.data["ending"]))
        return f"{v.data['complete']}/{v.data['requests']}, {ending}", good
    if scenario == "idle":
        if (v.data.get("idle_timeout") or 0) <= 0.05 and good:
            return "n/a", good
        return ("EOF" if good else "RST"), good
    drained = v.data.get("drained_for", 0.0)
    if good:
        return f">= {drained:.1f} s", good
    return f"{drained:.1f} s, RST", good


def short_reason(error: str) -> str:
    """A few words for the cell of a server that did not start (the whole reason is in a note
    under the table): the missing module, or what happened."""
    missing = re.search(r"No module named '([\w.]+)'", error)
    if missing:
        words = f"no {missing.group(1)}"
    elif "does not import" in error or "ImportError" in error:
        words = "import error"
    elif "graceful-close:" in error:
        words = "refused"
    elif "never answered" in error:
        words = "no answer"
    else:
        words = "see note"
    return words if len(words) <= 13 else words[:12] + "…"


def render_demo(result: DemoResult, console: Console | None = None) -> None:
    from rich import box
    from rich.table import Table

    if console is None:
        console = table_console(100)
    # Piped or NO_COLOR, the table has no colours: bad cells get a '!' and the legend says so.
    coloured = console.color_system is not None
    table = Table(title="graceful-close demo: stock vs graceful on 127.0.0.1 (sample app)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("server", no_wrap=True)
    for _, heading, _ in COLUMNS:
        table.add_column(heading, no_wrap=True)
    notes: list[str] = []
    family = None
    for row in result.rows:
        if row.server.family != family:  # a heading row per family: the kinds stay short
            family = row.server.family
            if table.row_count:
                table.add_section()
            table.add_row(f"[bold]{family}[/]", *[""] * len(COLUMNS))
        name = "  [bold]graceful[/]" if row.server.graceful else row.server.kind
        if row.error:  # the reason in a few words across the cells, in full in a note
            notes.append(f"({len(notes) + 1}) {row.server.label}: {row.error}")
            words = ["! not started", short_reason(row.error), f"note ({len(notes)})"]
            table.add_row(name, *[f"[red]{w}[/]" for w in words], *[""] * (len(COLUMNS) - 3))
            continue
        cells = []
        for key, *_ in COLUMNS:
            text, good = cell(row, key)
            style = "green" if good else "red" if good is False else "yellow"
            mark = "! " if good is False and not coloured else ""
            cells.append(f"[{style}]{mark}{text}[/]")
        table.add_row(name, *cells)
    console.print(table)
    legend = [f"{len(result.rows)} servers in {result.elapsed:.0f} s: each stock, then graceful "
              "(ours)."]
    legend += [f"{heading.replace(chr(10), ' ')}: {meaning}." for _, heading, meaning in COLUMNS]
    legend += [LEGEND_MARK.format(mark="Red" if coloured else "!"), CELL_LEGEND]
    if notes:
        legend += ["Did not start:", *notes]
    console.print("\n".join(legend), highlight=False)
    failed = result.failed
    if failed:
        console.print(f"[red]graceful-close demo: {len(failed)} row(s) failed: "
                      f"{', '.join(row.server.label for row in failed)}[/]", highlight=False)
