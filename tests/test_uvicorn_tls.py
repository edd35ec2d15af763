"""TLS: no half-close there (SSL transports cannot write_eof), so ours reads and
discards until the client closes or a deadline, then closes with close_notify.

asyncio's SSL layer reads ahead up to 256 KiB of what the client pipelines, so a
few pipelined requests are harmless even to stock uvicorn; 20,000 of them (about
0.8 MB) stay unread in the kernel when stock closes, and its 2 MB response is cut.
"""

from __future__ import annotations

import pytest

from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.scenarios import Target, never_closing, pipelined_after_close
from tests.helpers import ABORT_ON_TIMEOUT
from tests.uvicorn_servers import LINGER_TIME, tls_server

BIG = 2_000_000
FOLLOW = 20_000


@pytest.fixture(scope="module")
def servers(certs):
    started: dict[tuple[str, str, str], ServerProcess] = {}

    def get(kind: str, http: str, loop: str) -> Target:
        key = (kind, http, loop)
        if key not in started:
            # abort_on_timeout: a never-closing client's release is seen as the RST it gets
            started[key] = tls_server(kind, http, loop, *certs, env=ABORT_ON_TIMEOUT).start()
        return Target("127.0.0.1", started[key].port, tls=certs[1])

    yield get
    for server in started.values():
        server.stop()


STOCK_FAILS = pytest.mark.xfail(strict=False, reason="stock uvicorn cuts it; XPASS = fixed upstream")


@pytest.mark.parametrize("kind, http, loop", [
    pytest.param("stock", "httptools", "asyncio", id="stock-httptools-asyncio", marks=STOCK_FAILS),
    pytest.param("ours", "httptools", "asyncio", id="ours-httptools-asyncio"),
    pytest.param("ours", "httptools", "uvloop", id="ours-httptools-uvloop"),
    pytest.param("ours", "h11", "uvloop", id="ours-h11-uvloop"),
    pytest.param("stock", "zttp", "uvloop", id="stock-zttp-uvloop", marks=STOCK_FAILS),
    pytest.param("ours", "zttp", "uvloop", id="ours-zttp-uvloop"),
])
def test_pipelined_requests_behind_a_connection_close_response_over_tls(servers, kind, http,
                                                                        loop) -> None:
    if http == "zttp":
        pytest.importorskip("zttp")
    result = pipelined_after_close(servers(kind, http, loop), f"/big?close=1&size={BIG}",
                                   follow=FOLLOW)
    assert result.intact and result.ending == "FIN", result.as_dict()
    assert result.body_bytes == BIG


@pytest.mark.parametrize("http, loop", [("httptools", "asyncio"), ("h11", "uvloop"), ("zttp", "uvloop")])
def test_never_closing_tls_client_is_released(servers, http, loop) -> None:
    """After the idle deadline ours sends close_notify, then RST once it is acknowledged."""
    result = never_closing(servers("ours", http, loop), hold=LINGER_TIME + 5)
    assert result.responses and result.responses[0].complete, result.as_dict()
    assert result.released_after is not None and result.released_after < LINGER_TIME + 5
