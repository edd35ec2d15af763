"""graceful_close.gunicorn.SyncLingerWorker and ThreadWorker against real gunicorn processes.

Stock gunicorn 27 closes with util.close_graceful: SHUT_WR, then a blocking read of
at most 2 s / 64 KiB on the worker's own thread (the gthread poller). The tests show
what that costs (stock runs in the same test) and that our workers do not pay it.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import GUNICORN_WORKERS, ServerProcess, gunicorn_server
from graceful_close.diagnostics.scenarios import (
    Target,
    early_response_upload,
    never_closing,
    timed_request,
    trickling,
)
from graceful_close.diagnostics.wire import ResponseReader, request_bytes
from tests.helpers import ABORT_ON_TIMEOUT, SAMPLE_WSGI, count_state, fd_count, wait_until, worker_pids

REPO = Path(__file__).resolve().parent.parent
LINGER_TIMEOUT = 0.5
LINGER_TIME = 2.0
SHORT_LINGER = {"GRACEFUL_CLOSE_LINGER_TIMEOUT": str(LINGER_TIMEOUT),
                "GRACEFUL_CLOSE_LINGER_TIME": str(LINGER_TIME)}
KINDS = ("sync", "gthread")


def worker_class(kind: str, ours: bool) -> str:
    return GUNICORN_WORKERS[kind][1 if ours else 0]


def target(server: ServerProcess) -> Target:
    return Target("127.0.0.1", server.port)


# ---- early response to an upload the app never reads ----------------------------------

@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
@pytest.mark.parametrize("kind", KINDS)
def test_early_413_to_unread_upload_arrives_intact(start_server, kind: str, ours: bool) -> None:
    """8 MB upload, 1 MB 413 sent before the app reads anything; the client reads only
    after sending it all. Stock: 64 KiB drained, then RST truncates the 413."""
    server = start_server(gunicorn_server(SAMPLE_WSGI, worker_class(kind, ours), env=SHORT_LINGER))
    results = [early_response_upload(target(server), "/upload?size=1000000", 8 << 20, timeout=20)
               for _ in range(3)]
    summary = [(r.intact, r.ending, r.body_bytes, r.note) for r in results]
    if ours:
        assert all(r.intact and r.ending == "FIN" and not r.note for r in results), summary
        assert all(r.responses[0].status == 413 and r.body_bytes == 1_000_000 for r in results)
    else:
        assert not any(r.intact for r in results), summary


# ---- clients that never close must not stall anyone else --------------------------------

def _normal_request_seconds(port: int, timeout: float = 5.0) -> float:
    """One request on a new connection; seconds until its response is complete."""
    return timed_request(Target("127.0.0.1", port), timeout)


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
@pytest.mark.parametrize("kind", KINDS)
def test_never_closing_clients_do_not_stall_a_normal_client(start_server, kind: str,
                                                            ours: bool) -> None:
    """50 clients that read their response and never close arrive one per 20 ms; a
    normal client meanwhile sends one request after another. One worker (gthread: two
    threads): stock lingers 2 s per such client on the worker, ours hands it off."""
    # Not --threads for sync: stock sync would become stock gthread (and ours our ThreadWorker).
    threads = ["--threads", "2"] if kind == "gthread" else []
    server = start_server(gunicorn_server(SAMPLE_WSGI, worker_class(kind, ours), args=threads,
                                          env={"GRACEFUL_CLOSE_LINGER_TIMEOUT": "1"}))
    tgt = target(server)
    holders = []
    for _ in range(50):
        thread = threading.Thread(target=never_closing, args=(tgt,),
                                  kwargs={"hold": 1.0, "timeout": 3.0}, daemon=True)
        thread.start()
        holders.append(thread)
        time.sleep(0.02)
    latencies = []
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        latencies.append(_normal_request_seconds(server.port))
    worst = max(latencies)
    server.stop()
    for thread in holders:
        thread.join(10)
    print(f"{kind} {'ours' if ours else 'stock'}: {len(latencies)} requests, "
          f"worst {worst * 1000:.0f} ms")
    if ours:
        assert worst < 1.0, latencies
    else:
        assert worst >= 1.5, latencies


# ---- release, CLOSE_WAIT and fds -------------------------------------------------------

@pytest.fixture(scope="module", params=KINDS)
def our_server(request):
    server = gunicorn_server("tests.apps_gunicorn:app", worker_class(request.param, True),
                             args=["--pythonpath", str(REPO), "--keep-alive", "1"],
                             env={**SHORT_LINGER, **ABORT_ON_TIMEOUT})  # release seen as RST
    with server:
        server.kind = request.param  # type: ignore[attr-defined]
        yield server


def _released_after_keepalive_expiry(port: int, hold: float) -> float | None:
    """A keep-alive request, then silence: the server ends the idle connection (FIN)
    and then releases it; seconds from that FIN to the release (None: never)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_bytes("GET", "/", "x"))
        reader = ResponseReader(sock, time.monotonic() + 5)
        reader.read_response()
        if reader.read_end() != "FIN":
            return None
        fin_at = time.monotonic()
        while time.monotonic() - fin_at < hold:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return time.monotonic() - fin_at
            time.sleep(0.02)
    return None


