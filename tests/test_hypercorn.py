"""hypercorn with our config module (`hypercorn -c python:graceful_close.hypercorn`) against
stock hypercorn, side by side in each test, on real hypercorn processes.

Stock hypercorn closes with write_eof() then close() whatever the client is still sending:
a Connection: close response with requests pipelined behind it, and an early 413 to an
upload it never read, are cut at about 128 kB and end with RST. Ours delivers them whole
and ends with FIN. HTTP/2 is served exactly as stock.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from graceful_close.diagnostics.launch import ServerProcess, hypercorn_server
from graceful_close.diagnostics.scenarios import (
    Target,
    early_response_upload,
    never_closing,
    pipelined_after_close,
)
from tests.helpers import (
    ABORT_ON_TIMEOUT,
    SAMPLE_ASGI,
    exchange_on_one_connection,
    expect_stock_failure,
    fd_count,
    exit_summary_after,
    trusting,
    wait_until,
    worker_pid,
)


def _start(start_server, ours: bool, args: list[str] = (), env: dict[str, str] | None = None,
           tls=None) -> ServerProcess:
    plain = hypercorn_server(SAMPLE_ASGI, ours, args=list(args), env=env)
    return start_server(ServerProcess(plain.argv, plain.env, tls=tls))


def test_close_response_with_pipelined_requests_and_early_413(start_server) -> None:
    """Stock: cut (about 128,000 of 2,000,000 B) and RST; ours: whole, then FIN."""
    results = {}
    for ours in (False, True):
        target = Target("127.0.0.1", _start(start_server, ours).port)
        results[ours] = (pipelined_after_close(target, "/big?close=1&size=2000000", timeout=20),
                         early_response_upload(target, "/upload?size=1000000", 8 << 20, timeout=20))
    for result in results[True]:
        assert result.intact and result.ending == "FIN", (result.body_bytes, result.ending)
    assert results[True][1].body_bytes == 1_000_000 and results[True][1].responses[0].status == 413
    expect_stock_failure(all(not r.intact and r.ending == "RST" for r in results[False]),
                         "hypercorn cuts a close with unread bytes")


def test_keepalive_caps_and_user_agent_rule(start_server) -> None:
    """Ours: the request cap (3 here) and the legacy User-Agent rule end the connection with
    Connection: close and FIN; stock keeps both connections open."""
    env = {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "3"}
    for ours in (False, True):
        port = _start(start_server, ours, env=env).port
        capped, capped_end = exchange_on_one_connection(port, [{}] * 4)
        legacy, legacy_end = exchange_on_one_connection(port, [{"User-Agent": "Mozilla/2.02 (X11)"}] * 2)
        if ours:
            assert [r.header("connection") for r in capped] == [None, None, "close"]
            assert capped_end == "FIN"
            assert [r.header("connection") for r in legacy] == ["close"] and legacy_end == "FIN"
        else:
            assert len(capped) == 4 and capped_end == "open"
            assert len(legacy) == 2 and legacy_end == "open"


def test_hypercorns_own_request_cap_still_holds(start_server, tmp_path) -> None:
    """keep_alive_max_requests (hypercorn's) closes before our larger cap does."""
    config = tmp_path / "hc.py"
    config.write_text("from graceful_close.hypercorn import logger_class  # noqa: F401\n"
                      "keep_alive_max_requests = 2\n")
    plain = hypercorn_server(SAMPLE_ASGI, False, args=["-c", f"file:{config}"])
    port = start_server(plain).port
    responses, end = exchange_on_one_connection(port, [{}] * 3)
    assert [r.header("connection") for r in responses] == [None, "close"] and end == "FIN"
    assert "graceful-close: hypercorn" in plain.log_text()


def test_idle_linger_ends_at_linger_timeout(start_server) -> None:
    """A client that never closes after our FIN is released at linger_timeout (1 s here; the
    opt-in RST makes the release visible to it). Stock never lingers: released at once."""
    env = {"GRACEFUL_CLOSE_LINGER_TIMEOUT": "1", **ABORT_ON_TIMEOUT}
    target = Target("127.0.0.1", _start(start_server, True, env=env).port)
    result = never_closing(target, "/big?size=100000", hold=8, timeout=15)
    assert result.intact and result.ending == "FIN"
    assert result.released_after is not None and 0.5 <= result.released_after <= 8


def test_stop_no_slower_than_stock_and_summary(start_server) -> None:
    """SIGTERM while a client holds a lingering connection: ours exits within 10x stock's time
    (plus the 2 s stop_linger), and logs the exit summary."""
    took = {}
    for ours in (False, True):
        server = _start(start_server, ours)
        target = Target("127.0.0.1", server.port)
        sock = target.connect(10)
        sock.sendall(b"GET /big?size=300000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(20) is not None
        took[ours] = time.monotonic() - started
        sock.close()
        if ours:
            assert "ended_shutdown=1" in server.log_text()  # the exit summary
    assert took[True] <= 10 * took[False] + 3.0, took


def test_tls_close_with_pipelined_requests(start_server, tls_certs) -> None:
    """Over TLS (no half-close: our lingering close ends with close_notify): whole, as stock
    delivers it (its TLS close flushes before the TCP close, so it is not cut)."""
    certdir, ca = tls_certs
    args = ["--certfile", str(certdir / "cert.pem"), "--keyfile", str(certdir / "key.pem")]
    results = {}
    for ours in (False, True):
        server = _start(start_server, ours, args, tls=trusting(ca))
        target = Target("127.0.0.1", server.port, tls=trusting(ca))
        results[ours] = pipelined_after_close(target, "/big?close=1&size=2000000", timeout=20)
    assert results[True].intact, (results[True].body_bytes, results[True].ending)
    assert results[False].intact == results[True].intact


def test_no_descriptor_leaks(start_server) -> None:
    """After pipelined closes, early 413s and resets mid-upload, the worker's descriptors go
    back to where they were once the lingering connections end."""
    server = _start(start_server, True, env={"GRACEFUL_CLOSE_LINGER_TIMEOUT": "0.5"})
    worker = worker_pid(server.pid)  # the worker hypercorn spawned
    target = Target("127.0.0.1", server.port)
    pipelined_after_close(target, "/big?close=1&size=200000", timeout=10)
    before = fd_count(worker)
    for _ in range(5):
        pipelined_after_close(target, "/big?close=1&size=200000", timeout=10)
        early_response_upload(target, "/upload?size=100000", 1 << 20, timeout=10)
        sock = target.connect(5)
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n" + b"x" * 1000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        sock.close()
    assert wait_until(lambda: fd_count(worker) <= before, 10), (fd_count(worker), before)


@pytest.mark.parametrize("mode", ["h2c", "tls-alpn"])
def test_http2_is_served_as_stock_serves_it(start_server, tls_certs, mode: str) -> None:
    certdir, ca = tls_certs
    tls = mode == "tls-alpn"
    args = ["--certfile", str(certdir / "cert.pem"), "--keyfile", str(certdir / "key.pem")] if tls else []
    served = {}
    for ours in (False, True):
        server = _start(start_server, ours, args, tls=trusting(ca) if tls else None)
        base = f"{'https' if tls else 'http'}://127.0.0.1:{server.port}"
        with httpx.Client(http1=False, http2=True, verify=trusting(ca) if tls else False,
                          timeout=10) as client:
            answers = [client.get(f"{base}/big?size={size}") for size in (3, 300_000, 2_000_000)]
        served[ours] = [(r.http_version, r.status_code, len(r.content)) for r in answers]
    assert served[True] == served[False] and served[True][0][0] == "HTTP/2", served


def test_refusals_are_one_line(tmp_path) -> None:
    """An incompatible hypercorn, and the trio worker, are refused with one line."""
    script = ("import hypercorn.asyncio.run as run; del run.TCPServer\n"
              "import graceful_close.hypercorn\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1 and "graceful-close: hypercorn" in lines[0], lines
    script = ("from hypercorn.config import Config\n"
              "config = Config.from_object('graceful_close.hypercorn')\n"
              "config.worker_class = 'trio'\n"
              "config.log\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1 and "trio worker is not supported" in lines[0], lines
    # From the command line: refused in hypercorn's own process, before it spawns a worker.
    done = subprocess.run([sys.executable, "-m", "hypercorn", "-k", "trio", "-b", "127.0.0.1:0", "-c",
                           "python:graceful_close.hypercorn", SAMPLE_ASGI],
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1 and "trio worker is not supported" in lines[0], lines


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_setting_exits_1_with_one_line(workers) -> None:
    """A bad GRACEFUL_CLOSE_* value stops the hypercorn command itself with status 1 and one
    line. Checked only in a spawned worker, it exited 0: hypercorn 0.18's run() loses the
    worker's exit code."""
    env = {**os.environ, "GRACEFUL_CLOSE_DRAIN_WINDOW": "-1"}
    done = subprocess.run([sys.executable, "-m", "hypercorn", "--workers", workers, "-b", "127.0.0.1:0",
                           "-c", "python:graceful_close.hypercorn", SAMPLE_ASGI],
                          capture_output=True, text=True, timeout=60, env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, (done.returncode, lines)
    assert lines == ["graceful-close: invalid GRACEFUL_CLOSE_DRAIN_WINDOW='-1': "
                     "expected a number of seconds >= 0 and <= 86400"], lines


def test_recipe_config_file(start_server) -> None:
    """integrations/hypercorn_conf.py, started as documented (in integrations/): our settings
    in the start-up line, and the Starlette app's early 413 whole with FIN."""
    integrations = Path(__file__).resolve().parent.parent / "integrations"
    plain = hypercorn_server("starlette_app:app", False, args=["-c", "file:hypercorn_conf.py"])
    server = start_server(ServerProcess(plain.argv, plain.env, cwd=str(integrations)))
    result = early_response_upload(Target("127.0.0.1", server.port), "/upload", 8 << 20, timeout=20)
    assert result.intact and result.ending == "FIN" and result.responses[0].status == 413
    assert "graceful-close: hypercorn" in server.log_text()
    assert "keepalive_requests=100" in server.log_text()


SLOW_APP = "tests.uvicorn_apps:app"  # the sample app plus /slow and a websocket echo


def test_stop_answers_in_flight_requests_with_connection_close(start_server) -> None:
    """A request in flight when the worker stops: both answer it and close; ours says so
    (Connection: close), stock closes without saying it."""
    for ours in (False, True):
        plain = hypercorn_server(SLOW_APP, ours, args=["--graceful-timeout", "5"])
        server = start_server(plain)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            server.signal(signal.SIGTERM)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 200"), data[:200]
        assert (b"connection: close" in head) == ours, head
        assert server.wait(20) is not None


def test_uvloop_worker_with_two_spawned_workers(start_server) -> None:
    """-k uvloop --workers 2: every spawned worker imports our config module by itself."""
    plain = hypercorn_server(SAMPLE_ASGI, True, args=["-k", "uvloop", "--workers", "2"])
    server = start_server(plain)
    target = Target("127.0.0.1", server.port)
    results = [pipelined_after_close(target, "/big?close=1&size=2000000", timeout=20) for _ in range(4)]
    assert all(r.intact and r.ending == "FIN" for r in results), [(r.body_bytes, r.ending) for r in results]
    assert server.log_text().count("graceful-close: hypercorn") == 2  # one line per worker


def test_websocket_as_stock(start_server) -> None:
    """A websocket on hypercorn's h11 path: the same echo and close as stock."""
    from websockets.sync.client import connect

    echoed = {}
    for ours in (False, True):
        server = start_server(hypercorn_server(SLOW_APP, ours))
        with connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10) as ws:
            ws.send("hi")
            echoed[ours] = ws.recv(timeout=10)
    assert echoed[True] == echoed[False] == "echo:hi"


def test_new_clients_are_answered_while_descriptors_are_exhausted() -> None:
    """Issue 20's scenario (benchmarks.reliability.emfile, RLIMIT_NOFILE 64): idle keep-alive
    hogs, then 100 new clients. Near its limit ours closes idle connections with nothing at
    stake, then the oldest lingering ones: before that, the hogs it lingered on after the
    keep-alive timeout held every descriptor and it answered 0 of 100 (stock: 94)."""
    from benchmarks.reliability import emfile

    stock = emfile("hypercorn", "stock", "asyncio")
    ours = emfile("hypercorn", "graceful", "asyncio")
    assert ours["answered"] >= 90 and ours["answered"] >= stock["answered"] - 5, (stock, ours)
    assert ours["recovery"] is not None and ours["recovery"] < 2.0, ours


CLIENT_CLOSE_GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
IMPLICIT_CLOSE_GET = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_lingering_close_setting_by_the_exit_summary(start_server, mode: str) -> None:
    """lingering_close (issue 18, core.closing): 3 GETs with the client's explicit Connection:
    close, then 2 HTTP/1.0 GETs that close only implicitly, each client reading its response
    and the FIN. Under auto the explicit ones close at once, as stock hypercorn closes every
    connection (nothing lingers there, and it has no summary), and only the implicit ones
    linger; under always every close lingers, the readiness probe's too."""
    server = _start(start_server, True, env={"GRACEFUL_CLOSE_LINGERING_CLOSE": mode})
    summary = exit_summary_after(server, [CLIENT_CLOSE_GET] * 3 + [IMPLICIT_CLOSE_GET] * 2)
    # The readiness probe reads 12 bytes and closes: a reset that may reach the server while
    # it still sends, and then ends as an error, not as a close of ours that lingered.
    lingered = summary.get("lingering_started", 0) - summary.get("ended_error", 0)
    if mode == "auto":
        assert lingered == 2 and summary.get("ended_eof") == 2, summary
    else:
        assert 5 <= lingered <= 6 and summary.get("ended_eof", 0) >= 5, summary
