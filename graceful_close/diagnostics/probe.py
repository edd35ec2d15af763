"""`graceful-close probe URL`: does a server end HTTP/1.1 connections without losing bytes?

Runs the black-box clients of probe_clients against one URL and turns what they
saw into a verdict per scenario with the evidence:

  PASS           the server did what the scenario needs and no byte was lost
  FAIL           a response was cut, or RST hit a connection the server closed with
                 our input unread (bytes in flight are destroyed), or pipelined
                 requests were never answered on a connection left open: exit status 1
  WARN           no response byte lost, but an end a client must treat as an error:
                 ECONNRESET at the idle timeout, a connection never ended, or
                 pipelined requests dropped without an answer (exit status stays 0)
  NOT EXERCISED  the server did not do what the scenario needs (no early answer, an
                 error status, a response too small, no keep-alive, no close within
                 the limits); the evidence says which option would exercise it

Every verdict follows from what a conforming client (RFC 9112) would see, and every
client is one: no request after a Connection: close of ours, nor after reading an
answer that ends the connection. A finding comes with a hint: what in the server
causes it and what cures it, naming our class where graceful-close supports the
server. Safe for a production server: every scenario is bounded in requests, bytes
and time (see PROBE_LIMITS).
"""

from __future__ import annotations

import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import probe_clients as clients
from .console import console_for_table
from .scenarios import Target

if TYPE_CHECKING:
    from rich.console import Console

SCENARIOS = ("pipeline", "close-pipeline", "idle", "upload", "drain")
SCENARIO_TITLES = {
    "pipeline": "pipelined requests",
    "close-pipeline": "server closes + pipelined",
    "idle": "request at idle timeout",
    "upload": "early answer to upload",
    "drain": "drain after answer",
}
PASS, FAIL, WARN, NOT_EXERCISED = "pass", "fail", "warn", "not-exercised"
OPEN_NOTE = ("the server then kept the connection open (a lingering server on TLS, which "
             "cannot half-close, waits for the client to close first)")
BIG_ENOUGH = 1_000_000  # below this a response fits in the socket buffers: truncation hides
FOLLOW = 5              # GETs pipelined behind the request the server closes after
IDLE_OFFSETS = (-0.005, 0.0)
# Issue 19: --idle-max must not be a common keep-alive timeout, or the idle verdict flips
# from run to run on servers that use it. Common ones: gunicorn 2 s; uvicorn, hypercorn,
# Apache, Node.js, lighttpd 5 s; 10 s (and 9.3-11 s) on several servers; HAProxy and
# Tomcat/Puma setups 15-20 s; Jetty 30 s; ALB 60 s; nginx 75 s; waitress 120 s. 13 s is
# 18 % above 11 s and 13 % below 15 s: a server at 10 s is measured (its close comes 3 s
# before we stop waiting), one at 15 s is reported as above --idle-max, neither flips.
IDLE_MAX_DEFAULT = 13.0
COMMON_IDLE_TIMEOUTS = (2, 5, 10, 15, 20, 30, 60, 65, 75, 120)
MAX_REQUESTS_BEYOND_PIPELINE = (1 + 2 * (1 + FOLLOW) + 2 + 2 * len(IDLE_OFFSETS) + 2 + 1)
SERVER_FAMILIES = ("nginx", "apache", "gunicorn", "uvicorn", "hypercorn", "waitress")

PROBE_LIMITS = f"""\
Limits (safe to point at a production server):
  requests  at most --pipeline + {MAX_REQUESTS_BEYOND_PIPELINE}: 1 preflight GET; --pipeline GETs (<= 1000,
            fewer when N x response size would pass --max-bytes); {2 * (1 + FOLLOW)} GETs (close-pipeline:
            twice 1 + {FOLLOW}); {2 + 2 * len(IDLE_OFFSETS)} GETs (idle); 1 POST + at most 1 GET (upload);
            1 HTTP/1.0 POST (drain)
  uploads   upload: --upload-size (<= 64 MiB) throw-away bytes to --upload-path (default:
            the URL's path); drain: at most 64 KiB every 0.5 s for --drain-time, never past
            --upload-size. Point --upload-path at an endpoint that rejects a large body early
            (any small body limit), or --skip upload,drain
  bytes     at most --max-bytes of response body read per scenario
  parallel  at most 2 connections open at once (idle), otherwise 1
  time      each scenario ends within 2 x --timeout + 5 s, plus 2 x --idle-max (idle; at most
            2 x (a Keep-Alive: timeout= the server announces + 1 s)), --idle-max + 2 s
            (upload) or --drain-time + 2 s (drain); scenarios run one after another
"""


class ProbeError(Exception):
    """A probe cannot run (bad option, nobody listening): one line for the user."""