def test_silent_client_released_after_linger_timeout(our_server) -> None:
    """Every close path lingers on the lingerer: the silent client is released (with
    abort_on_timeout=true: RST, sent only once every response byte is acknowledged)
    linger_timeout after the FIN.
    Stock closes plainly after 2 s and the client never learns it (orphan FIN_WAIT_2)."""
    tgt = target(our_server)
    paths = ["/", "/raise", "/raise-after-headers", "/upload?size=200000"]
    for path in paths:
        result = never_closing(tgt, path, hold=LINGER_TIMEOUT * 10)
        assert result.ending == "FIN", (path, result.as_dict())
        assert result.released_after is not None, (path, result.as_dict())
        assert LINGER_TIMEOUT / 2 <= result.released_after <= LINGER_TIMEOUT * 10, path
    if our_server.kind == "gthread":  # keep-alive expiry (--keep-alive 1), TConn.close()
        released = _released_after_keepalive_expiry(our_server.port, LINGER_TIMEOUT * 10)
        assert released is not None and LINGER_TIMEOUT / 2 <= released <= LINGER_TIMEOUT * 10


def test_trickling_client_released_after_linger_time(our_server) -> None:
    """A byte every 0.2 s keeps the idle timer alive; linger_time still ends it."""
    result = trickling(target(our_server), every=0.2, hold=LINGER_TIME * 10)
    assert result.ending == "FIN" and result.released_after is not None, result.as_dict()
    assert LINGER_TIME / 2 <= result.released_after <= LINGER_TIME * 10


