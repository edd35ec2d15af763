"""`graceful-close probe URL`: does a server end HTTP/1.1 connections without losing bytes?

Runs the black-box clients of probe_clients against one URL and turns what they
saw into a verdict per scenario with the evidence:

  PASS           the server did what the scenario needs and no byte was lost
  FAIL           a response was cut, or RST hit a connection the server closed with
                 our input unread (bytes in flight are destroyed): exit status 1
  WARN           no response byte lost, but an end a client must treat as an error:
                 ECONNRESET at the idle timeout, or a connection never ended
                 (exit status stays 0)
  NOT EXERCISED  the server did not do what the scenario needs (no early 4xx, an
                 error status, a response too small, no close within the limits);
                 the evidence says which option would exercise it

Every client is conforming (RFC 9112): no request after a Connection: close of ours.
Safe for a production server: every scenario is bounded in requests, bytes and time
(see PROBE_LIMITS).
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
SMALL_LIMIT_HINT = ("point --upload-path at an endpoint with a small body limit (nginx "
                    "client_max_body_size 1k; Apache LimitRequestBody 1024)")
MAX_REQUESTS_BEYOND_PIPELINE = (1 + 2 * (1 + FOLLOW) + 2 + 2 * len(IDLE_OFFSETS) + 2 + 1)

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
            2 x (a Keep-Alive: timeout= the server announces + 1 s)), --idle-max + 1 s (upload)
            or --drain-time + 2 s (drain); scenarios run one after another
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
    idle_max: float = 10.0
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
    expected = response.expected_length
    total = f" of {expected}" if expected is not None else ""
    return f"cut ({response.status}): {response.received_length}{total} B"


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


def judge_pipeline(ex: clients.Exchange, count: int, path: str) -> Verdict:
    partial = ex.partial
    got = ex.complete
    if got >= count:
        where = f"answered all {count}"
    elif got == 1:
        where = f"answered 1 of {count} and closed (no keep-alive)"
    else:
        where = f"closed after {got} of {count} (a request cap)"
    outcome = f"{got}/{count} intact ({_statuses(ex) or 'no status'})" + (
        ", 1 truncated" if partial else "")
    ending = _ending_text(ex.ending)
    data = {"requests": count, "complete": got, "ending": ex.ending,
            "statuses": [r.status for r in ex.responses], "note": ex.note}
    if ex.ending == "CAP":
        return Verdict("pipeline", NOT_EXERCISED, outcome, ending,
                       "stopped reading at --max-bytes before the server ended", data=data,
                       finding="byte-cap")
    if _error_status(ex.first):
        return Verdict("pipeline", NOT_EXERCISED, outcome, ending,
                       f"the server answered GET {path} with an error status: the scenario "
                       "needs a URL whose GET succeeds", data=data, finding="error-status")
    if ex.ending == "TIMEOUT":
        return Verdict("pipeline", FAIL, outcome, ending,
                       f"stopped answering after {got} of {count} pipelined requests without "
                       "closing: the client waits for answers that never come", data=data,
                       finding="stalled")
    if ex.ending == "OPEN" and not partial:
        return Verdict("pipeline", PASS, outcome, ending,
                       f"{where}, every response whole; {OPEN_NOTE}", data=data,
                       finding="lingered")
    if partial or not _is_fin(ex.ending):
        lost = ("the last response was cut: RST destroyed its bytes in flight" if partial else
                "every response before it arrived whole (they are small); a larger one still "
                "in flight would have been destroyed")
        return Verdict("pipeline", FAIL, outcome, ending,
                       f"{where}, then RST with our pipelined requests unread: it does not "
                       f"linger when it closes; {lost}", data=data, finding="no-linger")
    return Verdict("pipeline", PASS, outcome, "FIN",
                   f"{where}, all whole, clean FIN" + (
                       " (it lingered: our later requests were read and discarded)"
                       if got < count else ""), data=data, finding="lingered")


def _attempt(ex: clients.Exchange, tls: bool) -> tuple[str, str]:
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
    if response.complete and _size(response) < BIG_ENOUGH:  # a cut response lost bytes anyway
        return "not", (f"the response has only {_size(response)} B: one that fits in the socket "
                       f"buffers cannot show truncation; use a path to any static file of at "
                       f"least 1 MB")
    if response.complete and ex.ending == "OPEN":
        if tls:
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
    return (f"RST destroyed the bytes in flight ({response.received_length} of "
            f"{_size(response)} B arrived)")


def judge_close_pipeline(same: clients.Exchange, late: clients.Exchange, request: str,
                         server: str, tls: bool) -> Verdict:
    """Two attempts: pipelined GETs in the same write as the request, and 50 ms later."""
    same_kind, same_why = _attempt(same, tls)
    late_kind, late_why = _attempt(late, tls)
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
                       "ending": same.ending, "result": same_kind},
        "in_flight": {"status": late.first.status if late.first else None,
                      "received": late.first.received_length if late.first else 0,
                      "ending": late.ending, "result": late_kind,
                      "queued_at_follow": queued}}
    outcome = f"same write: {_attempt_text(same)}; in flight: {_attempt_text(late)}"
    ending = _ending_text(worst.ending)
    late_how = (f"sent {clients.FOLLOW_GAP * 1000:.0f} ms later, while the response was "
                "arriving" + (f" ({queued} B in)" if queued else ""))
    if late_kind == "rst" and same_kind == "not":
        return Verdict("close-pipeline", FAIL, outcome, ending,
                       f"{request}: GETs {late_how} reached it after it had closed: "
                       f"{_lost_text(late)}. With the GETs in the same write {same_why}, so "
                       "whether it lingers on input already pending was not exercised",
                       data=data, finding="in-flight-reset")
    if same_kind == "not" or late_kind == "not":
        why = same_why or late_why
        return Verdict("close-pipeline", NOT_EXERCISED, outcome, ending,
                       f"{request}: {why} ({FOLLOW} GETs pipelined behind it)", data=data,
                       finding="not-exercised")
    if same_kind == "ok" and late_kind == "ok":
        return Verdict("close-pipeline", PASS, outcome, "FIN",
                       f"{request} closed the connection with {FOLLOW} GETs pipelined behind "
                       f"it; it lingered both when they arrived in the same write as the "
                       f"request and when they were {late_how}: whole response, clean FIN",
                       data=data, finding="lingered")
    if same_kind == "ok":
        nginx = server.lower().startswith("nginx")
        hint = (" nginx's default `lingering_close on` lingers only on input already "
                "pending; `lingering_close always` covers this." if nginx else "")
        return Verdict("close-pipeline", FAIL, outcome, ending,
                       f"{request}: GETs pipelined in the same write were read before it "
                       f"closed (whole response, FIN); GETs {late_how} reached it after it had "
                       f"closed: {_lost_text(late)}. It does not linger for input still in "
                       f"flight, as a WAN client's pipelined requests often are.{hint}",
                       data=data, finding="in-flight-reset")
    return Verdict("close-pipeline", FAIL, outcome, ending,
                   f"{request}: it closed with our pipelined GETs unread although they arrived "
                   f"in the same write as the request: {_lost_text(same)}. It does not linger "
                   f"(a plain close()); GETs {late_how}: {_attempt_text(late)}", data=data,
                   finding="never-lingers")


IDLE_HINT = ("pass --idle-max above its keep-alive timeout (nginx keepalive_timeout: 75 s by "
             "default; Apache, uvicorn: 5 s; gunicorn: 2 s)")
IDLE_MEANING = ("the client gets ECONNRESET instead of a clean EOF. No response byte is lost "
                "(that request was never answered), so this is weaker than truncation, but a "
                "client that retries only on EOF reports an error")


def judge_idle(ex: clients.Exchange, idle_max: float, path: str) -> Verdict:
    idle = ex.extra.get("idle_timeout")
    announced = ex.extra.get("announced")
    attempts: dict[str, str] = ex.extra.get("attempts", {})
    first = ex.first
    data = {"idle_timeout": idle, "announced": announced, "attempts": attempts,
            "ending": ex.ending, "status": first.status if first else None}
    source = ("announced by Keep-Alive: timeout=" if announced is not None else "measured")
    if first is None or not first.complete:
        return Verdict("idle", NOT_EXERCISED, _response_text(first), _ending_text(ex.ending),
                       "the first request got no whole answer", data=data,
                       finding="not-exercised")
    if _error_status(first):
        return Verdict("idle", NOT_EXERCISED, _response_text(first), _ending_text(ex.ending),
                       f"the server answered GET {path} with an error status", data=data,
                       finding="error-status")
    if ex.ending == "ANNOUNCED" and announced is not None:
        return Verdict("idle", NOT_EXERCISED,
                       f"{first.status}, Keep-Alive: timeout={announced:g}",
                       "not tried",
                       f"the server announces an idle timeout of {announced:g} s, above "
                       f"--idle-max {idle_max:g}: pass --idle-max {announced + 2:g} to test it "
                       f"(takes about {2 * announced:g} s)", data=data,
                       finding="idle-above-max")
    if ex.ending == "TIMEOUT":
        waited = f"{announced + clients.IDLE_SLACK:g}" if announced is not None else f"{idle_max:g}"
        why = (f"announced Keep-Alive: timeout={announced:g} but kept the idle connection "
               f"open longer than {waited} s" if announced is not None else
               f"kept an idle connection open longer than --idle-max ({idle_max:g} s) and "
               f"sent no Keep-Alive: timeout=; {IDLE_HINT}")
        return Verdict("idle", NOT_EXERCISED, f"{first.status}, idle > {waited} s", "kept open", why,
                       data=data, finding="idle-above-max")
    if ex.ending != "FIN":
        return Verdict("idle", WARN, f"{first.status}, idle {idle} s", _ending_text(ex.ending),
                       f"the server reset an idle keep-alive connection instead of closing "
                       f"it with FIN: {IDLE_MEANING}", data=data, finding="reset-at-idle")
    shown = "; ".join(f"{name}: {_ending_text(result) if result != 'answered' else result}"
                      for name, result in attempts.items())
    idle_text = f"{first.status}, " + ("no keep-alive" if (idle or 0) <= 0.05
                                       else f"idle timeout {idle:.2f} s ({source})")
    outcome = ", ".join(sorted(set(attempts.values()))) or "-"
    if any("RST" in result for result in attempts.values()):
        return Verdict("idle", WARN, idle_text, "RST",
                       f"a request sent as its idle timeout expired met RST, no lingering "
                       f"({shown}): {IDLE_MEANING}", data=data, finding="reset-at-idle")
    if any(result.startswith("setup failed") for result in attempts.values()):
        return Verdict("idle", NOT_EXERCISED, idle_text, outcome,
                       f"could not complete ({shown})", data=data, finding="not-exercised")
    return Verdict("idle", PASS, idle_text, "FIN",
                   f"requests sent as it closed were answered or met a clean EOF, which a "
                   f"client retries ({shown})", data=data, finding="lingered")


def judge_upload(ex: clients.Exchange, size: int, path: str, hold_reason: str) -> Verdict:
    response = ex.first
    sent = ex.extra.get("sent")
    open_for = float(ex.extra.get("open_for") or 0.0)
    following = ex.extra.get("next")
    data = {"ending": ex.ending, "sent": sent, "upload_size": size,
            "status": response.status if response else None,
            "received": response.received_length if response else 0,
            "expected": response.expected_length if response else None,
            "open_for": open_for, "next": following, "note": ex.note,
            "answered_after": ex.extra.get("answered_after")}
    outcome = _response_text(response)
    ending = _ending_text(ex.ending)
    sent_note = f"we sent {sent} of {size} B" + (f"; {ex.note}" if ex.note else "")
    if ex.ending == "CAP":
        return Verdict("upload", NOT_EXERCISED, outcome, ending,
                       "the answer is larger than --max-bytes", data=data, finding="byte-cap")
    if response is None:
        if ex.ending in ("RST", "FIN+RST"):
            return Verdict("upload", FAIL, outcome, ending,
                           f"reset with no answer at all ({sent_note}): RST destroyed whatever "
                           "it answered", data=data, finding="answer-destroyed")
        return Verdict("upload", NOT_EXERCISED, outcome, ending,
                       f"no answer to a POST of {size} B to {path} ({sent_note}); "
                       f"{SMALL_LIMIT_HINT}", data=data, finding="no-early-answer")
    if not 400 <= response.status < 500:
        what = ("an error status" if response.status >= 500 else
                "it took the whole upload: no early answer")
        return Verdict("upload", NOT_EXERCISED, outcome, ending,
                       f"answered {response.status} to a POST of {size} B to {path} ({what}); "
                       f"{SMALL_LIMIT_HINT}", data=data, finding="no-early-answer")
    if not response.complete or ex.ending.startswith(("RST", "FIN+RST")):
        lost = (f"RST destroyed its own early answer in flight: {response.received_length} of "
                f"{_size(response)} B arrived" if not response.complete else
                "RST after the whole answer (no byte lost this time; a client still sending "
                "would lose it)")
        return Verdict("upload", FAIL, outcome, ending,
                       f"answered {response.status} early and closed with our upload unread "
                       f"({sent_note}): {lost}", data=data, finding="answer-destroyed")
    if _is_fin(ex.ending):
        return Verdict("upload", PASS, outcome, "FIN",
                       f"early {response.status} whole ({sent_note}), then a clean FIN "
                       f"{open_for:.1f} s later: it read the rest of the upload, no RST",
                       data=data, finding="lingered")
    early = ex.extra.get("answered_after") is not None or bool(ex.note)
    if not early and isinstance(following, str) and following.startswith("answered"):
        return Verdict("upload", NOT_EXERCISED, outcome, "kept alive",
                       f"answered {response.status} only once the whole upload was sent, then "
                       f"kept the connection alive (it {following} to a next request on it): "
                       f"no early answer; {SMALL_LIMIT_HINT}", data=data,
                       finding="no-early-answer")
    if following is None:
        then = "it no longer read our upload"
    elif following.startswith("answered"):
        then = f"it {following} to a next request on it"
    else:
        then = f"a next request on it got {following}"
    return Verdict("upload", WARN, outcome, f"kept open {open_for:.1f} s",
                   f"early {response.status} whole ({sent_note}), then it kept the connection "
                   f"open {open_for:.1f} s, past {hold_reason} ({then}): it does not end it; a "
                   "client that waits for the end waits until its own timeout, and the server "
                   "holds the connection as long", data=data, finding="kept-open")


def judge_drain(ex: clients.Exchange, window: float, path: str) -> Verdict:
    response = ex.first
    data: dict[str, object] = {"ending": ex.ending,
                               "status": response.status if response else None, **ex.extra}
    outcome = _response_text(response)
    request = f"an HTTP/1.0 POST to {path}"
    if ex.ending in ("TIMEOUT", "CAP") or (response is None and _is_fin(ex.ending)):
        why = {"TIMEOUT": "no early answer within --timeout after the first bytes of its "
                          f"body (the server waits for all of it); {SMALL_LIMIT_HINT}",
               "CAP": "the answer is larger than --max-bytes"}.get(
                   ex.ending, "it closed without an answer")
        return Verdict("drain", NOT_EXERCISED, outcome, _ending_text(ex.ending),
                       f"{request}: {why}", data=data, finding="not-exercised")
    if response is not None and not 400 <= response.status < 500:
        return Verdict("drain", NOT_EXERCISED, outcome, _ending_text(ex.ending),
                       f"{request}: answered {response.status}, not an early 4xx; "
                       f"{SMALL_LIMIT_HINT}", data=data, finding="no-early-answer")
    if response is None or "still_draining" not in ex.extra:
        return Verdict("drain", FAIL, outcome, _ending_text(ex.ending),
                       f"{request}: it closed with our upload unread and reset the connection "
                       f"under its answer ({_lost_text(ex)}): it never lingers", data=data,
                       finding="never-lingers")
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
        return Verdict("drain", PASS, f"{response.status}, drained >= {drained:.1f} s",
                       "no RST (we closed first)",
                       f"{request}: we kept sending the upload after its early "
                       f"{response.status}, {bursts} chunks {ex.extra.get('pause')} s apart; "
                       f"{how}", data=data, finding="lingered")
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
    return Verdict("drain", FAIL, f"{response.status}, drained {drained:.1f} s",
                   _ending_text(ex.ending),
                   f"{request}: {why}", data=data, finding=finding)


def _pipeline_count(config: ProbeConfig, body_size: int) -> int:
    """Keep N pipelined responses within --max-bytes."""
    return max(2, min(config.pipeline, config.max_bytes // max(body_size, 1)))


def run_probe(config: ProbeConfig, progress: Callable[[str], None] | None = None) -> ProbeReport:
    config.check()
    target, path = build_target(config)
    upload_path = config.upload_path or path
    if config.close_path:
        close_path, http10 = config.close_path, False
        request = f"GET {close_path} (answered with Connection: close)"
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
        return judge_close_pipeline(same, late, request, server, tls)

    def upload() -> Verdict:
        # Wait past the idle timeout the idle scenario found: a keep-alive connection
        # ends by then; one still open after an early answer is never ended.
        idle = next((v for v in verdicts if v.scenario == "idle" and v.status != NOT_EXERCISED),
                    None)
        idle_timeout = idle.data.get("announced") or idle.data.get("idle_timeout") if idle else None
        if isinstance(idle_timeout, (int, float)) and idle_timeout > 0.05:
            hold = min(float(idle_timeout), config.idle_max) + clients.IDLE_SLACK
            reason = f"its {float(idle_timeout):.1f} s idle timeout"
        else:
            hold = config.idle_max
            reason = f"--idle-max ({config.idle_max:g} s)"
        return judge_upload(
            clients.upload(target, upload_path, config.upload_size, config.timeout,
                           config.max_bytes, path, hold), config.upload_size, upload_path, reason)

    verdicts: list[Verdict] = []
    runs: dict[str, Callable[[], Verdict]] = {
        "pipeline": lambda: judge_pipeline(
            clients.pipeline(target, path, count, config.timeout, config.max_bytes), count, path),
        "close-pipeline": close_pipeline,
        "idle": lambda: judge_idle(
            clients.idle_close(target, path, config.idle_max, config.timeout, config.max_bytes,
                               IDLE_OFFSETS), config.idle_max, path),
        "upload": upload,
        "drain": lambda: judge_drain(
            clients.drain_upload(target, upload_path, config.upload_size, config.drain_time,
                                 config.drain_pause, config.timeout, config.max_bytes),
            config.drain_time, upload_path),
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
    style = "bold red" if report.failed else "bold green"
    console.print(f"[{style}]{summary(report)}[/]")


def plain_report(report: ProbeReport) -> str:
    lines = [f"graceful-close probe {report.url} (server: {report.server})"]
    for v in report.verdicts:
        lines.append(f"{status_label(v.status):13} {v.title}: {v.outcome}; {v.ending}; "
                     f"{v.evidence}")
    lines.append(summary(report))
    return "\n".join(lines)