@dataclass(frozen=True)
class ProbeTarget(Target):
    """A Target whose TLS server name is given apart from the Host header (which may carry a port)."""

    server_name: str = ""

    def tls_server_name(self) -> str:
        return self.server_name or self.host


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
    idle_max: float = IDLE_MAX_DEFAULT
    drain_time: float = 5.0
    drain_pause: float = 0.5
    max_bytes: int = 16 << 20
    scenarios: tuple[str, ...] = SCENARIOS
    close_path: str | None = None

    def check(self) -> None:
        _in_range("--timeout", self.timeout, 0.5, 300)
        _in_range("--pipeline", self.pipeline, 2, 1000)
        _in_range("--upload-size", self.upload_size, 1, 64 << 20)
        _in_range("--idle-max", self.idle_max, 0.5, 120)
        _in_range("--drain-time", self.drain_time, 0.5, 60)
        _in_range("--max-bytes", self.max_bytes, 1024, 1 << 30)
        for option, path in (("--big-path", self.big_path), ("--close-path", self.close_path),
                             ("--upload-path", self.upload_path)):
            if path is not None and not path.startswith("/"):
                raise ProbeError(f"{option}={path!r} must start with '/' (a path on the URL's "
                                 "server, like /static/big.bin)")
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
    status: str          # pass, fail, warn or not-exercised
    outcome: str         # what the client got: "intact (200, 2000000 B)", "cut (200): ...", ...
    ending: str          # how the connection ended: FIN, RST, "FIN, then RST", ...
    evidence: str        # what happened and what it means
    elapsed: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)  # JSON-ready details
    finding: str = ""    # a short key for what was found: lingered, in-flight-reset, ...
    hint: str = ""       # for a finding: what in the server causes it, and what cures it

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

    def count(self, status: str) -> int:
        return sum(v.status == status for v in self.verdicts)

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
    if response.length_unknown:
        return (f"{response.status}, {response.received_length} B, then "
                f"{_ending_text(response.ended_by or '?')} (length unknown)")
    return f"cut ({response.status}): {response.received_length} of {response.expected_length} B"


def _statuses(ex: clients.Exchange) -> str:
    """Every status the server answered, e.g. '200 x199, 503'."""
    counts = Counter(r.status for r in ex.responses)
    return ", ".join(f"{status} x{n}" if n > 1 else str(status) for status, n in counts.items())


def _error_status(response: clients.Response | None) -> bool:
    return response is not None and not 100 <= response.status < 400


def _size(response: clients.Response) -> int:
    """The size the response promised (Content-Length), or what arrived of it."""
    return response.expected_length if response.expected_length is not None \
        else response.received_length


def server_family(server: str) -> str | None:
    """nginx, apache, gunicorn, ... from the Server header; None for a server we do not know."""
    name = server.strip().lower()
    return next((family for family in SERVER_FAMILIES if name.startswith(family)), None)


LINGERING_CLOSE = ("a lingering close cures it: after the answer, shut down only the sending "
                   "side (FIN), read and discard what the client still sends until its EOF or "
                   "a timeout, then close. Look for such a setting of the server, or put a "
                   "server that lingers in front of it")
OUR_CLASSES = {
    "gunicorn": "graceful-close supports gunicorn: run the graceful_close.gunicorn worker class "
                "of your worker type (-k graceful_close.gunicorn.ThreadWorker for gthread; "
                "ASGIWorker, GeventWorker, UvicornWorker: see the README's table)",
    "uvicorn": "graceful-close supports uvicorn: --http graceful_close.uvicorn:AutoHTTPProtocol "
               "(or -k graceful_close.gunicorn.UvicornWorker under gunicorn)",
    "hypercorn": "graceful-close supports hypercorn: hypercorn -c python:graceful_close.hypercorn "
                 "module:app (or graceful_close.hypercorn.serve in place of hypercorn.asyncio.serve)",
    "waitress": "graceful-close supports waitress: python -m graceful_close.waitress module:app "
                "(waitress-serve's options), or graceful_close.waitress.serve / create_server",
}
CAUSES = {  # finding -> what the server does that causes it
    "no-linger": "the server closes the connection with our pipelined requests unread (a "
                 "plain close()), and its kernel answers them with RST",
    "in-flight-reset": "the server closes the connection as soon as nothing is pending, and "
                       "requests still on their way meet a socket that no longer exists: RST",
    "never-lingers": "the server closes the connection with the client's bytes unread (a plain "
                     "close()), and its kernel answers them with RST",
    "answer-destroyed": "the server closes the connection with the rest of the upload unread "
                        "(a plain close()), and its kernel answers it with RST",
    "short-linger": "the server stops reading too soon after its answer, while the client "
                    "still sends",
    "reset-at-idle": "the server ends idle keep-alive connections with a plain close(), so a "
                     "request that arrives as it closes meets RST",
    "kept-open": "after an early answer the server keeps the connection open past its own "
                 "idle timeout: it no longer ends it",
    "dropped-requests": "the server reads pipelined requests and answers only some of them",
    "stalled": "the server stops answering pipelined requests without closing",
}
CURES = {  # finding -> what to change, in general terms
    "short-linger": "linger longer: keep reading until the client's EOF, with a timeout of "
                    "seconds between reads and tens of seconds in all (nginx: 5 s and 30 s)",
    "reset-at-idle": "a lingering close of idle connections cures it: FIN first, then read "
                     "until the client's EOF, so that a late request meets a clean EOF, which "
                     "clients retry",
    "kept-open": "end such a connection at the idle timeout like any other, or answer the "
                 "early answer with Connection: close and end the connection with a lingering "
                 "close",
    "dropped-requests": "answer every request read, in order, or send Connection: close on "
                        "the last answer and then close with a lingering close",
    "stalled": "answer every request read, or send Connection: close and close",
}


