"""`graceful-close probe` against servers we did not write: real nginx and Apache httpd
(Debian packages, configs in tests/servers/), hypercorn and waitress (with our sample apps).

Each verdict is checked against what the wire shows: the probe's own byte counts and
endings, and, where a verdict rests on one observation, an independent raw-socket client
(graceful_close.diagnostics.scenarios). A test is skipped only when the server's binary
is missing on a developer's machine; in CI (CI=true, .ci/run installs nginx-light and
apache2) a missing binary fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from graceful_close.diagnostics.scenarios import (
    ScenarioResult,
    Target,
    early_response_upload,
    pipelined,
)
from graceful_close.diagnostics.wire import request_bytes
from tests.real_servers import (
    APACHE,
    BIG_PATH,
    BIG_SIZE,
    CLOSE_PATH,
    NGINX,
    UPLOAD_PATH,
    PythonServer,
    RealServer,
)

SAMPLE_ASGI = "graceful_close.diagnostics.sample_apps:asgi_app"
SAMPLE_WSGI = "graceful_close.diagnostics.sample_apps:wsgi_app"
SAMPLE_BIG = "/big?size=2000000"
SAMPLE_CLOSE = "/big?close=1&size=2000000"
SAMPLE_UPLOAD = "/upload?size=1000000"
QUICK = ("--drain-time", "1.5", "--timeout", "5")


def require(binary: str) -> None:
    if Path(binary).exists():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{binary} is missing in CI: .ci/run must install it")
    pytest.skip(f"{binary} is not installed")


def probe(url: str, *options: str) -> tuple[int, dict, str]:
    """Run the command; (exit status, JSON report, stderr)."""
    done = subprocess.run([sys.executable, "-m", "graceful_close.diagnostics.cli", "probe", url,
                           "--json", *options], capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr


def verdicts(report: dict) -> dict[str, dict]:
    return {s["scenario"]: s for s in report["scenarios"]}


def http10_get(target: Target, path: str) -> bytes:
    return request_bytes("GET", path, target.authority).replace(b" HTTP/1.1\r\n",
                                                                b" HTTP/1.0\r\n", 1)


def raw_sample_upload(port: int) -> ScenarioResult:
    """An independent client: the sample app's upload, answered early by the server."""
    return early_response_upload(Target("127.0.0.1", port), SAMPLE_UPLOAD, timeout=10)


def raw_close_pipeline(port: int, path: str, gap: float) -> tuple[int, str]:
    """An independent client: HTTP/1.0 GET `path`, 5 GETs `gap` s later; (bytes, ending)."""
    target = Target("127.0.0.1", port)
    rest = [request_bytes("GET", "/", target.authority)] * 5
    if gap == 0:  # one write: concatenate into the first "request"
        result = pipelined(target, [http10_get(target, path) + b"".join(rest), b""], expected=1,
                           gap=0.0, timeout=10)
    else:
        result = pipelined(target, [http10_get(target, path), *rest], expected=1, gap=gap,
                           timeout=10)
    return result.body_bytes, result.ending


@pytest.fixture(scope="module")
def nginx_default() -> Iterator[RealServer]:
    require(NGINX)
    with RealServer("nginx") as server:
        yield server


