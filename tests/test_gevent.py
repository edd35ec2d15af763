"""Stock `gunicorn -k gevent` checked with the same scenarios, and our GeventWorker.

What stock gevent does (gunicorn 27.0.1, gevent 26.9), asserted here so a change shows:
- its keep-alive parser reads a Content-Length body the app did not read before the next
  request, so an early 413 to an unread 8 MB upload arrives whole, then FIN;
- a client that never closes stalls no one (each connection has its own greenlet, and the
  close does not wait for the client);
- gunicorn drops an app's own "Connection: close" header (hop-by-hop) and keeps the
  connection, so requests pipelined behind that response are all answered;
- but a connection that ends is closed with a plain close(): requests pipelined behind a
  Connection: close response are unread, the kernel sends RST and the 2 MB response is
  cut (~128 KB). It also has no request cap, age cap or User-Agent rule.
That failure is why graceful_close.gunicorn.GeventWorker exists; the stock half of those
tests is marked xfail(strict=False) so an upstream fix is reported, not a red CI.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import ServerProcess, gunicorn_server
from graceful_close.diagnostics.processes import fd_count, wait_until, worker_pid
from graceful_close.diagnostics.scenarios import (
    Target,
    never_closing,
    pipelined,
    pipelined_after_close,
    timed_request,
)
from graceful_close.diagnostics.wire import request_bytes
from tests.helpers import (
    NGINX_LINGER,
    SHORT_LINGER,
    SIGTERM_CLIENTS,
    assert_close_pipelined_intact,
    assert_early_413s_intact,
    assert_one_line_refusal,
    assert_sigterm_no_slower_than_stock,
    exchange_on_one_connection,
    resets_mid_upload,
    seconds_to_exit_while_trickling,
)

pytest.importorskip("gevent")

REPO = Path(__file__).resolve().parent.parent
APP = "tests.apps_gevent:app"
OURS = "graceful_close.gunicorn.GeventWorker"
STOCK = "gevent"
BIG = 2_000_000

STOCK_CUTS = pytest.mark.xfail(strict=False, reason="stock gevent closes with a plain close(): RST")
STOCK_HAS_NO_POLICY = pytest.mark.xfail(strict=False, reason="stock gevent has no keep-alive policy")
BOTH = [pytest.param(STOCK, id="stock"), pytest.param(OURS, id="ours")]


def gevent_server(worker: str, env: dict[str, str] | None = None) -> ServerProcess:
    return gunicorn_server(APP, worker, args=["--pythonpath", str(REPO), "--keep-alive", "2"],
                           env={**SHORT_LINGER, **(env or {})})


def target(server: ServerProcess) -> Target:
    return Target("127.0.0.1", server.port)


REFUSAL = """
import sys
from gunicorn.workers import base_async
def handle(self, listener, client, addr):  # a gunicorn that no longer ends with util.close
    client.shutdown(2)
base_async.AsyncWorker.handle = handle
sys.argv = ["gunicorn", "-b", "127.0.0.1:0", "-k", "graceful_close.gunicorn.GeventWorker",
            "graceful_close.diagnostics.sample_apps:wsgi_app"]