def hint(server: str, finding: str) -> str:
    """For a WARN or FAIL: the behaviour of the server that causes it, and what cures it."""
    cause = CAUSES.get(finding)
    if cause is None:
        return ""
    family = server_family(server)
    if family == "nginx" and finding in ("in-flight-reset", "no-linger", "never-lingers",
                                         "answer-destroyed"):
        cure = ("nginx: `lingering_close always` lingers for input still in flight too "
                "(the default `on` lingers only on input already pending)")
    elif family in OUR_CLASSES and finding not in ("dropped-requests", "stalled"):
        cure = OUR_CLASSES[family]
    else:
        cure = CURES.get(finding, LINGERING_CLOSE)
    return f"{cause}; {cure}"


def small_limit_hint(server: str) -> str:
    """How to exercise the upload scenarios: an endpoint that answers before reading a body."""
    specific = {"nginx": "nginx: client_max_body_size 1k; in a location",
                "apache": "Apache: LimitRequestBody 1024 in a <Location>",
                "waitress": "waitress: --max-request-body-size=1024"}.get(
                    server_family(server) or "")
    return ("point --upload-path at an endpoint that answers a large body before reading it: "
            "any small request-body limit, or an authentication check answering 401"
            + (f" ({specific})" if specific else ""))


def idle_hint(server: str) -> str:
    """How to exercise the idle scenario: wait past the server's keep-alive idle timeout."""
    default = {"nginx": "nginx keepalive_timeout: 75 s by default",
               "apache": "Apache KeepAliveTimeout: 5 s by default",
               "uvicorn": "uvicorn --timeout-keep-alive: 5 s by default",
               "gunicorn": "gunicorn --keep-alive: 2 s by default",
               "hypercorn": "hypercorn --keep-alive: 5 s by default",
               "waitress": "waitress channel_timeout: 120 s by default"}.get(
                   server_family(server) or "")
    return ("pass --idle-max above the server's keep-alive idle timeout"
            + (f" ({default})" if default else ""))


def judge_pipeline(ex: clients.Exchange, count: int, path: str, server: str = "") -> Verdict:
    partial = ex.partial
    got = ex.complete
    signal = ex.extra.get("closing_answer")
    if got >= count:
        where = f"answered all {count}"
    elif signal and got == 1:
        where = f"answered 1 of {count}, with {signal} (no keep-alive)"
    elif signal:
        where = f"answered {got} of {count}, the last with {signal} (a request cap)"
    else:
        where = f"answered {got} of {count} without Connection: close"
    outcome = f"{got}/{count} intact ({_statuses(ex) or 'no status'})" + (
        ", 1 truncated" if partial else "")
    ending = _ending_text(ex.ending)
    data = {"requests": count, "complete": got, "ending": ex.ending,
            "statuses": [r.status for r in ex.responses], "note": ex.note,
            "closing_answer": signal}

    def verdict(status: str, text: str, finding: str, shown: str = ending) -> Verdict:
        return Verdict("pipeline", status, outcome, shown, text, data=data, finding=finding,
                       hint=hint(server, finding) if status in (FAIL, WARN) else "")

    if ex.ending == "CAP":
        return verdict(NOT_EXERCISED, "stopped reading at --max-bytes before the server ended",
                       "byte-cap")
    if _error_status(ex.first):
        return verdict(NOT_EXERCISED, f"the server answered GET {path} with an error status: "
                       "the scenario needs a URL whose GET succeeds", "error-status")
    if ex.ending == "TIMEOUT":
        return verdict(FAIL, f"{where}, then stopped answering without closing: the client "
                       "waits for answers that never come", "stalled")
    if ex.ending == "OPEN" and not partial:
        note = OPEN_NOTE if got >= count else (
            f"it then kept the connection open, waiting for us to close: a conforming client "
            f"closes after {signal} and sends the other requests again on a new connection; "
            "nothing was lost")
        return verdict(PASS, f"{where}, every response whole; {note}", "lingered")
    if partial or not _is_fin(ex.ending):
        lost = ("the last response was cut: RST destroyed its bytes in flight" if partial else
                "every response before it arrived whole (they are small); a larger one still "
                "in flight would have been destroyed")
        return verdict(FAIL, f"{where}, then RST with our pipelined requests unread: it does "
                       f"not linger when it closes; {lost}", "no-linger")
    if got >= count:
        return verdict(PASS, f"{where}, all whole, clean FIN", "lingered", "FIN")
    if signal:
        return verdict(PASS, f"{where}, every answer whole, then a clean FIN and no RST: it did "
                       "not reset our later requests (it read them, or still reads them); a "
                       "conforming client sends them again on a new connection", "lingered",
                       "FIN")
    return verdict(WARN, f"{where}: every answer whole, then it ended the connection with a "
                   f"clean FIN, leaving {count - got} of our pipelined requests without an "
                   "answer and without saying Connection: close. No byte was lost, but the client sees "
                   "the connection end under requests it sent and must send them again, which "
                   "is safe only for idempotent ones", "dropped-requests", "FIN")