def test_nginx_default_in_flight_pipelined_requests_meet_rst(nginx_default: RealServer) -> None:
    """nginx 1.22 with its defaults (lingering_close on): GETs pipelined in the same write
    as an HTTP/1.0 GET are drained, GETs still in flight when it closed meet RST and the
    2 MB response is cut. The probe FAILs close-pipeline and names the in-flight case; it
    does not call nginx a server that never lingers. Its 75 s keep-alive is above
    --idle-max and it sends no Keep-Alive header: idle is NOT EXERCISED with the option to
    pass. The early 413 (client_max_body_size) and the drain of an HTTP/1.0 upload PASS."""
    url = f"http://127.0.0.1:{nginx_default.port}/index.html"
    status, report, stderr = probe(url, "--big-path", BIG_PATH, "--upload-path", UPLOAD_PATH,
                                   "--idle-max", "1", *QUICK)
    assert report["server"].startswith("nginx"), (stderr, report)
    found = verdicts(report)
    close = found["close-pipeline"]
    assert status == 1 and close["status"] == "fail", report
    assert close["finding"] == "in-flight-reset", close
    assert close["data"]["same_write"].items() >= {"status": 200, "received": BIG_SIZE,
                                                   "ending": "FIN", "result": "ok"}.items()
    assert close["data"]["in_flight"]["result"] == "rst"
    assert close["data"]["received"] < close["data"]["expected"] == BIG_SIZE
    assert "lingering_close always" in close["hint"]
    assert found["pipeline"]["status"] == "pass"
    assert found["idle"]["status"] == "not-exercised"
    assert "--idle-max" in found["idle"]["evidence"]
    upload = found["upload"]
    assert upload["status"] == "pass" and upload["data"]["status"] == 413, upload
    assert found["drain"]["status"] == "pass", found["drain"]

    # The wire, seen by another client: same write -> whole and FIN; 50 ms later -> cut, RST.
    whole, ending = raw_close_pipeline(nginx_default.port, BIG_PATH, gap=0)
    assert whole == BIG_SIZE and ending == "FIN"
    cut, ending = raw_close_pipeline(nginx_default.port, BIG_PATH, gap=0.05)
    assert cut < BIG_SIZE and ending == "RST"


def test_nginx_lingering_close_always_passes_close_pipeline() -> None:
    """With `lingering_close always` nginx lingers for the in-flight GETs too: PASS. With
    `keepalive_timeout 2s 2` it announces Keep-Alive: timeout=2, which the probe reads
    instead of waiting for --idle-max; nginx closes an idle keep-alive connection without
    lingering, so a request sent as it expires meets RST: WARN (no response byte lost)."""
    require(NGINX)
    with RealServer("nginx", extra="lingering_close always;\n    keepalive_timeout 2s 2;") as server:
        url = f"http://127.0.0.1:{server.port}/index.html"
        status, report, stderr = probe(url, "--big-path", BIG_PATH, "--only",
                                       "close-pipeline,idle", "--idle-max", "3", *QUICK)
    found = verdicts(report)
    close, idle = found["close-pipeline"], found["idle"]
    assert close["status"] == "pass" and close["finding"] == "lingered", (stderr, report)
    assert close["data"]["received"] == BIG_SIZE
    assert idle["data"]["announced"] == 2
    assert idle["status"] in ("warn", "pass"), idle
    if idle["status"] == "warn":
        assert "ECONNRESET instead of a clean EOF" in idle["evidence"]
        assert any("RST" in result for result in idle["data"]["attempts"].values())
    assert status == 0, (stderr, report)  # a warning leaves the exit status 0


def test_nginx_close_path_is_the_app_level_close(nginx_default: RealServer) -> None:
    """--close-path: an HTTP/1.1 GET answered with Connection: close (keepalive_timeout 0
    in that location) is judged like the HTTP/1.0 GET; a path without '/' is refused."""
    url = f"http://127.0.0.1:{nginx_default.port}/index.html"
    status, report, _ = probe(url, "--close-path", CLOSE_PATH, "--only", "close-pipeline",
                              *QUICK)
    close = verdicts(report)["close-pipeline"]
    assert close["data"]["request"].startswith(f"GET {CLOSE_PATH}")
    assert close["finding"] == "in-flight-reset" and status == 1
    status, report, stderr = probe(url, "--close-path", "close/big.bin")
    assert status == 2 and "must start with '/'" in stderr and not report


def test_nginx_small_file_is_not_exercised_but_its_default_body_limit_is(
        nginx_default: RealServer) -> None:
    """Pointed at a 3-byte file with no --big-path: close-pipeline cannot show truncation,
    so it is NOT EXERCISED (not PASS). nginx's default client_max_body_size (1 MB) answers
    an 8 MB POST with an early 413 even there: upload and drain are exercised."""
    url = f"http://127.0.0.1:{nginx_default.port}/index.html"
    status, report, _ = probe(url, "--only", "close-pipeline,upload,drain", *QUICK)
    found = verdicts(report)
    assert found["close-pipeline"]["status"] == "not-exercised", report
    assert "1 MB" in found["close-pipeline"]["evidence"]
    assert found["upload"]["status"] == "pass" and found["upload"]["data"]["status"] == 413
    assert found["drain"]["status"] == "pass" and found["drain"]["data"]["status"] == 413
    assert status == 0


