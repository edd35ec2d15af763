"""`graceful-close probe` against real servers, stock and ours, through the real command.

Each test runs the stock server and ours on the same scenarios: the probe must
report the stock server's failure (truncation, RST) and pass ours.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import (
    GUNICORN_WORKERS,
    UVICORN_PROTOCOLS,
    ServerProcess,
    gunicorn_server,
    uvicorn_server,
)
from tests.helpers import SAMPLE_ASGI, SAMPLE_WSGI

BIG = "/big?close=1&size=2000000"
UPLOAD = "/upload?size=1000000"
SHORT_KEEPALIVE = "1"


def probe(port: int, *options: str, scheme: str = "http") -> tuple[int, dict, str]:
    """Run the installed command; (exit status, JSON report, stderr)."""
    done = subprocess.run([sys.executable, "-m", "graceful_close.diagnostics.cli", "probe",
                           f"{scheme}://127.0.0.1:{port}/", "--big-path", BIG,
                           "--upload-path", UPLOAD, "--json", *options],
                          capture_output=True, text=True, timeout=90)
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr


def by_name(report: dict) -> dict[str, dict]:
    return {s["scenario"]: s for s in report["scenarios"]}


@pytest.fixture(scope="module", params=["stock", "ours"])
def uvicorn_httptools(request):
    stock, ours = UVICORN_PROTOCOLS["httptools"]
    server = uvicorn_server(SAMPLE_ASGI, ours if request.param == "ours" else stock,
                            args=["--timeout-keep-alive", SHORT_KEEPALIVE])
    with server:
        server.flavour = request.param  # type: ignore[attr-defined]
        yield server


def test_probe_reports_stock_uvicorn_truncation_and_passes_ours(uvicorn_httptools) -> None:
    """Stock uvicorn answers an HTTP/1.0 GET of 2 MB and closes: GETs pipelined in the same
    write were already read, but GETs still in flight when it closed meet RST, which cuts the
    response at ~128 KB. It resets a request arriving at its keep-alive timeout (WARN: no
    byte lost) and resets an early 413 to an HTTP/1.0 upload at once: the probe fails it
    (exit 1). Ours: exit 0, every scenario PASS."""
    status, report, stderr = probe(uvicorn_httptools.port, "--drain-time", "2", "--idle-max", "5")
    scenarios = by_name(report)
    close = scenarios["close-pipeline"]
    assert report["server"] == "uvicorn"
    assert close["data"]["request"].startswith("HTTP/1.0 GET /big")
    if uvicorn_httptools.flavour == "stock":
        assert status == 1, stderr
        assert close["status"] == "fail" and close["finding"] == "in-flight-reset"
        assert close["data"]["received"] < close["data"]["expected"] == 2_000_000
        assert close["ending"] == "RST"
        assert close["data"]["same_write"]["result"] == "ok"
        assert scenarios["idle"]["status"] == "warn"
        idle = scenarios["idle"]["evidence"]
        assert "ECONNRESET instead of a clean EOF" in idle
        # In words (issue 17 item 15), not "(after its FIN: FIN, then RST; -5 ms: answered)".
        assert "the request sent right after the server closed the connection" in idle
        assert re.search(r"the request sent 5 ms before its 1\.\d\d s idle timeout", idle), idle
        assert not re.search(r"[+-]\d+ ms:", idle), idle
        # Each finding names our class for uvicorn (issue 19 item 11).
        assert all("graceful_close.uvicorn:AutoHTTPProtocol" in scenarios[name]["hint"]
                   for name in ("close-pipeline", "idle", "drain", "upload")), scenarios
        assert scenarios["drain"]["status"] == "fail"
        assert scenarios["drain"]["finding"] == "never-lingers"
        # It keeps the connection open past its idle timeout after an early 413: WARN.
        assert scenarios["upload"]["status"] == "warn"
        assert scenarios["upload"]["finding"] == "kept-open"
    else:
        assert status == 0, (stderr, report)
        assert {s["status"] for s in report["scenarios"]} == {"pass"}, report
        assert [s["hint"] for s in report["scenarios"]] == [""] * 5  # nothing to cure
        assert close["data"]["received"] == 2_000_000 and close["ending"] == "FIN"
        assert scenarios["drain"]["data"]["still_draining"] is True


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
def test_probe_gthread_upload_drain_and_request_cap(start_server, ours: bool) -> None:
    """Stock gthread resets an early 413 under an 8 MB upload (truncated answer) and
    drains only 2 s after its FIN (gunicorn's close_graceful); ours keeps draining and
    ends its request cap (keepalive_requests) with FIN, every response whole."""
    stock, graceful = GUNICORN_WORKERS["gthread"]
    server = start_server(gunicorn_server(SAMPLE_WSGI, graceful if ours else stock,
                                          args=["--keep-alive", SHORT_KEEPALIVE],
                                          env={"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "50"}))
    status, report, stderr = probe(server.port, "--only", "upload,drain,pipeline",
                                   "--drain-time", "4", "--pipeline", "120")
    scenarios = by_name(report)
    upload, drain, pipeline = scenarios["upload"], scenarios["drain"], scenarios["pipeline"]
    if ours:
        assert status == 0, (stderr, report)
        assert upload["data"]["received"] == 1_000_000
        assert drain["status"] == "pass"
        assert pipeline["status"] == "pass" and pipeline["data"]["complete"] == 50
    else:
        assert status == 1
        assert upload["status"] == "fail" and upload["data"]["received"] < 1_000_000
        assert upload["data"]["status"] == 413
        assert "graceful_close.gunicorn.ThreadWorker" in upload["hint"]
        assert drain["status"] == "fail" and drain["data"]["drained_for"] < 4
        assert pipeline["data"]["complete"] == 120  # stock gthread has no request cap


def test_probe_table_for_people(uvicorn_httptools) -> None:
    """Without --json: a readable table and a summary line; exit status as with --json."""
    done = subprocess.run([sys.executable, "-m", "graceful_close.diagnostics.cli", "probe",
                           f"http://127.0.0.1:{uvicorn_httptools.port}/", "--big-path", BIG,
                           "--only", "close-pipeline"],
                          capture_output=True, text=True, timeout=60)
    assert "server closes + pipelined" in done.stdout
    if uvicorn_httptools.flavour == "stock":
        assert done.returncode == 1
        assert "FAIL" in done.stdout and "1 scenario(s) failed" in done.stdout
    else:
        assert done.returncode == 0
        assert "PASS" in done.stdout and "no scenario failed" in done.stdout


def test_probe_over_tls_ours_passes_stock_fails_drain(tmp_path: Path) -> None:
    """https:// with --insecure (certificates from trustme). Over TLS stock uvicorn stops
    reading as soon as it closes; ours keeps draining (it cannot half-close on TLS)."""
    trustme = pytest.importorskip("trustme")
    pem = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    stock, ours = UVICORN_PROTOCOLS["httptools"]
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    outcomes = {}
    for name, http in (("stock", stock), ("ours", ours)):
        plain = uvicorn_server(SAMPLE_ASGI, http, args=["--ssl-keyfile", str(pem),
                                                         "--ssl-certfile", str(pem)])
        with ServerProcess(plain.argv, plain.env, tls=insecure) as server:
            outcomes[name] = probe(server.port, "--insecure", "--only", "close-pipeline,drain",
                                   "--drain-time", "2", scheme="https")
    (stock_status, stock_report, _), (our_status, our_report, err) = outcomes["stock"], outcomes["ours"]
    assert our_status == 0, (err, our_report)
    assert by_name(our_report)["close-pipeline"]["data"]["received"] == 2_000_000
    assert by_name(our_report)["drain"]["data"]["still_draining"] is True
    assert stock_status == 1 and by_name(stock_report)["drain"]["status"] == "fail"


@pytest.mark.parametrize("option", ["big_path", "close_path", "upload_path"])
def test_a_path_without_a_leading_slash_is_refused(option: str) -> None:
    """One line naming the option, before any connection is made."""
    from graceful_close.diagnostics.probe import ProbeConfig, ProbeError

    with pytest.raises(ProbeError, match=f"--{option.replace('_', '-')}='big' must start with '/'"):
        ProbeConfig(url="http://127.0.0.1:1/", **{option: "big"}).check()


@pytest.mark.parametrize(("header", "seconds"), [("timeout=5, max=100", 5.0), ("max=3", None),
                                                 ("timeout=2.5", 2.5), ("timeout=x", None)])
def test_keep_alive_timeout_is_read_from_the_header(header: str, seconds: float | None) -> None:
    from graceful_close.diagnostics.probe_clients import announced_idle_timeout
    from graceful_close.diagnostics.wire import Response

    assert announced_idle_timeout(Response(headers={"keep-alive": header})) == seconds