def _attempt(ex: clients.Exchange, tls: bool, http10: bool = True) -> tuple[str, str]:
    """One close-pipeline attempt: ('ok' | 'rst' | 'not', why when 'not')."""
    response = ex.first
    if ex.ending == "CAP":
        return "not", "the response is larger than --max-bytes"
    if response is None:
        if ex.ending.startswith(("RST", "FIN+RST")):
            return "rst", ""
        return "not", f"no answer ({_ending_text(ex.ending)})"
    if _error_status(response):
        return "not", f"it answered {response.status}, an error status"
    if not response.complete and ex.ending in ("TIMEOUT", "OPEN"):
        return "not", (f"its answer did not end within --timeout ({_response_text(response)}) "
                       "and the connection stayed open")
    if response.complete and _size(response) < BIG_ENOUGH:  # a cut response lost bytes anyway
        return "not", (f"the response has only {_size(response)} B: one that fits in the socket "
                       f"buffers cannot show truncation; use a path to any static file of at "
                       f"least 1 MB")
    signal = response.close_signal(http10)
    behind = int(ex.extra.get("answered_behind") or 0)
    if response.complete and behind:
        if signal:
            return "not", (f"it answered {behind} of the GETs pipelined behind its own "
                           f"{signal}, so nothing was left unread when the connection ended")
        return "not", (f"it kept the connection alive (no Connection: close) and answered "
                       f"{behind} of the GETs pipelined behind")
    if response.complete and ex.ending == "OPEN":
        if tls or signal:  # it waits for the client to close: nothing is lost
            return "ok", ""
        return "not", ("the server kept the connection open after its answer (no "
                       "Connection: close)")
    if response.complete and _is_fin(ex.ending):
        return "ok", ""
    return "rst", ""


def _attempt_text(ex: clients.Exchange) -> str:
    return f"{_response_text(ex.first)}, {_ending_text(ex.ending)}"


def _lost_text(ex: clients.Exchange) -> str:
    response = ex.first
    if response is None:
        return "RST destroyed the whole response"
    if response.complete:
        return "RST after the whole response (no byte lost this time)"
    if response.length_unknown:
        return (f"the response ended by {_ending_text(response.ended_by or ex.ending)} after "
                f"{response.received_length} B, length unknown (no Content-Length): the "
                "client cannot even tell that bytes were lost")
    return (f"RST destroyed the bytes in flight ({response.received_length} of "
            f"{_size(response)} B arrived)")


def judge_close_pipeline(same: clients.Exchange, late: clients.Exchange, request: str,
                         server: str, tls: bool, http10: bool = True) -> Verdict:
    """Two attempts: pipelined GETs in the same write as the request, and 50 ms later."""
    same_kind, same_why = _attempt(same, tls, http10)
    late_kind, late_why = _attempt(late, tls, http10)
    worst = late if late_kind == "rst" or same_kind != "rst" else same
    response = worst.first
    queued = late.extra.get("queued_at_follow")
    data: dict[str, object] = {
        "request": request, "ending": worst.ending,
        "status": response.status if response else None,
        "received": response.received_length if response else 0,
        "expected": response.expected_length if response else None,
        "same_write": {"status": same.first.status if same.first else None,
                       "received": same.first.received_length if same.first else 0,
                       "ending": same.ending, "result": same_kind,
                       "answered_behind": same.extra.get("answered_behind"),
                       "closing_answer": same.extra.get("closing_answer")},
        "in_flight": {"status": late.first.status if late.first else None,
                      "received": late.first.received_length if late.first else 0,
                      "ending": late.ending, "result": late_kind,
                      "queued_at_follow": queued,
                      "answered_behind": late.extra.get("answered_behind"),
                      "closing_answer": late.extra.get("closing_answer")}}
    outcome = f"same write: {_attempt_text(same)}; in flight: {_attempt_text(late)}"
    ending = _ending_text(worst.ending)
    late_how = (f"sent {clients.FOLLOW_GAP * 1000:.0f} ms later, while the response was "
                "arriving" + (f" ({queued} B in)" if queued else ""))

    def verdict(status: str, text: str, finding: str, shown: str = ending) -> Verdict:
        return Verdict("close-pipeline", status, outcome, shown, text, data=data,
                       finding=finding, hint=hint(server, finding) if status == FAIL else "")

    if late_kind == "rst" and same_kind == "not":
        return verdict(FAIL, f"{request}: GETs {late_how} reached it after it had closed: "
                       f"{_lost_text(late)}. With the GETs in the same write {same_why}, so "
                       "whether it lingers on input already pending was not exercised",
                       "in-flight-reset")
    if same_kind == "not" or late_kind == "not":
        why = same_why or late_why
        return verdict(NOT_EXERCISED, f"{request}, {FOLLOW} GETs pipelined behind it: {why}",
                       "not-exercised")
    if same_kind == "ok" and late_kind == "ok":
        if _is_fin(same.ending) and _is_fin(late.ending):
            return verdict(PASS, f"{request} closed the connection with {FOLLOW} GETs "
                           f"pipelined behind it; it lingered both when they arrived in the "
                           f"same write as the request and when they were {late_how}: whole "
                           f"response, clean FIN", "lingered", "FIN")
        why = ("on TLS a server cannot half-close" if tls else "it waits for the client to "
               "close after an answer that ends the connection")
        return verdict(PASS, f"{request}, {FOLLOW} GETs pipelined behind it, in the same write "
                       f"and {late_how}: whole response each time and no RST; it ended the "
                       f"connection only once we closed ({why}): a conforming client closes "
                       "then, nothing is lost", "lingered", "no RST (we closed first)")
    if same_kind == "ok":
        return verdict(FAIL, f"{request}: GETs pipelined in the same write were read before it "
                       f"closed (whole response, FIN); GETs {late_how} reached it after it had "
                       f"closed: {_lost_text(late)}. It does not linger for input still in "
                       f"flight, as a WAN client's pipelined requests often are.",
                       "in-flight-reset")
    return verdict(FAIL, f"{request}: it closed with our pipelined GETs unread although they "
                   f"arrived in the same write as the request: {_lost_text(same)}. It does not "
                   f"linger (a plain close()); GETs {late_how}: {_attempt_text(late)}",
                   "never-lingers")


