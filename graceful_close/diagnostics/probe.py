"""`graceful-close probe URL`: does a server end HTTP/1.1 connections without losing bytes?

Runs the black-box clients of probe_clients against one URL and turns what they
saw into a verdict per scenario (pass / fail / skip) with the evidence.
Safe for a production server: every scenario is bounded in requests, bytes and
time (see PROBE_LIMITS), and only the upload scenario sends anything but GET.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from . import probe_clients as clients
from .console import table_console
from .scenarios import Target

SCENARIOS = ("pipeline", "close-pipeline", "idle", "upload", "drain")
SCENARIO_TITLES = {
    "pipeline": "pipelined requests",
    "close-pipeline": "Connection: close + pipelined",
    "idle": "request at idle timeout",
    "upload": "early answer to upload",
    "drain": "drain after FIN",
}
PASS, FAIL, SKIP = "pass", "fail", "skip"
OPEN_NOTE = ("the server then kept the connection open (a lingering server on TLS, which "
             "cannot half-close, waits for the client to close first)")
BIG_ENOUGH = 1_000_000  # below this a response fits in the socket buffers: truncation hides

PROBE_LIMITS = """\
Limits (safe to point at a production server):
  requests  GETs only, except one POST: 1 preflight + --pipeline (<= 1000, fewer when
            N x response size would pass --max-bytes) + 6 (close-pipeline) + 6 (idle) + 2 (drain);
            the drain bursts (16 GETs every 0.5 s for --drain-time <= 60 s) follow a request
            with Connection: close, so a correct server never runs them
  upload    one POST of --upload-size (<= 64 MiB) throw-away bytes to --upload-path (default:
            the URL's path): point it at an endpoint that rejects it, or --skip upload
  bytes     at most --max-bytes of response body read per scenario
  parallel  at most 3 connections open at once (idle), otherwise 1
  time      each scenario ends within --timeout, plus 2 x --idle-max (idle) or --drain-time
            (drain); scenarios run one after another
"""


class ProbeError(Exception):
    """A probe cannot run (bad option, nobody listening): one line for the user."""


@dataclass(frozen=True)
class ProbeTarget(Target):
    """A Target whose TLS server name is given apart from the Host header (which may carry a port)."""

    server_name: str = ""

    def connect(self, timeout: float):  # type: ignore[override]
        import socket

        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.server_name or self.host)
        return sock


@dataclass
class ProbeConfig:
    url: str
    host_header: str | None = None
    insecure: bool = False
    timeout: float = 10.0
    pipeline: int = 200
    big_path: str | None = None
    upload_path: str | None = None
    upload_size: int = 8 << 20
    idle_max: float = 10.0
    drain_time: float = 5.0
    drain_pause: float = 0.5
    max_bytes: int = 16 << 20
    scenarios: tuple[str, ...] = SCENARIOS

    def check(self) -> None:
        _in_range("--timeout", self.timeout, 0.5, 300)
        _in_range("--pipeline", self.pipeline, 2, 1000)
        _in_range("--upload-size", self.upload_size, 1, 64 << 20)
        _in_range("--idle-max", self.idle_max, 0.5, 120)
        _in_range("--drain-time", self.drain_time, 0.5, 60)
        _in_range("--max-bytes", self.max_bytes, 1024, 1 << 30)
        unknown = set(self.scenarios) - set(SCENARIOS)
        if unknown:
            raise ProbeError(f"unknown scenario {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(SCENARIOS)}")


def _in_range(option: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ProbeError(f"{option}={_num(value)} is out of range: expected {_num(low)} to "
                         f"{_num(high)}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass
class Verdict:
    scenario: str
    status: str          # pass, fail or skip
    outcome: str         # what the client got: "intact", "128000 of 2000000 B", ...
    ending: str          # how the connection ended: FIN, RST, "FIN, then RST", ...
    evidence: str        # one sentence: why this verdict
    elapsed: float = 0.0
    data: dict[str, object] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return SCENARIO_TITLES[self.scenario]

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "title": self.title}


@dataclass
class ProbeReport:
    url: str
    server: str
    verdicts: list[Verdict]
    elapsed: float

    @property
    def failed(self) -> bool:
        return any(v.status == FAIL for v in self.verdicts)

    def as_dict(self) -> dict[str, object]:
        return {"url": self.url, "server": self.server, "failed": self.failed,
                "elapsed": round(self.elapsed, 3),
                "scenarios": [v.as_dict() for v in self.verdicts]}


def build_target(config: ProbeConfig) -> tuple[ProbeTarget, str]:
    """The target and the default path, from the URL."""
    parts = urlsplit(config.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProbeError(f"URL {config.url!r} must look like http://host[:port]/path or https://...")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ProbeError(f"URL {config.url!r} has an invalid port") from None
    tls = None
    if parts.scheme == "https":
        tls = ssl.create_default_context()
        if config.insecure:
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        tls.set_alpn_protocols(["http/1.1"])
    netloc = parts.netloc.rpartition("@")[2]
    host_header = config.host_header or netloc
    server_name = (config.host_header or parts.hostname).rsplit(":", 1)[0].strip("[]")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return ProbeTarget(parts.hostname, port, tls, host_header, server_name), path


def _ending_text(ending: str) -> str:
    return {"FIN+RST": "FIN, then RST", "OPEN": "kept open", "CAP": "stopped at --max-bytes",
            "TIMEOUT": "no end (timeout)"}.get(ending, ending)


def _is_fin(ending: str) -> bool:
    """A clean end: FIN (possibly with stray bytes after it), never followed by RST."""
    return ending.startswith("FIN") and not ending.startswith("FIN+RST")


def _response_text(response: clients.Response | None) -> str:
    if response is None:
        return "no response"
    if response.complete:
        return f"intact ({response.status}, {response.received_length} B)"
    expected = response.expected_length
    total = f" of {expected}" if expected is not None else ""
    return f"cut ({response.status}): {response.received_length}{total} B"


def judge_pipeline(ex: clients.Exchange, count: int) -> Verdict:
    partial = ex.partial
    got = ex.complete
    if got >= count:
        where = f"answered all {count}"
    elif got == 1:
        where = f"answered 1 of {count} and closed (no keep-alive)"
    else:
        where = f"ended the connection after {got} of {count} (a request cap)"
    outcome = f"{got}/{count} intact" + (", 1 truncated" if partial else "")
    data = {"requests": count, "complete": got, "ending": ex.ending}
    if ex.ending == "CAP":
        return Verdict("pipeline", SKIP, outcome, _ending_text(ex.ending),
                       "stopped reading at --max-bytes before the server ended", data=data)
    if ex.ending == "TIMEOUT":
        return Verdict("pipeline", FAIL, outcome, _ending_text(ex.ending),
                       f"stopped answering after {got} of {count} pipelined requests without "
                       "closing", data=data)
    if ex.ending == "OPEN" and not partial:
        return Verdict("pipeline", PASS, outcome, _ending_text(ex.ending),
                       f"{where}, every response whole; {OPEN_NOTE}", data=data)
    if partial or not _is_fin(ex.ending):
        return Verdict("pipeline", FAIL, outcome, _ending_text(ex.ending),
                       f"{where}, then RST with pipelined requests unread"
                       + (": the last response was cut" if partial else ""), data=data)
    return Verdict("pipeline", PASS, outcome, "FIN", f"{where}, all whole, clean FIN",
                   data=data)


def judge_close_pipeline(ex: clients.Exchange) -> Verdict:
    response = ex.responses[0] if ex.responses else None
    data = {"ending": ex.ending, "received": response.received_length if response else 0,
            "expected": response.expected_length if response else None}
    outcome = _response_text(response)
    if ex.ending == "CAP":
        return Verdict("close-pipeline", SKIP, outcome, _ending_text(ex.ending),
                       "the response is larger than --max-bytes", data=data)
    if response is not None and response.complete and ex.ending == "OPEN":
        return Verdict("close-pipeline", PASS, outcome, _ending_text(ex.ending),
                       f"whole response; {OPEN_NOTE}", data=data)
    if response is None or not response.complete or not _is_fin(ex.ending):
        cut = "the response was cut and " if response is not None and not response.complete else ""
        return Verdict("close-pipeline", FAIL, outcome, _ending_text(ex.ending),
                       f"{cut}RST: closed with our pipelined requests unread (a plain close(), "
                       "no lingering)", data=data)
    note = ""
    if response.received_length < BIG_ENOUGH:
        note = (f"; only {response.received_length} B: truncation shows with >= 1 MB "
                "(--big-path)")
    return Verdict("close-pipeline", PASS, outcome, "FIN",
                   f"whole response, then FIN; pipelined requests drained{note}",
                   data=data)


def judge_upload(ex: clients.Exchange, size: int) -> Verdict:
    response = ex.responses[0] if ex.responses else None
    data = {"ending": ex.ending, "sent": ex.extra.get("sent"), "upload_size": size,
            "status": response.status if response else None,
            "received": response.received_length if response else 0,
            "expected": response.expected_length if response else None}
    outcome = _response_text(response)
    sent_note = f"sent {ex.extra.get('sent')} of {size} B"
    how = {"OPEN": "kept open", "FIN": "then FIN"}.get(ex.ending, _ending_text(ex.ending))
    if response is not None and response.complete and (ex.ending == "OPEN" or _is_fin(ex.ending)):
        return Verdict("upload", PASS, outcome, _ending_text(ex.ending),
                       f"answer whole ({sent_note}), connection {how}", data=data)
    if ex.ending == "CAP":
        return Verdict("upload", SKIP, outcome, _ending_text(ex.ending),
                       "the answer is larger than --max-bytes", data=data)
    if response is None and ex.ending == "TIMEOUT":
        return Verdict("upload", FAIL, outcome, _ending_text(ex.ending),
                       f"no answer within --timeout ({sent_note})", data=data)
    return Verdict("upload", FAIL, outcome, _ending_text(ex.ending),
                   f"closed with the upload unread: RST under its own answer ({sent_note}"
                   + (f"; {ex.note}" if ex.note else "") + ")",
                   data=data)


def judge_idle(ex: clients.Exchange, idle_max: float) -> Verdict:
    idle = ex.extra.get("idle_timeout")
    attempts: dict[str, str] = ex.extra.get("attempts", {})  # type: ignore[assignment]
    data = {"idle_timeout": idle, "attempts": attempts, "ending": ex.ending}
    if not ex.responses or not ex.responses[0].complete:
        return Verdict("idle", FAIL, _response_text(ex.responses[0] if ex.responses else None),
                       _ending_text(ex.ending), "the first request got no whole answer", data=data)
    if ex.ending == "TIMEOUT":
        return Verdict("idle", SKIP, f"idle > {idle_max:g} s", "kept open",
                       f"the server kept the idle connection longer than --idle-max "
                       f"({idle_max:g} s)", data=data)
    if ex.ending != "FIN":
        return Verdict("idle", FAIL, f"idle {idle} s", _ending_text(ex.ending),
                       "the server reset an idle keep-alive connection", data=data)
    shown = "; ".join(f"{name}: {_ending_text(result) if result != 'answered' else result}"
                      for name, result in attempts.items())
    idle_text = "no keep-alive" if (idle or 0) <= 0.05 else f"idle timeout {idle:.2f} s"
    outcome = ", ".join(sorted(set(attempts.values()))) or "-"
    if any("RST" in result for result in attempts.values()):
        return Verdict("idle", FAIL, idle_text, "RST",
                       f"RST for a request sent as it closed, no lingering ({shown})", data=data)
    if any(result.startswith("setup failed") for result in attempts.values()):
        return Verdict("idle", SKIP, idle_text, outcome, f"could not complete ({shown})",
                       data=data)
    return Verdict("idle", PASS, idle_text, "FIN",
                   f"answered, or a clean EOF ({shown})",
                   data=data)


def judge_drain(ex: clients.Exchange, window: float) -> Verdict:
    response = ex.responses[0] if ex.responses else None
    data = {"ending": ex.ending, **ex.extra}
    if ex.ending == "TIMEOUT" or ex.ending == "CAP":
        return Verdict("drain", SKIP, _response_text(response), _ending_text(ex.ending),
                       "the server did not close after a Connection: close response", data=data)
    if response is None or not response.complete or not ex.ending.startswith("FIN"):
        return Verdict("drain", FAIL, _response_text(response), _ending_text(ex.ending),
                       "the server reset at close with a pipelined request unread: no lingering",
                       data=data)
    drained = float(ex.extra.get("drained_for", 0.0))  # type: ignore[arg-type]
    bursts = int(ex.extra.get("bursts_sent", 0))  # type: ignore[arg-type]
    if ex.extra.get("still_draining"):
        tls = (" (TLS: no half-close; it kept reading after the response)"
               if ex.extra.get("tls") else "")
        return Verdict("drain", PASS, f"drained >= {drained:.1f} s", "FIN (we closed first)",
                       f"still reading after {drained:.1f} s, {bursts} bursts "
                       f"{ex.extra.get('pause')} s apart{tls}", data=data)
    if bursts <= 1:
        why = ("RST at the first bytes after its FIN: stops reading once nothing is pending "
               "(no lingering, or lighttpd's FIONREAD bug)")
    else:
        why = (f"stopped reading {drained:.1f} s after its FIN while the client still sent "
               f"({bursts} bursts), then RST; expected >= {window:g} s (--drain-time)")
    return Verdict("drain", FAIL, f"drained {drained:.1f} s", "FIN, then RST", why, data=data)


def _pipeline_count(config: ProbeConfig, body_size: int) -> int:
    """Keep N pipelined responses within --max-bytes."""
    return max(2, min(config.pipeline, config.max_bytes // max(body_size, 1)))


def run_probe(config: ProbeConfig, progress: Callable[[str], None] | None = None) -> ProbeReport:
    config.check()
    target, path = build_target(config)
    big_path = config.big_path or path
    upload_path = config.upload_path or path
    started = time.monotonic()
    try:
        first = clients.preflight(target, path, config.timeout, config.max_bytes)
    except (OSError, ssl.SSLError) as exc:
        raise ProbeError(f"cannot reach {config.url}: {exc}") from None
    if not first.responses or not first.responses[0].status:
        raise ProbeError(f"{config.url} did not answer an HTTP/1.1 GET within {config.timeout:g} s "
                         f"(connection ended: {_ending_text(first.ending)})")
    server = first.responses[0].header("server") or "?"
    count = _pipeline_count(config, first.responses[0].received_length)
    runs: dict[str, Callable[[], Verdict]] = {
        "pipeline": lambda: judge_pipeline(
            clients.pipeline(target, path, count, config.timeout, config.max_bytes), count),
        "close-pipeline": lambda: judge_close_pipeline(
            clients.close_pipeline(target, big_path, 5, config.timeout, config.max_bytes)),
        "idle": lambda: judge_idle(
            clients.idle_close(target, path, config.idle_max, config.timeout, config.max_bytes),
            config.idle_max),
        "upload": lambda: judge_upload(
            clients.upload(target, upload_path, config.upload_size, config.timeout,
                           config.max_bytes), config.upload_size),
        "drain": lambda: judge_drain(
            clients.drain_after_fin(target, path, config.drain_time, config.drain_pause, 16,
                                    config.timeout, config.max_bytes), config.drain_time),
    }
    verdicts = []
    for name in SCENARIOS:
        if name not in config.scenarios:
            continue
        if progress:
            progress(name)
        at = time.monotonic()
        try:
            verdict = runs[name]()
        except (OSError, ssl.SSLError) as exc:
            verdict = Verdict(name, FAIL, "-", "error", f"connection failed: {exc}")
        verdict.elapsed = round(time.monotonic() - at, 3)
        verdicts.append(verdict)
    return ProbeReport(config.url, server, verdicts, time.monotonic() - started)


STATUS_STYLE = {PASS: "bold green", FAIL: "bold red", SKIP: "yellow"}


def render_report(report: ProbeReport, console: object | None = None) -> None:
    """A readable table (rich when installed, plain text otherwise)."""
    try:
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the diagnostics extra
        print(plain_report(report))
        return
    if console is None:
        console = table_console()
    table = Table(title=f"graceful-close probe {report.url}  (server: {report.server})",
                  title_justify="left", show_lines=True)
    table.add_column("scenario", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("client got", max_width=24)
    table.add_column("ending", no_wrap=True)
    table.add_column("evidence", overflow="fold")
    for v in report.verdicts:
        table.add_row(v.title, f"[{STATUS_STYLE[v.status]}]{v.status.upper()}[/]", v.outcome,
                      v.ending, v.evidence)
    console.print(table)  # type: ignore[attr-defined]
    failed = sum(v.status == FAIL for v in report.verdicts)
    summary = (f"[bold red]{failed} scenario(s) failed[/]" if failed
               else "[bold green]no scenario failed[/]")
    console.print(f"{summary} in {report.elapsed:.1f} s")  # type: ignore[attr-defined]


def plain_report(report: ProbeReport) -> str:
    lines = [f"graceful-close probe {report.url} (server: {report.server})"]
    for v in report.verdicts:
        lines.append(f"{v.status.upper():5} {v.title}: {v.outcome}; {v.ending}; {v.evidence}")
    return "\n".join(lines)
