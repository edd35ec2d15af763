"""What the app hands over is never consumed (issue 12 item 3).

The ASGI spec allows response headers as any iterable of pairs. Stock uvicorn copies
them into a list; main up to 54101d7 looked for the app's own Connection: close by
iterating them first, so a generator arrived empty at uvicorn and the response went
out without the app's headers (no Content-Length: chunked framing, no custom header).
Each case runs stock and ours in the same test: keep-alive responses, the response
that the request cap ends (Connection: close added by us), the app's own close, and
keepalive_header on (the Keep-Alive header is added through the same path).
"""

from __future__ import annotations

import time

import pytest

from graceful_close.diagnostics.wire import ResponseReader, request_bytes
from tests.uvicorn_servers import Fleet

APP = "tests.uvicorn_apps:generator_headers_app"
HTTPS = ("httptools", "h11", "zttp")
CAP = 2


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    yield fleet
    fleet.stop()


def _exchange(fleet: Fleet, kind: str, http: str, env: dict[str, str], paths: list[str]) -> list:
    t = fleet.target(kind, http, app=APP, env=env)
    with t.connect(5) as sock:
        responses = []
        for path in paths:
            sock.sendall(request_bytes("GET", path, t.authority))
            response = ResponseReader(sock, time.monotonic() + 5).read_response()
            assert response.complete, (kind, http, path)
            responses.append(response)
    return responses


@pytest.mark.parametrize("keepalive_header", ["false", "true"])
@pytest.mark.parametrize("http", HTTPS)
def test_headers_given_as_a_generator_are_all_sent(fleet, http, keepalive_header) -> None:
    if http == "zttp":
        pytest.importorskip("zttp")
    env = {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": str(CAP),
           "GRACEFUL_CLOSE_KEEPALIVE_HEADER": keepalive_header}
    stock = _exchange(fleet, "stock", http, env, ["/", "/?close=1"])
    ours = _exchange(fleet, "ours", http, env, ["/", "/"])  # the 2nd hits the cap
    ours_app_close = _exchange(fleet, "ours", http, env, ["/?close=1"])
    for response in [*stock, *ours, *ours_app_close]:
        assert response.header("x-from-generator") == "yes", response.headers
        assert response.header("content-length") == "2", response.headers
        assert response.body_prefix == b"ok"
    assert ours[0].header("connection") is None
    assert ours[1].header("connection") == "close"
    assert ours_app_close[0].header("connection") == "close"
    assert (ours[0].header("keep-alive") is not None) == (keepalive_header == "true")