IDLE_MEANING = ("the client gets ECONNRESET instead of a clean EOF. No response byte is lost "
                "(that request was never answered), so this is weaker than truncation, but a "
                "client that retries only on EOF reports an error")
ATTEMPT_RESULTS = {
    "answered": "was answered",
    "FIN": "met a clean close (EOF), which a client retries",
    "FIN+RST": "met a close (EOF), then a reset (RST)",
    "RST": "was reset (RST)",
    "TIMEOUT": "got neither an answer nor a close within --timeout",
    "no result": "got no result in time",
}


def _attempt_when(name: str, idle: float | None) -> str:
    """'after its FIN', '-5 ms', '+0 ms' (the keys of data['attempts']) in words."""
    if name == "after its FIN":
        return ("right after the server closed the connection (its FIN had arrived, as for a "
                "pooled client that has not noticed it yet)")
    offset = float(name.split()[0])
    timeout = f"{idle:.2f} s idle timeout" if idle else "idle timeout"
    if offset == 0:
        return f"at its {timeout}"
    return f"{abs(offset):g} ms {'before' if offset < 0 else 'after'} its {timeout}"


def idle_attempts_text(attempts: dict[str, str], idle: float | None) -> str:
    """What each request sent on an idle keep-alive connection met, in words."""
    parts = []
    for name, result in attempts.items():
        met = ATTEMPT_RESULTS.get(result)
        if met is None:
            met = result if result.startswith("not sent") else f"could not be tried ({result})"
        parts.append(f"the request sent {_attempt_when(name, idle)} {met}")
    return "; ".join(parts)


def judge_idle(ex: clients.Exchange, idle_max: float, path: str, server: str = "") -> Verdict:
    idle = ex.extra.get("idle_timeout")
    announced = ex.extra.get("announced")
    attempts: dict[str, str] = ex.extra.get("attempts", {})
    first = ex.first
    no_keep_alive = ex.extra.get("no_keep_alive")
    data = {"idle_timeout": idle, "announced": announced, "attempts": attempts,
            "ending": ex.ending, "status": first.status if first else None,
            "no_keep_alive": no_keep_alive}
    source = ("announced by Keep-Alive: timeout=" if announced is not None else "measured")

    def verdict(status: str, outcome: str, ending: str, text: str, finding: str) -> Verdict:
        return Verdict("idle", status, outcome, ending, text, data=data, finding=finding,
                       hint=hint(server, finding) if status == WARN else "")

    if first is None or not first.complete:
        return verdict(NOT_EXERCISED, _response_text(first), _ending_text(ex.ending),
                       "the first request got no whole answer", "not-exercised")
    if _error_status(first):
        return verdict(NOT_EXERCISED, _response_text(first), _ending_text(ex.ending),
                       f"the server answered GET {path} with an error status", "error-status")
    if no_keep_alive:
        how = {"OPEN": "kept the connection open until we closed"}.get(
            ex.ending, f"ended the connection ({_ending_text(ex.ending)})")
        return verdict(NOT_EXERCISED, f"{first.status}, no keep-alive", _ending_text(ex.ending),
                       f"the server does not keep connections alive: its answer to GET {path} "
                       f"carried {no_keep_alive}, then it {how}. A conforming client sends no "
                       "other request on such a connection (RFC 9112 section 9.6), so none can "
                       "arrive at an idle timeout; we sent nothing after its answer",
                       "no-keep-alive")
    if ex.ending == "ANNOUNCED" and announced is not None:
        return verdict(NOT_EXERCISED, f"{first.status}, Keep-Alive: timeout={announced:g}",
                       "not tried",
                       f"the server announces an idle timeout of {announced:g} s, above "
                       f"--idle-max {idle_max:g}: pass --idle-max {announced + 2:g} to test it "
                       f"(takes about {2 * announced:g} s)", "idle-above-max")
    if ex.ending == "TIMEOUT":
        waited = f"{announced + clients.IDLE_SLACK:g}" if announced is not None else f"{idle_max:g}"
        why = (f"announced Keep-Alive: timeout={announced:g} but kept the idle connection "
               f"open longer than {waited} s" if announced is not None else
               f"kept an idle connection open longer than --idle-max ({idle_max:g} s) and "
               f"sent no Keep-Alive: timeout=; {idle_hint(server)}")
        return verdict(NOT_EXERCISED, f"{first.status}, idle > {waited} s", "kept open", why,
                       "idle-above-max")
    if ex.ending != "FIN":
        return verdict(WARN, f"{first.status}, idle {idle} s", _ending_text(ex.ending),
                       f"the server reset an idle keep-alive connection instead of closing "
                       f"it with FIN: {IDLE_MEANING}", "reset-at-idle")
    shown = idle_attempts_text(attempts, idle if (idle or 0) > 0.05 else None)
    idle_text = f"{first.status}, " + ("closed at once" if (idle or 0) <= 0.05
                                       else f"idle timeout {idle:.2f} s ({source})")
    outcome = ", ".join(sorted(set(attempts.values()))) or "-"
    if any("RST" in result for result in attempts.values()):
        return verdict(WARN, idle_text, "RST",
                       f"requests sent on idle keep-alive connections as the server closed "
                       f"them: {shown}. It does not linger when it ends an idle connection: "
                       f"{IDLE_MEANING}", "reset-at-idle")
    if any(not result.startswith(("answered", "FIN")) for result in attempts.values()):
        return verdict(NOT_EXERCISED, idle_text, outcome, f"could not complete: {shown}",
                       "not-exercised")
    return verdict(PASS, idle_text, "FIN",
                   f"requests sent on idle keep-alive connections as the server closed them "
                   f"were answered or met a clean EOF, which a client retries: {shown}",
                   "lingered")