from gunicorn.app.wsgiapp import run
run()
"""


def test_compat_check_and_one_line_refusal_when_gunicorn_no_longer_routes_to_us() -> None:
    from graceful_close.gunicorn._compat import check_gevent_worker

    assert check_gevent_worker() is None
    assert_one_line_refusal(REFUSAL, "util.close")


@pytest.mark.parametrize("worker", [pytest.param(STOCK, marks=STOCK_CUTS, id="stock"),
                                    pytest.param(OURS, id="ours")])
def test_connection_close_response_with_pipelined_requests_arrives_intact(start_server,
                                                                          worker: str) -> None:
    server = start_server(gevent_server(worker))
    assert_close_pipelined_intact(target(server), BIG)


@pytest.mark.parametrize("worker", BOTH)
def test_early_413_to_an_unread_upload_arrives_intact(start_server, worker: str) -> None:
    """Stock passes too: its keep-alive parser reads the unread body before closing."""
    server = start_server(gevent_server(worker))
    assert_early_413s_intact(target(server))


@pytest.mark.parametrize("worker", BOTH)
def test_never_closing_clients_do_not_stall_a_normal_client(start_server, worker: str) -> None:
    """30 clients that read their response and never close, one per 20 ms; meanwhile a
    normal client's requests stay fast (stock: a greenlet per connection, no wait at close;
    ours: the linger is a greenlet of its own)."""
    server = start_server(gevent_server(worker))
    holders = [threading.Thread(target=never_closing, args=(target(server),),
                                kwargs={"hold": 1.0, "timeout": 3.0}, daemon=True) for _ in range(30)]
    for holder in holders:
        holder.start()
        time.sleep(0.02)
    latencies = [timed_request(target(server), 5.0) for _ in range(20)]
    for holder in holders:
        holder.join(10)
    assert max(latencies) < 1.0, latencies


@pytest.mark.parametrize("worker", BOTH)
def test_app_connection_close_with_pipelined_requests_keeps_every_response(start_server,
                                                                           worker: str) -> None:
    """gunicorn drops the app's hop-by-hop Connection header and keeps the connection:
    the 2 MB response and the five GETs pipelined behind it are all answered, no RST."""
    server = start_server(gevent_server(worker))
    tgt = target(server)
    first = request_bytes("GET", f"/app-close?size={BIG}", tgt.authority)
    rest = [request_bytes("GET", "/", tgt.authority)] * 5
    result = pipelined(tgt, [first, *rest], expected=6, timeout=20)
    assert result.intact and result.responses[0].received_length == BIG, (result.body_bytes,
                                                                         result.ending)
    assert result.responses[0].header("connection") != "close"
    assert result.ending == "FIN", result.ending  # the keep-alive timeout, later


@pytest.mark.parametrize("worker", [pytest.param(STOCK, marks=STOCK_HAS_NO_POLICY, id="stock"),
                                    pytest.param(OURS, id="ours")])
def test_request_cap_and_user_agent_rule(start_server, worker: str) -> None:
    server = start_server(gevent_server(worker, env={"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "3"}))
    responses, ending = exchange_on_one_connection(server.port, [{}] * 5)
    assert [r.header("connection") for r in responses] == ["keep-alive", "keep-alive", "close"], \
        (responses, ending)
    assert ending == "FIN"
    legacy, ending = exchange_on_one_connection(server.port, [{"User-Agent": "Mozilla/2.02"}] * 2)
    assert len(legacy) == 1 and legacy[0].header("connection") == "close", legacy
    assert ending == "FIN"


@pytest.mark.parametrize("worker", [pytest.param(STOCK, marks=STOCK_CUTS, id="stock"),
                                    pytest.param(OURS, id="ours")])
def test_tls_connection_close_response_with_pipelined_requests(start_server, certs,
                                                               worker: str) -> None:
    """Over TLS too (gevent's SSL socket reads ahead little): stock cuts the response, then RST."""
    certdir, client = certs
    plain = gunicorn_server(APP, worker, args=["--pythonpath", str(REPO), "--keep-alive", "2",
                                               "--certfile", str(certdir / "cert.pem"),
                                               "--keyfile", str(certdir / "key.pem")],
                            env=SHORT_LINGER)
    server = start_server(ServerProcess(plain.argv, plain.env, tls=client))
    result = pipelined_after_close(Target("127.0.0.1", server.port, tls=client),
                                   f"/big?close=1&size={BIG}", follow=2000, timeout=20)
    assert result.intact and result.responses[0].received_length == BIG, (result.body_bytes,
                                                                         result.ending)
    assert result.ending == "FIN", result.ending


# ---- stop ----------------------------------------------------------------------------------

def stock_and_ours_for_stop() -> dict[str, ServerProcess]:
    return {"stock": gevent_server(STOCK, env=NGINX_LINGER), "ours": gevent_server(OURS, env=NGINX_LINGER)}


@pytest.mark.parametrize(("clients", "what"), SIGTERM_CLIENTS)
def test_sigterm_is_no_slower_than_stock(start_server, clients, what: str) -> None:
    assert_sigterm_no_slower_than_stock(start_server, stock_and_ours_for_stop(), clients,
                                        f"gevent SIGTERM with {what}")


def test_sigint_ends_a_lingering_connection_at_once(start_server) -> None:
    server = start_server(gevent_server(OURS, env={"GRACEFUL_CLOSE_LINGER_TIME": "30",
                                                   "GRACEFUL_CLOSE_LINGER_TIMEOUT": "5"}))
    elapsed = seconds_to_exit_while_trickling(server, signal.SIGINT)
    assert elapsed < 5.0, elapsed


def test_no_descriptor_leaks(start_server) -> None:
    server = start_server(gevent_server(OURS))
    pid = worker_pid(server.pid)
    tgt = target(server)
    before = fd_count(pid)
    for _ in range(3):
        pipelined_after_close(tgt, f"/big?close=1&size={BIG}", timeout=20)
    resets_mid_upload(server.port, 5)  # clients that reset while their upload is unread
    for _ in range(3):
        never_closing(tgt, hold=0.5, timeout=5)
    assert wait_until(lambda: fd_count(pid) <= before, timeout=2 + 5), (before, fd_count(pid))