def _one_connection(port: int, style: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if style == 0:  # whole exchange, close after the server's EOF
            sock.sendall(request_bytes("GET", "/", "x", {"Connection": "close"}))
            reader = ResponseReader(sock, time.monotonic() + 5)
            reader.read_response()
            reader.read_end()
        elif style == 1:  # half a request, then gone
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        elif style == 2:  # request sent, then reset without reading
            sock.sendall(request_bytes("GET", "/", "x"))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:  # body the app never reads, then close without reading
            sock.sendall(request_bytes("POST", "/upload?size=1000", "x", body=b"b" * 20000))


def test_fds_and_close_wait_return_to_baseline(our_server) -> None:
    """1,000 connections of four kinds (normal, half request, reset, unread body): no
    fd is leaked and no server socket is left in CLOSE_WAIT."""
    port = our_server.port
    worker = worker_pids(our_server.pid)[0]
    for style in range(4):  # warm up: the drain engine and its epoll exist now
        _one_connection(port, style)
    assert wait_until(lambda: count_state(port, "ESTAB") == 0, 5)
    baseline = fd_count(worker)

    def run(offset: int) -> None:
        for i in range(offset, 1000, 4):
            _one_connection(port, i % 4)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert wait_until(lambda: fd_count(worker) <= baseline, LINGER_TIME * 5), \
        (fd_count(worker), baseline)
    assert wait_until(lambda: count_state(port, "CLOSE-WAIT") == 0, 5)
    assert worker_pids(our_server.pid) == [worker]  # no worker crashed or restarted


# ---- settings are checked in the master --------------------------------------------------

def _run_gunicorn(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gunicorn", "-b", "127.0.0.1:0", "-w", "1", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO,
                          env={**os.environ, **env})


@pytest.mark.parametrize("how", ["env", "configure", "hooks"])
def test_bad_setting_stops_gunicorn_with_one_line(tmp_path: Path, how: str) -> None:
    """check_config (env), configure() in gunicorn.conf.py and the hooks' on_starting."""
    env: dict[str, str] = {}
    args = ["-k", "graceful_close.gunicorn.ThreadWorker"]
    # Issue 17 item 8: what the user wrote, where: the variable and its text, or the keyword.
    expected = "graceful-close: invalid GRACEFUL_CLOSE_LINGER_TIME='-1': expected a number of seconds > 0"
    if how == "env":
        env["GRACEFUL_CLOSE_LINGER_TIME"] = "-1"
    elif how == "configure":
        conf = tmp_path / "gunicorn.conf.py"
        conf.write_text("from graceful_close import configure\n"
                        "configure(linger_time=-1.0)\n")
        args += ["-c", str(conf)]
        expected = "graceful-close: invalid linger_time=-1.0: expected a number of seconds > 0"
    else:
        conf = tmp_path / "gunicorn.conf.py"
        conf.write_text("from graceful_close.gunicorn_hooks import on_starting, pre_request\n")
        args = ["-k", "gthread", "-c", str(conf)]
        env["GRACEFUL_CLOSE_LINGER_TIME"] = "-1"
    done = _run_gunicorn([*args, SAMPLE_WSGI], env)
    ours = [line for line in done.stderr.splitlines() if line.startswith("graceful-close:")]
    assert done.returncode != 0
    assert len(ours) == 1 and ours[0].startswith(expected), done.stderr
    assert "Traceback" not in done.stderr


def test_importing_the_module_does_not_import_uvicorn() -> None:
    code = ("import sys, graceful_close.gunicorn as g; "
            "assert 'uvicorn' not in sys.modules; assert callable(g.configure)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_quick_stop_does_not_wait_for_lingering_clients(start_server) -> None:
    """SIGINT: lingering sockets are closed at once (grace 0), not after linger_time."""
    server = start_server(gunicorn_server(SAMPLE_WSGI, worker_class("gthread", True),
                                          env={"GRACEFUL_CLOSE_LINGER_TIMEOUT": "30",
                                               "GRACEFUL_CLOSE_LINGER_TIME": "60"}))
    holder = threading.Thread(target=never_closing, args=(target(server),),
                              kwargs={"hold": 5.0}, daemon=True)
    holder.start()
    time.sleep(0.5)
    start = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.wait(10) is not None
    assert time.monotonic() - start < 5
    holder.join(10)


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
def test_error_after_headers_counts_the_connection_once(start_server, tmp_path: Path,
                                                        ours: bool) -> None:
    """gthread closes twice after an error mid-response; stock's second close raises
    (EBADF) and finish_request decrements nr_conns twice, so it drifts below zero
    (and a graceful stop stops waiting for connections still open). Ours stays exact."""
    conf = tmp_path / "log_nr_conns.py"
    conf.write_text("def pre_request(worker, req):\n"
                    "    worker.log.warning('nr_conns=%d', worker.nr_conns)\n")
    server = start_server(gunicorn_server(SAMPLE_WSGI, worker_class("gthread", ours),
                                          args=["-c", str(conf)]))
    time.sleep(0.5)  # the launcher's readiness request must be finished and uncounted first
    for path in ["/raise-after-headers", "/raise-after-headers", "/"]:
        never_closing(target(server), path, hold=0)
        time.sleep(0.2)  # let the poller run finish_request before the next accept
    counts = [line.rsplit("nr_conns=", 1)[1] for line in server.log_text().splitlines()
              if "nr_conns=" in line][-3:]
    if ours:
        assert counts == ["1", "1", "1"], counts
    else:
        assert counts != ["1", "1", "1"], counts