def judge_upload(ex: clients.Exchange, size: int, path: str, hold_reason: str,
                 server: str = "", idle_known: bool = True) -> Verdict:
    """`hold_reason`: what we waited past for the end after an early answer; `idle_known`:
    whether that is the server's own idle timeout (measured), not only --idle-max."""
    response = ex.first
    sent = ex.extra.get("sent")
    open_for = float(ex.extra.get("open_for") or 0.0)
    following = ex.extra.get("next")
    signal = ex.extra.get("closing_answer")
    answered_after = ex.extra.get("answered_after")
    data = {"ending": ex.ending, "sent": sent, "upload_size": size,
            "status": response.status if response else None,
            "received": response.received_length if response else 0,
            "expected": response.expected_length if response else None,
            "open_for": open_for, "next": following, "note": ex.note,
            "answered_after": answered_after, "closing_answer": signal}
    outcome = _response_text(response)
    ending = _ending_text(ex.ending)
    sent_note = f"we sent {sent} of {size} B" + (f"; {ex.note}" if ex.note else "")
    # Early: the answer was readable while we still sent, or sending stopped (a reset, or
    # the server no longer read). Only then does the scenario test anything.
    early = answered_after is not None or bool(ex.note)
    when = (f"after {answered_after} of {size} B" if answered_after is not None
            else "while sending stopped" if ex.note else "")

    def verdict(status: str, text: str, finding: str, shown: str = ending) -> Verdict:
        return Verdict("upload", status, outcome, shown, text, data=data, finding=finding,
                       hint=hint(server, finding) if status in (FAIL, WARN) else "")

    if ex.ending == "CAP":
        return verdict(NOT_EXERCISED, "the answer is larger than --max-bytes", "byte-cap")
    if response is None:
        if ex.ending in ("RST", "FIN+RST"):
            return verdict(FAIL, f"reset with no answer at all ({sent_note}): RST destroyed "
                           "whatever it answered", "answer-destroyed")
        return verdict(NOT_EXERCISED, f"no answer to a POST of {size} B to {path} "
                       f"({sent_note}); {small_limit_hint(server)}", "no-early-answer")
    if not response.complete and ex.ending == "TIMEOUT":
        return verdict(NOT_EXERCISED, f"its answer did not end within --timeout ({sent_note})",
                       "not-exercised")
    if not response.complete or ex.ending.startswith(("RST", "FIN+RST")):
        lost = (_lost_text(ex) if not response.complete else
                "RST after the whole answer (no byte lost this time; a client still sending "
                "would lose it)")
        answered = f"answered {response.status} early" if early else \
            f"answered {response.status}"
        return verdict(FAIL, f"{answered} and closed with our upload unread ({sent_note}): "
                       f"{lost}", "answer-destroyed")
    if not early:
        then = ("" if following is None else
                f"; it {following} to a next request on it" if following.startswith("answered")
                else f"; a next request on it got {following}")
        what = ("an error status" if response.status >= 500 else
                "it took the whole upload: no early answer")
        return verdict(NOT_EXERCISED, f"answered {response.status} to a POST of {size} B to "
                       f"{path} only once the whole upload was sent ({what}{then}); "
                       f"{small_limit_hint(server)}", "no-early-answer")
    if _is_fin(ex.ending):
        return verdict(PASS, f"early {response.status} whole ({when}; {sent_note}), then a "
                       f"clean FIN {open_for:.1f} s later and no RST: it read the rest of the "
                       "upload", "lingered", "FIN")
    if signal:
        return verdict(PASS, f"early {response.status} whole ({when}; {sent_note}) with "
                       f"{signal}; it then waited for us to close (no FIN of its own within "
                       f"{open_for:.1f} s), without a reset: a conforming client closes after "
                       "such an answer, nothing is lost. We sent nothing after its answer",
                       "lingered", "no RST (we closed first)")
    if following is None:
        then = "it no longer read our upload"
    elif following.startswith("answered"):
        then = f"it {following} to a next request on it"
    else:
        then = f"a next request on it got {following}"
    if not idle_known:
        return verdict(NOT_EXERCISED, f"early {response.status} whole ({when}; {sent_note}), "
                       f"then the connection stayed open: kept open >= {open_for:.1f} s, "
                       f"{hold_reason}; the idle timeout was not reached ({then}), so whether "
                       f"it ever ends the connection was not observed; {idle_hint(server)}",
                       "idle-above-max", f"kept open >= {open_for:.1f} s")
    return verdict(WARN, f"early {response.status} whole ({when}; {sent_note}), then it kept "
                   f"the connection open {open_for:.1f} s, past {hold_reason} ({then}): it "
                   "does not end it; a client that waits for the end waits until its own "
                   "timeout, and the server holds the connection as long", "kept-open",
                   f"kept open {open_for:.1f} s")