def test_apache_event_mpm_passes_every_scenario() -> None:
    """Apache 2.4 (event MPM) lingers everywhere: at its request cap (MaxKeepAliveRequests
    100: 101 answers, then FIN with our pipelined requests drained), after an HTTP/1.0
    answer with GETs pending or in flight, at its idle timeout (Keep-Alive: timeout=2
    read from the header), after an early 413 (LimitRequestBody) and while an HTTP/1.0
    upload goes on after its FIN."""
    require(APACHE)
    with RealServer("apache", extra="KeepAliveTimeout 2") as server:
        url = f"http://127.0.0.1:{server.port}/index.html"
        status, report, stderr = probe(url, "--big-path", BIG_PATH, "--upload-path",
                                       UPLOAD_PATH, "--idle-max", "3", *QUICK)
        whole, ending = raw_close_pipeline(server.port, BIG_PATH, gap=0.05)
    found = verdicts(report)
    assert report["server"].startswith("Apache"), (stderr, report)
    assert {name: v["status"] for name, v in found.items()} == dict.fromkeys(found, "pass"), report
    assert status == 0
    assert found["pipeline"]["data"]["complete"] < 200  # its request cap, ended with FIN
    # Apache 2.4.71 sends no Keep-Alive header to HTTP/1.1 clients: the timeout is measured.
    assert 1 < found["idle"]["data"]["idle_timeout"] < 4
    assert found["upload"]["data"]["status"] == 413
    assert found["close-pipeline"]["data"]["received"] == BIG_SIZE
    assert whole == BIG_SIZE and ending == "FIN"


def test_apache_without_a_body_limit_is_not_exercised() -> None:
    """Without --upload-path Apache (LimitRequestBody 1 GiB by default) reads the whole 8 MB
    POST and answers 200: no early answer, so upload and drain are NOT EXERCISED, with the
    way to get one (LimitRequestBody), and the 200 is shown."""
    require(APACHE)
    with RealServer("apache") as server:
        url = f"http://127.0.0.1:{server.port}/index.html"
        status, report, stderr = probe(url, "--only", "upload,drain", "--timeout", "2",
                                       "--upload-size", "2M")
    found = verdicts(report)
    assert {v["status"] for v in found.values()} == {"not-exercised"}, (stderr, report)
    assert found["upload"]["data"]["status"] == 200
    assert "LimitRequestBody" in found["upload"]["evidence"]
    assert status == 0


def test_hypercorn_resets_in_flight_requests_and_early_answers() -> None:
    """hypercorn 0.18 (h11) with our ASGI app: the app's Connection: close answer is cut by
    RST when pipelined GETs arrive after it closed, its early 413 to an 8 MB upload is cut
    by RST, an HTTP/1.0 upload is reset right after the answer, and a request at its idle
    timeout meets RST (WARN). A raw-socket client sees the same truncation."""
    argv = [sys.executable, "-m", "hypercorn", "-b", "127.0.0.1:{port}", "--keep-alive", "1",
            SAMPLE_ASGI]
    with PythonServer(argv) as server:
        url = f"http://127.0.0.1:{server.port}/"
        status, report, stderr = probe(url, "--close-path", SAMPLE_CLOSE, "--upload-path",
                                       SAMPLE_UPLOAD, "--idle-max", "3", *QUICK)
        raw = raw_sample_upload(server.port)
        # HTTP/1.0 with GETs in the same write: h11 refuses them and hypercorn answers 400.
        _, http10, _ = probe(url, "--big-path", SAMPLE_BIG, "--only", "close-pipeline", *QUICK)
    found = verdicts(report)
    assert report["server"].startswith("hypercorn"), (stderr, report)
    refused = verdicts(http10)["close-pipeline"]
    assert refused["data"]["same_write"]["status"] == 400, refused
    assert "answered 400" in refused["evidence"] and "(400, " in refused["outcome"]
    assert refused["status"] == "fail" and refused["data"]["in_flight"]["result"] == "rst"
    assert status == 1
    assert found["pipeline"]["status"] == "pass"
    close = found["close-pipeline"]
    assert close["status"] == "fail" and close["data"]["in_flight"]["result"] == "rst", close
    upload = found["upload"]
    assert upload["status"] == "fail" and upload["data"]["status"] == 413, upload
    assert upload["data"]["received"] < 1_000_000
    assert raw.responses and raw.responses[0].status == 413
    assert raw.body_bytes < 1_000_000 and raw.ending == "RST"
    assert found["drain"]["status"] == "fail" and found["drain"]["finding"] == "never-lingers"
    assert found["idle"]["status"] == "warn", found["idle"]
    # graceful-close supports hypercorn: the hint names our config module.
    assert "hypercorn -c python:graceful_close.hypercorn" in upload["hint"], upload["hint"]


