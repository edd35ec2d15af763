"""graceful_close.gunicorn.ASGIWorker against stock `gunicorn -k asgi`, real processes.

Stock gasgi ends a connection with write_eof() and close() at once: unread client bytes
(an upload the app answered early, requests pipelined behind a Connection: close
response) make the kernel send RST, which destroys the response the client has not
read. Every scenario runs against stock too; the stock half is marked xfail(strict=False)
so an upstream fix shows up as XPASS instead of a red CI.
"""

from __future__ import annotations

import signal
import ssl
import threading
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import ServerProcess, gunicorn_server
from graceful_close.diagnostics.processes import fd_count, wait_until, worker_pid
from graceful_close.diagnostics.scenarios import (
    Target,
    early_response_upload,
    never_closing,
    pipelined_after_close,
)
from graceful_close.gunicorn._compat import check_asgi_worker
from tests.helpers import (
    ABORT_ON_TIMEOUT,
    NGINX_LINGER,
    SAMPLE_ASGI,
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

OURS = "graceful_close.gunicorn.ASGIWorker"
STOCK = "asgi"
BIG = 2_000_000

STOCK_CUTS = pytest.mark.xfail(strict=False, reason="stock gasgi closes at once: RST under the response")
STOCK_HAS_NO_POLICY = pytest.mark.xfail(strict=False, reason="stock gasgi has no keep-alive policy")
SERVERS = [pytest.param(STOCK, marks=STOCK_CUTS, id="stock"), pytest.param(OURS, id="ours")]
POLICY_SERVERS = [pytest.param(STOCK, marks=STOCK_HAS_NO_POLICY, id="stock"),
                  pytest.param(OURS, id="ours")]


def asgi_server(worker: str, env: dict[str, str] | None = None,
                args: tuple[str, ...] = ()) -> ServerProcess:
    return gunicorn_server(SAMPLE_ASGI, worker, args=["--keep-alive", "2", *args],
                           env={**SHORT_LINGER, **(env or {})})


def target(server: ServerProcess) -> Target:
    return Target("127.0.0.1", server.port, tls=server.tls)


def test_compat_check_accepts_the_installed_gunicorn() -> None:
    assert check_asgi_worker() is None


REFUSAL = """
import sys
import gunicorn.workers.gasgi as gasgi
async def _serve(self):  # a gunicorn whose _serve no longer builds gasgi.ASGIProtocol
    return None
gasgi.ASGIWorker._serve = _serve
sys.argv = ["gunicorn", "-b", "127.0.0.1:0", "-k", "graceful_close.gunicorn.ASGIWorker",
            "graceful_close.diagnostics.sample_apps:asgi_app"]
from gunicorn.app.wsgiapp import run
run()
"""


def test_refuses_to_start_with_one_line_when_gasgi_no_longer_routes_to_us() -> None:
    assert_one_line_refusal(REFUSAL, "ASGIProtocol")


@pytest.mark.parametrize("worker", SERVERS)
def test_connection_close_response_with_pipelined_requests_arrives_intact(start_server,
                                                                          worker: str) -> None:
    server = start_server(asgi_server(worker))
    results = assert_close_pipelined_intact(target(server), BIG)
    summary = [(r.body_bytes, r.ending) for r in results]
    assert all(r.responses[0].received_length == BIG for r in results), summary


@pytest.mark.parametrize("worker", SERVERS)
def test_early_413_to_an_unread_upload_arrives_intact(start_server, worker: str) -> None:
    """1 MB 413 before the app reads an 8 MB upload; the client reads after sending it all.
    Stock: the 413 is cut (fewer bytes than sent), then RST."""
    server = start_server(asgi_server(worker))
    assert_early_413s_intact(target(server))


@pytest.mark.parametrize("worker", POLICY_SERVERS)
def test_request_cap_ends_the_connection_with_connection_close_and_fin(start_server,
                                                                       worker: str) -> None:
    server = start_server(asgi_server(worker, env={"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "3"}))
    responses, ending = exchange_on_one_connection(server.port, [{}] * 5)
    assert [r.status for r in responses] == [200, 200, 200], (responses, ending)
    assert [r.header("connection") for r in responses] == [None, None, "close"]
    assert ending == "FIN"


@pytest.mark.parametrize("worker", POLICY_SERVERS)
def test_user_agent_rule_disables_keep_alive(start_server, worker: str) -> None:
    """The default 'legacy' rule: Mozilla/2 never gets keep-alive; others keep it."""
    server = start_server(asgi_server(worker))
    legacy, ending = exchange_on_one_connection(server.port, [{"User-Agent": "Mozilla/2.02 (Win95)"}] * 2)
    assert len(legacy) == 1 and legacy[0].header("connection") == "close", legacy
    assert ending == "FIN"
    modern, ending = exchange_on_one_connection(server.port, [{"User-Agent": "Mozilla/5.0"}] * 3)
    assert len(modern) == 3 and ending == "open", (modern, ending)


# ---- TLS -----------------------------------------------------------------------------------

def tls_server(worker: str, certs: tuple[Path, ssl.SSLContext]) -> ServerProcess:
    certdir, client = certs
    plain = asgi_server(worker, env=ABORT_ON_TIMEOUT,  # the release is seen as RST
                        args=("--certfile", str(certdir / "cert.pem"),
                              "--keyfile", str(certdir / "key.pem")))
    return ServerProcess(plain.argv, plain.env, tls=client)


STOCK_WAITS_FOR_CLOSE_NOTIFY = pytest.mark.xfail(
    strict=False, reason="stock: asyncio's SSL close waits up to 30 s for the client's close_notify")


@pytest.mark.parametrize("worker", [pytest.param(STOCK, marks=STOCK_WAITS_FOR_CLOSE_NOTIFY, id="stock"),
                                    pytest.param(OURS, id="ours")])
def test_tls_early_413_intact_and_never_closing_client_released(start_server, certs,
                                                                worker: str) -> None:
    """TLS has no half-close: ours reads and discards until the client closes or
    linger_timeout (0.5 s here), then sends close_notify and releases the socket. Stock
    also gets the 413 through (asyncio's SSL shutdown reads until close_notify), but holds
    a client that never answers close_notify for ssl_shutdown_timeout (30 s)."""
    server = start_server(tls_server(worker, certs))
    upload = early_response_upload(target(server), "/upload?size=1000000", 8 << 20, timeout=20)
    assert upload.intact and upload.body_bytes == 1_000_000 and upload.ending == "FIN", (
        upload.body_bytes, upload.ending, upload.note)
    result = never_closing(target(server), hold=8.0, timeout=10)
    assert result.intact, result.ending
    assert result.released_after is not None and result.released_after < 0.5 + 5, result


# ---- stop ----------------------------------------------------------------------------------

def stock_and_ours_for_stop() -> dict[str, ServerProcess]:
    return {"stock": asgi_server(STOCK, env=NGINX_LINGER), "ours": asgi_server(OURS, env=NGINX_LINGER)}


@pytest.mark.parametrize(("clients", "what"), SIGTERM_CLIENTS)
def test_sigterm_is_no_slower_than_stock(start_server, clients, what: str) -> None:
    assert_sigterm_no_slower_than_stock(start_server, stock_and_ours_for_stop(), clients,
                                        f"asgi SIGTERM with {what}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_quick_stop_ends_lingering_connections_at_once(start_server, sig: int) -> None:
    """A client that trickles bytes after our FIN would linger up to linger_time (30 s);
    SIGINT/SIGQUIT end it at once, as stock ends its connections."""
    server = start_server(asgi_server(OURS, env={"GRACEFUL_CLOSE_LINGER_TIME": "30",
                                                 "GRACEFUL_CLOSE_LINGER_TIMEOUT": "5"}))
    elapsed = seconds_to_exit_while_trickling(server, sig)
    assert elapsed < 5.0, elapsed


# ---- descriptors ---------------------------------------------------------------------------

def test_no_descriptor_leaks_after_lingering_resets_and_never_closing_clients(start_server) -> None:
    """Ours only: what lingers is released within linger_time (2 s here), fds return to the
    count before the traffic."""
    server = start_server(asgi_server(OURS))
    pid = worker_pid(server.pid)
    tgt = target(server)
    before = fd_count(pid)
    for _ in range(3):
        early_response_upload(tgt, "/upload?size=1000000", 4 << 20, timeout=20)
        pipelined_after_close(tgt, f"/big?close=1&size={BIG}", timeout=20)
    resets_mid_upload(server.port, 5)  # clients that reset mid-upload
    holders = [threading.Thread(target=never_closing, args=(tgt,), kwargs={"hold": 1.0, "timeout": 5},
                                daemon=True) for _ in range(5)]
    for holder in holders:
        holder.start()
    for holder in holders:
        holder.join(10)
    assert wait_until(lambda: fd_count(pid) <= before, timeout=2 + 5), (before, fd_count(pid))