def judge_drain(ex: clients.Exchange, window: float, path: str, server: str = "") -> Verdict:
    """What counts is that the answer came while the upload was still being sent (any
    status): the scenario sees whether the server keeps reading after it."""
    response = ex.first
    data: dict[str, object] = {"ending": ex.ending,
                               "status": response.status if response else None, **ex.extra}
    outcome = _response_text(response)
    request = f"an HTTP/1.0 POST to {path}"

    def verdict(status: str, shown: str, text: str, finding: str,
                out: str = outcome) -> Verdict:
        return Verdict("drain", status, out, shown, f"{request}: {text}", data=data,
                       finding=finding, hint=hint(server, finding) if status == FAIL else "")

    if ex.ending in ("TIMEOUT", "CAP") or (response is None and _is_fin(ex.ending)):
        why = {"TIMEOUT": "no early answer within --timeout after the first bytes of its "
                          f"body (the server waits for all of it); {small_limit_hint(server)}"
                          if response is None else "its answer did not end within --timeout",
               "CAP": "the answer is larger than --max-bytes"}.get(
                   ex.ending, "it closed without an answer")
        return verdict(NOT_EXERCISED, _ending_text(ex.ending), why, "not-exercised")
    if response is not None and ex.extra.get("answered_early") is False:
        return verdict(NOT_EXERCISED, _ending_text(ex.ending),
                       f"answered {response.status} only once the whole body was sent (it is "
                       f"no larger than one chunk): pass a larger --upload-size",
                       "no-early-answer")
    if response is None or "still_draining" not in ex.extra:
        return verdict(FAIL, _ending_text(ex.ending),
                       "it closed with our upload unread and reset the connection under its "
                       f"answer ({_lost_text(ex)}): it never lingers", "never-lingers")
    drained = float(ex.extra.get("drained_for", 0.0))
    bursts = int(ex.extra.get("bursts_sent", 0))
    fin_after = ex.extra.get("fin_after")
    sent = ex.extra.get("sent")
    since = "its FIN" if fin_after is not None else f"its {response.status}"
    if ex.extra.get("still_draining"):
        if fin_after is None:
            how = (f"no RST: it had not closed when we stopped, {drained:.1f} s after its "
                   f"{response.status} ({sent} B sent; it reads the body before closing)")
            if ex.extra.get("tls"):
                how += "; TLS: no half-close"
        else:
            how = (f"it closed {fin_after:.1f} s after its {response.status} (FIN) and still "
                   f"read our upload {drained:.1f} s later")
        return verdict(PASS, "no RST (we closed first)",
                       f"we kept sending the upload after its early {response.status}, "
                       f"{bursts} chunks {ex.extra.get('pause')} s apart; {how}", "lingered",
                       f"{response.status}, drained >= {drained:.1f} s")
    if bursts <= 1 and fin_after is None:
        why = (f"it reset the connection right after its {response.status}, with our upload "
               "unread: it never lingers")
        finding = "never-lingers"
    elif bursts <= 1:
        why = (f"RST at the first bytes after {since}: it stops reading once nothing is "
               "pending (no lingering, or lighttpd's FIONREAD bug)")
        finding = "never-lingers"
    else:
        why = (f"it stopped reading {drained:.1f} s after {since} while we still sent the "
               f"upload ({bursts} chunks), then RST; expected >= {window:g} s (--drain-time). "
               "A client still sending loses the answer it has not read yet")
        finding = "short-linger"
    return verdict(FAIL, _ending_text(ex.ending), why, finding,
                   f"{response.status}, drained {drained:.1f} s")