def test_waitress_small_body_limit_resets_its_413() -> None:
    """waitress 3 with our WSGI app and --max-request-body-size=1024: its own early 413
    ends in RST under the rest of the upload (FAIL), an HTTP/1.0 answer with GETs in
    flight is cut by RST (FAIL), and its idle timeout (channel_timeout, 120 s) is above
    --idle-max: NOT EXERCISED. A raw-socket client sees the same RST."""
    argv = [sys.executable, "-m", "waitress", "--listen=127.0.0.1:{port}",
            "--max-request-body-size=1024", SAMPLE_WSGI]
    with PythonServer(argv) as server:
        url = f"http://127.0.0.1:{server.port}/"
        status, report, stderr = probe(url, "--big-path", SAMPLE_BIG, "--upload-path",
                                       SAMPLE_UPLOAD, "--idle-max", "1", *QUICK)
        raw = raw_sample_upload(server.port)
        cut, ending = raw_close_pipeline(server.port, SAMPLE_BIG, gap=0.05)
        # Our WSGI app sends no Connection: close: waitress keeps the connection alive.
        _, kept, _ = probe(url, "--close-path", SAMPLE_CLOSE, "--only", "close-pipeline", *QUICK)
    found = verdicts(report)
    assert report["server"] == "waitress", (stderr, report)
    not_closed = verdicts(kept)["close-pipeline"]
    assert not_closed["status"] == "not-exercised", not_closed
    assert "no Connection: close" in not_closed["evidence"]
    assert status == 1
    assert found["pipeline"]["status"] == "pass"
    close = found["close-pipeline"]
    assert close["status"] == "fail" and close["finding"] == "in-flight-reset", close
    assert cut < BIG_SIZE and ending == "RST"
    upload = found["upload"]
    assert upload["status"] == "fail" and upload["data"]["status"] == 413, upload
    assert raw.responses and raw.responses[0].status == 413 and raw.ending == "RST"
    assert found["drain"]["status"] == "fail"
    assert found["idle"]["status"] == "not-exercised"


OURS = {
    "hypercorn": ([sys.executable, "-m", "hypercorn", "-b", "127.0.0.1:{port}", "-c",
                   "python:graceful_close.hypercorn", "--keep-alive", "1", SAMPLE_ASGI],
                  ("--close-path", SAMPLE_CLOSE)),
    "waitress": ([sys.executable, "-m", "graceful_close.waitress", "--listen=127.0.0.1:{port}",
                  "--max-request-body-size=1024", "--channel-timeout=1", "--cleanup-interval=1",
                  SAMPLE_WSGI], ("--big-path", SAMPLE_BIG)),
}


@pytest.mark.parametrize("server", sorted(OURS))
def test_ours_pass_every_scenario(server: str) -> None:
    """hypercorn with our config module and waitress with our channel: PASS on every scenario
    where stock fails close-pipeline, upload and drain (the tests above) and warns at idle."""
    argv, close = OURS[server]
    with PythonServer(argv) as running:
        url = f"http://127.0.0.1:{running.port}/"
        status, report, stderr = probe(url, *close, "--upload-path", SAMPLE_UPLOAD,
                                       "--idle-max", "3", *QUICK)
        raw = raw_sample_upload(running.port)
    found = verdicts(report)
    assert {name: v["status"] for name, v in found.items()} == dict.fromkeys(found, "pass"), (
        stderr, {name: v["status"] for name, v in found.items()})
    assert set(found) == {"pipeline", "close-pipeline", "idle", "upload", "drain"}
    assert status == 0
    assert raw.responses and raw.responses[0].status == 413 and raw.ending == "FIN"
