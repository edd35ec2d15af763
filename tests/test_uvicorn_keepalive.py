"""Keep-alive policy in graceful_close.uvicorn's protocols, against real uvicorn.

Stock uvicorn has no request cap, age cap or User-Agent rule. The plain close
that a cap done the stock way ends in (the app answers Connection: close on the
10th request: tests.uvicorn_apps.plain_close_cap_app) is run on the same
scenario and shown to truncate it.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import pytest
import requests

from graceful_close.diagnostics.scenarios import ScenarioResult, Target, pipelined
from graceful_close.diagnostics.wire import ResponseReader, request_bytes
from tests.helpers import count_state, tcp_states
from tests.uvicorn_servers import LINGER_TIME, TEST_APP, Fleet, make_server

CAP = 10
AGE = 2.0  # keepalive_time, seconds
IDLE = 5   # --timeout-keep-alive
POLICY = {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": str(CAP),
          "GRACEFUL_CLOSE_KEEPALIVE_TIME": str(AGE)}
LEGACY_UA = "Mozilla/2.02 (Macintosh; I; PPC)"
MODERN_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
COOKIE = "a" * 12000  # enough pipelined bytes that uvicorn cannot read them all ahead
HTTPS = ("httptools", "h11", "zttp")


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    yield fleet
    fleet.stop()


def capped(fleet: Fleet, http: str, keepalive_header: bool = False) -> Target:
    env = {**POLICY, "GRACEFUL_CLOSE_KEEPALIVE_HEADER": str(keepalive_header).lower()}
    return fleet.target("ours", http, args=("--timeout-keep-alive", str(IDLE)), env=env,
                        app=TEST_APP)


def hundred_pipelined(t: Target) -> ScenarioResult:
    request = request_bytes("GET", "/big?size=100000", t.authority, {"Cookie": COOKIE})
    return pipelined(t, [request] * 100, expected=CAP, name="cap")


@pytest.mark.parametrize("keepalive_header", [False, True])
@pytest.mark.parametrize("http", HTTPS)
def test_cap_answers_exactly_cap_pipelined_requests_then_fin(fleet, http, keepalive_header) -> None:
    """Only the response that ends the connection says Connection: close; a Keep-Alive
    header only when keepalive_header asks for it (nginx sends none by default)."""
    result = hundred_pipelined(capped(fleet, http, keepalive_header))
    assert result.complete_responses == CAP and len(result.responses) == CAP, result.as_dict()
    assert result.ending == "FIN", result.as_dict()
    assert result.body_bytes == CAP * 100_000
    for served, response in enumerate(result.responses, 1):
        if served < CAP:
            expected = f"timeout={IDLE}, max={CAP - served}" if keepalive_header else None
            assert response.header("keep-alive") == expected
            assert response.header("connection") is None
        else:
            assert response.header("connection") == "close"
            assert response.header("keep-alive") is None


STOCK_CUTS = pytest.mark.xfail(strict=False, reason="stock uvicorn cuts it; XPASS = fixed upstream")


@STOCK_CUTS
@pytest.mark.parametrize("http", HTTPS)
def test_stock_with_a_plain_close_at_the_cap_passes_the_same_scenario(fleet, http) -> None:
    """Stock uvicorn with the cap done by the app (Connection: close on request 10): the
    stock half of the cap scenario, expected to fail (zttp passes it: XPASS)."""
    t = fleet.target("stock", http, app="tests.uvicorn_apps:plain_close_cap_app")
    result = hundred_pipelined(t)
    assert result.complete_responses == CAP and result.ending == "FIN", result.as_dict()


@pytest.mark.parametrize("client", ["requests", "httpx"])
@pytest.mark.parametrize("http", HTTPS)
def test_http_clients_make_25_requests_over_3_connections(fleet, http, client) -> None:
    t = capped(fleet, http)
    url = f"http://127.0.0.1:{t.port}/port"
    with (requests.Session() if client == "requests" else httpx.Client()) as session:
        ports = []
        for _ in range(25):
            response = session.get(url, timeout=5)
            assert response.status_code == 200
            ports.append(response.text)
    assert len(set(ports)) == 3, ports
    assert [ports.count(p) for p in dict.fromkeys(ports)] == [10, 10, 5]


def _get(sock: socket.socket, user_agent: str) -> dict[str, str]:
    sock.sendall(request_bytes("GET", "/", "x", {"User-Agent": user_agent}))
    response = ResponseReader(sock, time.monotonic() + 5).read_response()
    assert response.complete
    return response.headers


@pytest.mark.parametrize("http", HTTPS)
def test_legacy_user_agent_gets_connection_close_on_its_first_response(fleet, http) -> None:
    t = capped(fleet, http)
    with t.connect(5) as sock:
        headers = _get(sock, LEGACY_UA)
        assert headers.get("connection") == "close"
        assert ResponseReader(sock, time.monotonic() + 5).read_end() == "FIN"
    with t.connect(5) as sock:
        headers = _get(sock, MODERN_UA)
        assert "connection" not in headers and "keep-alive" not in headers
        assert "connection" not in _get(sock, MODERN_UA)  # still the same connection


@pytest.mark.parametrize("http", HTTPS)
def test_connection_age_cap(fleet, http) -> None:
    t = capped(fleet, http)
    with t.connect(5) as sock:
        assert "connection" not in _get(sock, MODERN_UA)
        time.sleep(AGE + 0.3)
        assert _get(sock, MODERN_UA).get("connection") == "close"
        assert ResponseReader(sock, time.monotonic() + 5).read_end() == "FIN"


@pytest.mark.parametrize("kind", [pytest.param("stock", marks=STOCK_CUTS), "ours"])
@pytest.mark.parametrize("http", HTTPS)
def test_sigterm_finishes_in_flight_requests_with_connection_close(start_server, kind,
                                                                   http) -> None:
    """SIGTERM while a slow 2 MB response is in flight with requests pipelined behind it,
    and an idle keep-alive connection open: the response must carry Connection: close
    and arrive whole, then FIN; the idle connection gets a FIN; all within the stop.
    Stock fails it: h11 closes after the response without saying so (no Connection: close);
    httptools marks only the last pipelined request, so the in-flight response says nothing
    and the stop waits for every pipelined request to be served."""
    server = start_server(make_server(kind, http, app=TEST_APP, keep_alive=30))
    t = Target("127.0.0.1", server.port)
    idle = t.connect(5)
    idle.sendall(request_bytes("GET", "/", t.authority))
    assert ResponseReader(idle, time.monotonic() + 5).read_response().complete
    threading.Timer(0.4, server.signal, args=(signal.SIGTERM,)).start()
    started = time.monotonic()
    slow = request_bytes("GET", "/slow?s=1&size=2000000", t.authority)
    result = pipelined(t, [slow, request_bytes("GET", "/", t.authority) * 5], expected=1,
                       read_delay=1.5)
    idle_ending = ResponseReader(idle, time.monotonic() + 5).read_end()
    idle.close()
    assert server.wait(LINGER_TIME + 5) is not None
    assert result.intact and result.ending == "FIN", result.as_dict()
    assert result.responses[0].header("connection") == "close", result.as_dict()
    assert idle_ending == "FIN"
    assert time.monotonic() - started < 1 + LINGER_TIME + 2
    assert count_state(server.port, "CLOSE-WAIT") == 0, tcp_states(server.port)


@pytest.mark.parametrize("http", HTTPS)
def test_keepalive_header_only_on_responses_that_keep_the_connection(fleet, http) -> None:
    """With keepalive_header on: Keep-Alive on a kept connection, none when the client's
    request ends it (Connection: close, HTTP/1.0), which then says Connection: close."""
    t = capped(fleet, http, keepalive_header=True)
    with t.connect(5) as sock:
        headers = _get(sock, MODERN_UA)
        assert headers.get("keep-alive", "").startswith("timeout="), headers
        sock.sendall(request_bytes("GET", "/", t.authority, {"Connection": "close"}))
        response = ResponseReader(sock, time.monotonic() + 5).read_response()
        assert response.header("connection") == "close" and response.header("keep-alive") is None
    with t.connect(5) as sock:
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {t.authority}\r\n\r\n".encode())
        response = ResponseReader(sock, time.monotonic() + 5).read_response()
        assert response.complete and response.header("keep-alive") is None, response.headers