def _pipeline_count(config: ProbeConfig, body_size: int) -> int:
    """Keep N pipelined responses within --max-bytes."""
    return max(2, min(config.pipeline, config.max_bytes // max(body_size, 1)))


def run_probe(config: ProbeConfig, progress: Callable[[str], None] | None = None) -> ProbeReport:
    config.check()
    target, path = build_target(config)
    upload_path = config.upload_path or path
    if config.close_path:
        close_path, http10 = config.close_path, False
        request = f"GET {close_path} (--close-path)"
    else:
        close_path, http10 = config.big_path or path, True
        request = f"HTTP/1.0 GET {close_path}"
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
    tls = target.tls is not None

    def close_pipeline() -> Verdict:
        same, late = (clients.close_pipeline(target, close_path, http10, path, FOLLOW, same_write,
                                             config.timeout, config.max_bytes)
                      for same_write in (True, False))
        return judge_close_pipeline(same, late, request, server, tls, http10)

    def upload() -> Verdict:
        # Wait past the idle timeout the idle scenario found: a keep-alive connection
        # ends by then; one still open after an early answer is never ended.
        idle = next((v for v in verdicts if v.scenario == "idle" and v.status != NOT_EXERCISED),
                    None)
        idle_timeout = idle.data.get("announced") or idle.data.get("idle_timeout") if idle else None
        known = isinstance(idle_timeout, (int, float)) and idle_timeout > 0.05
        if isinstance(idle_timeout, (int, float)) and known:
            hold = min(float(idle_timeout), config.idle_max) + clients.IDLE_SLACK
            reason = f"its {float(idle_timeout):.1f} s idle timeout"
        else:  # not measured: still open after --idle-max says nothing about its end
            hold = config.idle_max
            reason = (f"as long as we waited (--idle-max {config.idle_max:g} s; its idle "
                      "timeout is not known" + (": the idle scenario did not run)"
                                                if "idle" not in config.scenarios else ")"))
        return judge_upload(
            clients.upload(target, upload_path, config.upload_size, config.timeout,
                           config.max_bytes, path, hold), config.upload_size, upload_path,
            reason, server, known)

    verdicts: list[Verdict] = []
    runs: dict[str, Callable[[], Verdict]] = {
        "pipeline": lambda: judge_pipeline(
            clients.pipeline(target, path, count, config.timeout, config.max_bytes), count, path,
            server),
        "close-pipeline": close_pipeline,
        "idle": lambda: judge_idle(
            clients.idle_close(target, path, config.idle_max, config.timeout, config.max_bytes,
                               IDLE_OFFSETS), config.idle_max, path, server),
        "upload": upload,
        "drain": lambda: judge_drain(
            clients.drain_upload(target, upload_path, config.upload_size, config.drain_time,
                                 config.drain_pause, config.timeout, config.max_bytes),
            config.drain_time, upload_path, server),
    }
    for name in SCENARIOS:
        if name not in config.scenarios:
            continue
        if progress:
            progress(name)
        at = time.monotonic()
        try:
            verdict = runs[name]()
        except (OSError, ssl.SSLError) as exc:
            verdict = Verdict(name, FAIL, "-", "error", f"connection failed: {exc}",
                              finding="error")
        verdict.elapsed = round(time.monotonic() - at, 3)
        verdicts.append(verdict)
    return ProbeReport(config.url, server, verdicts, time.monotonic() - started)


STATUS_STYLE = {PASS: "bold green", FAIL: "bold red", WARN: "bold yellow", NOT_EXERCISED: "cyan"}


def status_label(status: str) -> str:
    return status.replace("-", " ").upper()


def summary(report: ProbeReport) -> str:
    parts = [f"{report.count(FAIL)} scenario(s) failed" if report.failed
             else "no scenario failed"]
    parts += [f"{report.count(status)} {label}" for status, label in
              ((WARN, "warning(s)"), (NOT_EXERCISED, "not exercised")) if report.count(status)]
    return ", ".join(parts) + f" in {report.elapsed:.1f} s"


def render_report(report: ProbeReport, console: Console | None = None) -> None:
    """A readable table (rich when installed, plain text otherwise)."""
    console = console_for_table(console, lambda: plain_report(report))
    if console is None:
        return
    from rich.table import Table

    table = Table(title=f"graceful-close probe {report.url}  (server: {report.server})",
                  title_justify="left", show_lines=True)
    table.add_column("scenario", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("client got", max_width=30)
    table.add_column("ending", max_width=16)
    table.add_column("evidence", overflow="fold")
    for v in report.verdicts:
        table.add_row(v.title, f"[{STATUS_STYLE[v.status]}]{status_label(v.status)}[/]",
                      v.outcome, v.ending, v.evidence)
    console.print(table)
    # The hints go under the table, unwrapped: a class name folded inside a table cell
    # (AutoHTTPProtoc|ol) cannot be copied into a command line.
    for v in report.verdicts:
        if v.hint:
            console.print(f"{v.title}: why and what to change: {v.hint}", soft_wrap=True,
                          highlight=False)
    style = "bold red" if report.failed else "bold green"
    console.print(f"[{style}]{summary(report)}[/]")


def evidence_text(v: Verdict) -> str:
    """The evidence, then the hint (cause and cure) of a finding."""
    return v.evidence + (f"\nWhy and what to change: {v.hint}" if v.hint else "")


def plain_report(report: ProbeReport) -> str:
    lines = [f"graceful-close probe {report.url} (server: {report.server})"]
    for v in report.verdicts:
        lines.append(f"{status_label(v.status):13} {v.title}: {v.outcome}; {v.ending}; "
                     + evidence_text(v).replace("\n", " "))
    lines.append(summary(report))
    return "\n".join(lines)
