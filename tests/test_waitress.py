"""waitress with our channel (`python -m graceful_close.waitress`, waitress-serve's options)
against stock waitress-serve, side by side in each test, on real waitress processes.

Stock waitress closes with a plain socket.close() and stops reading once it has decided to
close: a Connection: close response with requests pipelined behind it is cut at about
128 kB with RST, and its own 413 (max_request_body_size) to an upload ends with RST while
the client is still sending. Ours delivers them whole and ends with FIN.

waitress reads a whole request body (up to max_request_body_size) before it calls the app,
so an app's own early 413 is not early on waitress: nothing is left unread, and the
connection stays open, on stock and ours alike.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import ServerProcess, waitress_server
from graceful_close.diagnostics.scenarios import (
    Target,
    early_response_upload,
    never_closing,
    pipelined_after_close,
)
from tests.helpers import (
    ABORT_ON_TIMEOUT,
    SAMPLE_WSGI,
    exchange_on_one_connection,
    expect_stock_failure,
    fd_count,
    exit_summary_after,
    wait_until,
)

LIMIT = "--max-request-body-size=1024"


def _start(start_server, ours: bool, args: list[str] = (),
           env: dict[str, str] | None = None) -> ServerProcess:
    return start_server(waitress_server(SAMPLE_WSGI, ours, args=[LIMIT, *args], env=env))


def test_close_response_with_pipelined_requests(start_server) -> None:
    """Stock: cut (about 128,000 of 2,000,000 B) and RST; ours: whole, then FIN."""
    results = {}
    for ours in (False, True):
        target = Target("127.0.0.1", _start(start_server, ours).port)
        results[ours] = pipelined_after_close(target, "/big?close=1&size=2000000", timeout=20)
    assert results[True].intact and results[True].ending == "FIN", results[True].ending
    expect_stock_failure(not results[False].intact and results[False].ending == "RST",
                         "waitress cuts a close with pipelined requests")


def test_waitress_own_413_to_an_unread_upload(start_server) -> None:
    """waitress answers 413 by itself (max_request_body_size) and closes with the upload
    unread. Stock: RST while the client still sends (the upload fails); ours: the 413, FIN,
    and the whole upload sent."""
    results = {}
    for ours in (False, True):
        target = Target("127.0.0.1", _start(start_server, ours).port)
        results[ours] = early_response_upload(target, "/", 8 << 20, timeout=20)
    ours = results[True]
    assert ours.intact and ours.ending == "FIN" and not ours.note, (ours.ending, ours.note)
    assert ours.responses[0].status == 413
    stock = results[False]
    expect_stock_failure(stock.ending == "RST" or bool(stock.note), "waitress resets a 413")


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


def test_idle_linger_ends_at_linger_timeout(start_server) -> None:
    """A client that never closes after our FIN is released at linger_timeout (1 s here, the
    loop's sweep at least once a second; the opt-in RST makes the release visible)."""
    env = {"GRACEFUL_CLOSE_LINGER_TIMEOUT": "1", **ABORT_ON_TIMEOUT}
    target = Target("127.0.0.1", _start(start_server, True, env=env).port)
    result = never_closing(target, "/big?size=100000", hold=8, timeout=15)
    assert result.intact and result.ending == "FIN"
    assert result.released_after is not None and 0.5 <= result.released_after <= 8


def test_stop_and_exit_summary(start_server) -> None:
    """SIGTERM while a client holds a lingering connection with bytes at stake: ours ends it
    by the stop rule (stop_linger, 2 s) and exits with the summary; stock waitress dies at
    once on SIGTERM. Without lingering connections ours exits as fast as stock (10x-loose)."""
    took = {}
    for ours in (False, True):
        server = _start(start_server, ours)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(20) is not None
        took[ours] = time.monotonic() - started
    assert took[True] <= 10 * took[False] + 1.0, took
    server = _start(start_server, True)
    sock = Target("127.0.0.1", server.port).connect(10)
    sock.sendall(b"GET /big?size=300000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                 b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.5)  # the response sits unread: bytes at stake
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(20) is not None
    assert time.monotonic() - started <= 2.0 + 3.0
    sock.close()
    assert "ended_shutdown=1" in server.log_text()


def test_no_descriptor_leaks(start_server) -> None:
    """After pipelined closes, 413s and resets mid-upload, the server's descriptors go back to
    where they were once the lingering connections end."""
    server = _start(start_server, True, env={"GRACEFUL_CLOSE_LINGER_TIMEOUT": "0.5"})
    target = Target("127.0.0.1", server.port)
    pipelined_after_close(target, "/big?close=1&size=200000", timeout=10)
    time.sleep(1.5)  # that one has ended (linger_timeout 0.5 s, swept at least once a second)
    before = fd_count(server.pid)
    for _ in range(5):
        pipelined_after_close(target, "/big?close=1&size=200000", timeout=10)
        early_response_upload(target, "/", 1 << 20, timeout=10)
        sock = target.connect(5)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n" + b"x" * 100)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        sock.close()
    assert wait_until(lambda: fd_count(server.pid) <= before, 10), (fd_count(server.pid), before)


def test_incompatible_waitress_is_refused_with_one_line() -> None:
    script = ("import waitress.channel as c\n"
              "c.HTTPChannel.task_class = object\n"
              "import sys\n"
              "from graceful_close.waitress.server import main\n"
              "sys.exit(main(['x', '--listen=127.0.0.1:0', "
              "'graceful_close.diagnostics.sample_apps:wsgi_app']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if "graceful-close: waitress" in line]
    assert done.returncode != 0 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr


def test_recipe_waitress_serve(start_server) -> None:
    """integrations/waitress_serve.py, started as documented: our settings in the start-up
    line, and waitress's own 413 (its limit, 1 MB) to an 8 MB upload whole with FIN."""
    recipe = Path(__file__).resolve().parent.parent / "integrations" / "waitress_serve.py"
    server = start_server(ServerProcess([sys.executable, str(recipe), "127.0.0.1:0"]))
    result = early_response_upload(Target("127.0.0.1", server.port), "/upload", 8 << 20, timeout=20)
    assert result.intact and result.ending == "FIN" and result.responses[0].status == 413
    assert "graceful-close: graceful_close.waitress.serve" in server.log_text()
    assert "keepalive_requests=100" in server.log_text()


def test_more_than_1024_lingering_sockets_keep_the_loop_alive(start_server) -> None:
    """1,100 HTTP/1.0 clients read their answer and never close: ours lingers on every one, so the
    server holds descriptors above 1023, where waitress's default select() would fail and end
    its loop (measured with --no-asyncore-use-poll: "filedescriptor out of range in select()"
    at the 1,016th client). Ours runs waitress on poll() unless asked: a new client is still
    answered."""
    server = start_server(waitress_server(SAMPLE_WSGI, True))
    held = []
    try:
        for _ in range(1100):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            # HTTP/1.0, closing implicitly: it lingers under lingering_close=auto too
            sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.")
            held.append(sock)
        assert fd_count(server.pid) > 1100
        responses, _ = exchange_on_one_connection(server.port, [{}])
        assert responses and responses[0].status == 200
    finally:
        for sock in held:
            sock.close()


CLIENT_CLOSE_GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
IMPLICIT_CLOSE_GET = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_lingering_close_setting_by_the_exit_summary(start_server, mode: str) -> None:
    """lingering_close (issue 18, core.closing): 3 GETs with the client's explicit Connection:
    close, then 2 HTTP/1.0 GETs that close only implicitly, each client reading its response
    and the FIN. Under auto the explicit ones close at once, as stock waitress closes every
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
