"""Keep-alive policy in graceful_close.gunicorn.ThreadWorker, against real gunicorn.

Stock gthread has no request cap, no age cap and no User-Agent rule: it keeps a
connection for as many requests as the client sends, so "exactly N, then FIN"
cannot fail there for lack of a cap. What a plain close does to pipelined requests
behind the last response (RST, truncation) is shown with stock uvicorn in the
uvicorn tests; the same scenario here must end with a FIN and no RST.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import requests

from graceful_close.diagnostics.launch import GUNICORN_WORKERS, ServerProcess, gunicorn_server
from graceful_close.diagnostics.scenarios import Target, pipelined
from graceful_close.diagnostics.wire import Response, ResponseReader, request_bytes
from tests.helpers import exchange_on_one_connection, wait_until

REPO = Path(__file__).resolve().parent.parent
APP = "tests.apps_gunicorn:app"
OURS = GUNICORN_WORKERS["gthread"][1]
STOCK = GUNICORN_WORKERS["gthread"][0]
CAP = 10
IDLE = 5  # gunicorn --keep-alive
LEGACY_UA = "Mozilla/2.02 (X11; I; FreeBSD 2.1.5-RELEASE i386)"
MODERN_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


def _server(worker: str, env: dict[str, str], *args: str) -> ServerProcess:
    return gunicorn_server(APP, worker, args=["--pythonpath", str(REPO), "--threads", "4",
                                              "--keep-alive", str(IDLE), *args],
                           env={"GRACEFUL_CLOSE_LINGER_TIMEOUT": "1", **env})


@pytest.fixture(scope="module")
def capped():
    with _server(OURS, {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": str(CAP),
                        "GRACEFUL_CLOSE_KEEPALIVE_TIME": "0",
                        "GRACEFUL_CLOSE_KEEPALIVE_HEADER": "true"}) as server:
        yield server


def test_no_keep_alive_header_unless_configured(start_server) -> None:
    """keepalive_header is off by default (like nginx): only the response that ends the
    connection says anything beyond "Connection: keep-alive"."""
    server = start_server(_server(OURS, {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "3"}))
    responses, ending = exchange_on_one_connection(server.port, [{}] * 4)
    assert [r.header("connection") for r in responses] == ["keep-alive", "keep-alive", "close"]
    assert [r.header("keep-alive") for r in responses] == [None, None, None]
    assert ending == "FIN"


def test_pipelined_past_the_cap_get_exactly_cap_responses_then_fin(capped) -> None:
    """100 pipelined requests, cap 10: responses 1..10 whole, then a FIN (no RST), so
    the client knows exactly where to resend from."""
    req = request_bytes("GET", "/big?size=20000", "x")
    result = pipelined(Target("127.0.0.1", capped.port), [req] * 100, expected=CAP)
    assert result.complete_responses == CAP and len(result.responses) == CAP, result.as_dict()
    assert result.ending == "FIN", result.as_dict()
    assert result.body_bytes == CAP * 20000
    for number, response in enumerate(result.responses, 1):
        if number < CAP:
            assert response.header("connection") == "keep-alive"
            assert response.header("keep-alive") == f"timeout={IDLE}, max={CAP - number}"
        else:
            assert response.header("connection") == "close"
            assert response.header("keep-alive") is None


def test_requests_session_reconnects_after_the_cap(capped) -> None:
    """25 requests, cap 10: all succeed, over exactly 3 connections (server-side ports)."""
    with requests.Session() as session:
        ports = [session.get(f"http://127.0.0.1:{capped.port}/port", timeout=5).text
                 for _ in range(25)]
    assert len(ports) == 25 and len(set(ports)) == 3


def test_httpx_client_reconnects_after_the_cap(capped) -> None:
    with httpx.Client(timeout=5) as client:
        responses = [client.get(f"http://127.0.0.1:{capped.port}/port") for _ in range(25)]
    assert all(r.status_code == 200 for r in responses)
    assert len({r.text for r in responses}) == 3


def test_legacy_user_agent_gets_connection_close_at_once(capped) -> None:
    responses, ending = exchange_on_one_connection(capped.port, [{"User-Agent": LEGACY_UA}] * 2)
    assert len(responses) == 1 and responses[0].header("connection") == "close"
    assert ending == "FIN"
    responses, ending = exchange_on_one_connection(capped.port, [{"User-Agent": MODERN_UA}] * 2)
    assert [r.header("connection") for r in responses] == ["keep-alive"] * 2
    assert ending == "open"


def test_connection_age_cap(start_server) -> None:
    """keepalive_time=1: a request well after 1 s from accept gets Connection: close. The age
    is read from the loop's clock (one read per loop turn, at least once a second), so
    the cap is coarse by up to a second, like nginx's cached clock."""
    server = start_server(_server(OURS, {"GRACEFUL_CLOSE_KEEPALIVE_TIME": "1"}))
    responses, ending = exchange_on_one_connection(server.port, [{}, {}, {}], pause=2.5)
    assert [r.header("connection") for r in responses] == ["keep-alive", "close"]
    assert ending == "FIN"


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
def test_sigterm_finishes_in_flight_with_close_and_exits_in_time(start_server,
                                                                 ours: bool) -> None:
    """SIGTERM while one request is in flight and one connection idles in keep-alive:
    the in-flight response arrives whole with Connection: close (stock announces
    keep-alive on it), the idle connection ends with FIN (not RST: nothing was at stake,
    so it is closed plainly, not lingered over), and the worker exits by itself within
    graceful_timeout."""
    graceful_timeout = 6
    server = start_server(_server(OURS if ours else STOCK, {},
                                  "--graceful-timeout", str(graceful_timeout)))
    idle_responses: list[Response] = []
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    idle.sendall(request_bytes("GET", "/", "x"))
    idle_reader = ResponseReader(idle, time.monotonic() + 10)
    idle_responses.append(idle_reader.read_response())

    slow: dict[str, object] = {}

    def slow_request() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(request_bytes("GET", "/slow?s=1.5", "x"))
            reader = ResponseReader(sock, time.monotonic() + 10)
            slow["response"] = reader.read_response()
            if slow["response"].header("connection") == "close":  # type: ignore[union-attr]
                slow["ending"] = reader.read_end()

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)
    stop_at = time.monotonic()
    server.signal(signal.SIGTERM)
    thread.join(graceful_timeout + 5)
    idle_ending = idle_reader.read_end()  # the server ends the idle connection
    reset = wait_until(lambda: idle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0,
                       1.0, interval=0.05)
    idle.close()
    exit_code = server.wait(graceful_timeout + 5)
    stopped_after = time.monotonic() - stop_at

    response = slow["response"]
    assert isinstance(response, Response) and response.complete and response.status == 200
    assert idle_ending == "FIN"
    assert exit_code is not None and stopped_after < graceful_timeout, stopped_after
    assert "Worker exiting" in server.log_text()  # left by itself, not SIGKILLed
    assert not reset
    if ours:
        assert response.header("connection") == "close" and slow.get("ending") == "FIN"
    else:
        assert response.header("connection") == "keep-alive"
