"""HTTP/2 with our worker classes: served exactly as the stock class serves it (issue 11 item 5).

gunicorn 27 serves HTTP/2 over TLS (ALPN) and cleartext (h2c, prior knowledge from the
trusted peers in forwarded_allow_ips, which include 127.0.0.1). Our classes keep gunicorn's
own HTTP/2 code paths: only the final close of the connection is ours (it lingers). This
test shows that a deployment with HTTP/2 on keeps it: for each pair, the same client gets
the same answers over the same protocol version from stock and from ours. Were one of our
classes to drop HTTP/2, it would have to log one start-up line saying it serves HTTP/1.1
only, and this test would then fail on the protocol version.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx  # with http2=True it needs the h2 package (gunicorn needs it to serve HTTP/2 too)
import pytest
import trustme

from graceful_close.diagnostics.launch import ServerProcess, gunicorn_server
from tests.helpers import trusting

WSGI = "graceful_close.diagnostics.sample_apps:wsgi_app"
ASGI = "graceful_close.diagnostics.sample_apps:asgi_app"
PAIRS = [  # (app, stock worker, our worker, extra args)
    pytest.param(WSGI, "gthread", "graceful_close.gunicorn.ThreadWorker", ["--threads", "2"],
                 id="gthread"),
    pytest.param(ASGI, "asgi", "graceful_close.gunicorn.ASGIWorker", [], id="asgi"),
    pytest.param(WSGI, "gevent", "graceful_close.gunicorn.GeventWorker", [], id="gevent"),
]
H2C = ["--http-protocols", "h2,h1", "--http2-cleartext", "prior-knowledge"]
H2_TLS = ["--http-protocols", "h2,h1"]
SIZES = (3, 300_000, 2_000_000)


def _exchange(client: httpx.Client, base: str) -> list[tuple[str, int, int]]:
    """Sequential requests, then five concurrent streams on the same connection."""
    answers = [client.get(f"{base}/big?size={size}") for size in SIZES]
    with ThreadPoolExecutor(5) as pool:
        answers += list(pool.map(lambda size: client.get(f"{base}/big?size={size}"), [100_000] * 5))
    return [(r.http_version, r.status_code, len(r.content)) for r in answers]


# gunicorn 27's threaded HTTP/2 sometimes ends a connection carrying concurrent TLS streams with
# GOAWAY(PROTOCOL_ERROR): measured 1 exchange in 25 on stock gthread and 1 in 25 on ours
# (--threads 2). Both classes get the same retries, so a difference still fails the test.
ATTEMPTS = 3


def _served(server: ServerProcess, ca: trustme.CA | None) -> list[tuple[str, int, int]]:
    scheme = "https" if ca is not None else "http"
    verify = trusting(ca) if ca is not None else False
    for attempt in range(ATTEMPTS):
        # http1=False over http:// is prior knowledge (h2c); over https:// ALPN offers h2 only.
        with httpx.Client(http1=False, http2=True, verify=verify, timeout=10) as client:
            try:
                return _exchange(client, f"{scheme}://127.0.0.1:{server.port}")
            except httpx.RemoteProtocolError:
                if attempt == ATTEMPTS - 1:
                    raise
    raise AssertionError("unreachable")


@pytest.mark.parametrize("mode", ["h2c", "tls-alpn"])
@pytest.mark.parametrize("app, stock, ours, extra", PAIRS)
def test_http2_is_served_as_stock_serves_it(start_server, tls_certs, mode: str, app: str, stock: str,
                                            ours: str, extra: list[str]) -> None:
    certdir, ca = tls_certs
    tls = mode == "tls-alpn"
    args = [*extra, *(H2_TLS + ["--certfile", str(certdir / "cert.pem"),
                                "--keyfile", str(certdir / "key.pem")] if tls else H2C)]
    served = {}
    for worker in (stock, ours):
        plain = gunicorn_server(app, worker, args=args)
        server = start_server(ServerProcess(plain.argv, plain.env,
                                            tls=trusting(ca) if tls else None))
        served[worker] = _served(server, ca if tls else None)
        server.stop()
        assert "HTTP/1.1 only" not in server.log_text()
    assert served[stock] == served[ours], served
    assert {version for version, _, _ in served[ours]} == {"HTTP/2"}, served[ours]
    assert [length for _, _, length in served[ours]] == [*SIZES, *[100_000] * 5]
