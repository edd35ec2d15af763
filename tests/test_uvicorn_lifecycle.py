"""Start, stop and settings of uvicorn and of gunicorn's UvicornWorker (issue 12 items 1, 2,
7, 8 and 13), stock and ours in the same test where the item compares with stock.

The servers run a tiny app written to a temporary directory, and name only public entry
points (--http graceful_close.uvicorn:..., -k graceful_close.uvicorn_worker.UvicornWorker),
so the same tests run against older checkouts too: run pytest from another directory with
PYTHONPATH=<checkout> and the servers import that checkout (how the failures on the old main
quoted in the docstrings were observed).
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.wire import ConnectionEnded, ResponseReader, request_bytes
from tests.helpers import trickle

APP = textwrap.dedent('''
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
''')
KEEP_ALIVE = 60  # seconds: idle connections stay open for the whole test unless a stop ends them
STOCK_UVICORN = {"httptools": "httptools", "h11": "h11"}
OURS_UVICORN = {"httptools": "graceful_close.uvicorn:HttpToolsProtocol",
                "h11": "graceful_close.uvicorn:H11Protocol"}
STOCK_WORKER = "uvicorn_worker.UvicornWorker"
OURS_WORKER = "graceful_close.uvicorn_worker.UvicornWorker"
SERVERS = ["uvicorn-httptools", "uvicorn-h11", "uvicorn-worker"]
SUMMARY = re.compile(r"graceful-close: (no lingering close|[a-z_]+=\d+( |$))", re.MULTILINE)


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lifecycle-app")
    (directory / "lifecycle_app.py").write_text(APP)
    return directory


def _uvicorn(app_dir: Path, http: str, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    argv = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "0", "--http", http,
            "--app-dir", str(app_dir), "--timeout-keep-alive", str(KEEP_ALIVE), *args,
            "lifecycle_app:app"]
    return ServerProcess(argv, env or {})


def _gunicorn(app_dir: Path, worker: str, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    argv = [sys.executable, "-m", "gunicorn", "-b", "127.0.0.1:0", "-k", worker, "-w", "1",
            "--log-level", "info", "--pythonpath", str(app_dir), "--keep-alive", str(KEEP_ALIVE),
            *args, "lifecycle_app:app"]
    return ServerProcess(argv, env or {})


def _server(app_dir: Path, name: str, kind: str, *args: str) -> ServerProcess:
    """kind is "stock" or "ours"; name is one of SERVERS."""
    if name == "uvicorn-worker":
        return _gunicorn(app_dir, STOCK_WORKER if kind == "stock" else OURS_WORKER, *args)
    http = name.removeprefix("uvicorn-")
    return _uvicorn(app_dir, (STOCK_UVICORN if kind == "stock" else OURS_UVICORN)[http], *args)


def _keep_alive_connection(port: int) -> socket.socket:
    """A connection that made one keep-alive request and got its whole response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(request_bytes("GET", "/", "x"))
        response = ResponseReader(sock, time.monotonic() + 5).read_response()
        assert response.complete and response.header("connection") != "close", response
    except BaseException:
        sock.close()
        raise
    return sock


def _time_to_exit(server: ServerProcess, sig: int, timeout: float) -> float:
    """Seconds from the signal to the process's exit (timeout + 1 if it did not exit)."""
    started = time.monotonic()
    server.signal(sig)
    if server.wait(timeout) is None:
        return timeout + 1
    return time.monotonic() - started


@pytest.fixture
def connections() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


# ---- item 1: a stop does not wait for idle keep-alive clients -------------------------------

def _stop_with_idle_connections(app_dir: Path, name: str, kind: str) -> float:
    server = _server(app_dir, name, kind).start()
    socks = [_keep_alive_connection(server.port) for _ in range(3)]
    try:
        return _time_to_exit(server, signal.SIGTERM, 20)
    finally:
        server.stop()
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("name", SERVERS)
def test_sigterm_does_not_wait_for_idle_keepalive_connections(app_dir: Path, name: str) -> None:
    """Three pooled connections, idle after one request each, then SIGTERM: ours exits no later
    than stock (issue target: stock + 0.5 s; asserted with slack for a loaded machine).
    Old main: uvicorn-httptools 5.1 s, uvicorn-worker 5.3 s (linger_timeout) against 0.2-0.4 s."""
    stock = _stop_with_idle_connections(app_dir, name, "stock")
    ours = _stop_with_idle_connections(app_dir, name, "ours")
    print(f"{name}: SIGTERM with 3 idle keep-alive connections: stock {stock:.2f} s, ours {ours:.2f} s")
    assert ours <= stock + 2.0, (stock, ours)


# ---- item 2: a quick stop is quick -----------------------------------------------------------

def _quick_stop_with_trickling_client(app_dir: Path, name: str, kind: str, sig: int,
                                      client: str) -> float:
    """One connection trickling a byte a second, then `sig`. client "half-received": a
    keep-alive connection whose next request never completes; "lingering": a client that
    got a Connection: close response and goes on sending (ours lingers on it)."""
    # --graceful-timeout bounds stock UvicornWorker, which ignores gunicorn's SIGQUIT until
    # SIGKILL; uvicorn alone has no such bound (ours used to linger for linger_time, 30 s).
    args = ("--graceful-timeout", "10") if name == "uvicorn-worker" else ()
    server = _server(app_dir, name, kind, *args).start()
    sock = _keep_alive_connection(server.port)
    if client == "half-received":
        sock.sendall(b"GET /")
    else:
        sock.sendall(request_bytes("GET", "/", "x", {"Connection": "close"}))
        assert ResponseReader(sock, time.monotonic() + 5).read_response().complete
    stop = threading.Event()
    threading.Thread(target=trickle, args=([sock], stop, 1.0), daemon=True).start()
    try:
        time.sleep(1.5)  # a byte or two more are in
        return _time_to_exit(server, sig, 15)
    finally:
        stop.set()
        server.stop()
        sock.close()


QUICK_STOPS = [
    pytest.param("uvicorn-httptools", signal.SIGINT, "half-received", id="uvicorn-httptools-SIGINT"),
    pytest.param("uvicorn-h11", signal.SIGINT, "half-received", id="uvicorn-h11-SIGINT"),
    pytest.param("uvicorn-worker", signal.SIGINT, "half-received", id="uvicorn-worker-SIGINT"),
    pytest.param("uvicorn-worker", signal.SIGQUIT, "half-received", id="uvicorn-worker-SIGQUIT"),
    pytest.param("uvicorn-httptools", signal.SIGINT, "lingering", id="uvicorn-httptools-SIGINT-lingering"),
    pytest.param("uvicorn-worker", signal.SIGINT, "lingering", id="uvicorn-worker-SIGINT-lingering"),
]


@pytest.mark.parametrize(("name", "sig", "client"), QUICK_STOPS)
def test_quick_stop_ends_every_connection_at_once(app_dir: Path, name: str, sig: int,
                                                  client: str) -> None:
    """SIGINT (uvicorn; gunicorn sends its workers SIGQUIT) and SIGQUIT (gunicorn) end every
    connection at once. Old main: 28.8 s for the UvicornWorker under the default
    --graceful-timeout, linger_time (30 s) for uvicorn alone; stock uvicorn 0.2 s, stock
    UvicornWorker --graceful-timeout (it ignores SIGQUIT until SIGKILL)."""
    stock = _quick_stop_with_trickling_client(app_dir, name, "stock", sig, client)
    ours = _quick_stop_with_trickling_client(app_dir, name, "ours", sig, client)
    print(f"{name}: {signal.Signals(sig).name} with a {client} trickling client: "
          f"stock {stock:.2f} s, ours {ours:.2f} s")
    assert ours < 5.0, (stock, ours)
    assert ours <= stock + 2.0, (stock, ours)


# ---- item 13: the exit summary ---------------------------------------------------------------

RUN_WITH_CLASS = textwrap.dedent('''
    import uvicorn

    from graceful_close.uvicorn import H11Protocol

    if __name__ == "__main__":  # our module is imported before the server runs
        uvicorn.run("lifecycle_app:app", host="127.0.0.1", port=0, http=H11Protocol)
''')


@pytest.mark.parametrize("how", ["httptools", "h11", "uvicorn.run-class"])
def test_sigterm_without_open_connections_logs_the_exit_summary(app_dir: Path, how: str) -> None:
    """uvicorn leaves by re-raising SIGTERM, so atexit never runs; old main logged the summary
    only when the last connection of a stopping server ended, i.e. never with none open."""
    if how == "uvicorn.run-class":
        script = app_dir / "run_with_class.py"
        script.write_text(RUN_WITH_CLASS)
        server = ServerProcess([sys.executable, str(script)]).start()
    else:
        server = _uvicorn(app_dir, OURS_UVICORN[how]).start()  # its readiness probe has closed
    try:
        time.sleep(0.5)
        before = len(server.log)
        assert server.wait(0) is None
        assert _time_to_exit(server, signal.SIGTERM, 10) <= 10, server.log_text()
        time.sleep(0.2)  # the log pump reads the last lines
        after = server.log[before:].decode("utf-8", "replace")
        assert SUMMARY.search(after), after
    finally:
        server.stop()


# ---- item 7: settings made in code reach spawned workers ----------------------------------------

SCRIPT = textwrap.dedent('''
    import sys

    import uvicorn

    from graceful_close import configure

    if __name__ == "__main__":
        configure(keepalive_requests=2)
        uvicorn.run("lifecycle_app:app", host="127.0.0.1", port=0, workers=2,
                    http=sys.argv[1], timeout_keep_alive=60)
''')


@pytest.mark.parametrize("http", ["graceful_close.uvicorn:H11Protocol",
                                  "graceful_close.uvicorn:HttpToolsProtocol"])
def test_settings_made_in_code_reach_spawned_workers(app_dir: Path, http: str) -> None:
    """uvicorn.run(workers=2) spawns its workers: old main's configure() set a module global in
    the parent only, so no response ever said Connection: close at keepalive_requests=2."""
    script = app_dir / "run_two_workers.py"
    script.write_text(SCRIPT)
    server = ServerProcess([sys.executable, str(script), http]).start()
    try:
        for _ in range(4):  # whichever worker accepts the connection
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                reader = ResponseReader(sock, time.monotonic() + 5)
                heads = []
                for _ in range(2):
                    sock.sendall(request_bytes("GET", "/", "x"))
                    heads.append(reader.read_response().header("connection"))
                assert heads[0] != "close" and heads[1] == "close", (heads, server.log_text())
                assert reader.read_end() == "FIN"
    finally:
        server.stop()


# ---- item 8: a bad setting stops the server with one line ------------------------------------

def _run_to_exit(argv: list[str], env: dict[str, str], timeout: float = 30) -> tuple[int | None, str]:
    """Exit status and output; None if it was still running after `timeout` (then killed)."""
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


BAD = {"GRACEFUL_CLOSE_LINGER_TIME": "abc"}
BAD_LINE = ("graceful-close: invalid GRACEFUL_CLOSE_LINGER_TIME='abc': "
            "expected a number of seconds > 0 and <= 86400")


@pytest.mark.parametrize("how", ["uvicorn-workers-2", "uvicorn", "gunicorn"])
def test_a_bad_setting_exits_non_zero_with_one_line(app_dir: Path, how: str) -> None:
    """Old main under `uvicorn --workers 2`: every spawned worker printed the error and died,
    uvicorn respawned it, forever (32 lines in 8 s), and never exited."""
    if how == "gunicorn":
        argv = _gunicorn(app_dir, OURS_WORKER).argv
    else:
        workers = ["--workers", "2"] if how == "uvicorn-workers-2" else []
        argv = _uvicorn(app_dir, OURS_UVICORN["h11"], *workers).argv
    status, output = _run_to_exit(argv, BAD)
    assert status is not None, f"still running after 30 s:\n{output}"
    assert status != 0, output
    assert [line for line in output.splitlines() if "graceful-close" in line] == [BAD_LINE], output
    assert "Traceback" not in output, output


# ---- item 1: --max-requests restarts do not stall accepting ------------------------------------

class IdlePool:
    """A proxy's pool: `size` keep-alive connections, idle after one request each; one the
    server closes is replaced by a new one (so every worker generation has idle clients)."""

    def __init__(self, port: int, size: int = 3) -> None:
        self.port = port
        self.size = size
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> IdlePool:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        for sock in self.socks:
            sock.close()

    def _run(self) -> None:
        while not self.stop.is_set():
            while len(self.socks) < self.size and not self.stop.is_set():
                try:
                    self.socks.append(_keep_alive_connection(self.port))
                except (OSError, ConnectionEnded, AssertionError):  # a worker restarting
                    time.sleep(0.05)
            readable, _, _ = select.select(self.socks, [], [], 0.05)
            for sock in readable:  # the server ended it (idle connections get no data)
                self.socks.remove(sock)
                sock.close()


def _requests_served(port: int, seconds: float) -> int:
    """Requests answered in `seconds`, one after another on a keep-alive connection that is
    replaced whenever the server ends it (as a worker restart does)."""
    served = 0
    end = time.monotonic() + seconds
    sock: socket.socket | None = None
    while time.monotonic() < end:
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=3)
                reader = ResponseReader(sock, 0)
            sock.sendall(request_bytes("GET", "/", "x"))
            reader.deadline = time.monotonic() + 3
            response = reader.read_response()
            served += response.complete
            if response.header("connection") == "close":
                raise ConnectionEnded("FIN")
        except (OSError, ConnectionEnded):  # the worker is stopping: a new connection
            if sock is not None:
                sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return served


def _served_across_restarts(app_dir: Path, worker: str) -> int:
    server = _gunicorn(app_dir, worker, "--max-requests", "40").start()
    try:
        with IdlePool(server.port):
            return _requests_served(server.port, 10.0)
    finally:
        server.stop()


def test_max_requests_restarts_do_not_stall_accepting(app_dir: Path) -> None:
    """One UvicornWorker restarting every 40 requests while a pool holds 3 idle keep-alive
    connections: the old worker must not wait for them before it exits. Old main waited
    linger_timeout (5 s) on every restart: 77 requests in 15 s instead of 762."""
    stock = _served_across_restarts(app_dir, STOCK_WORKER)
    ours = _served_across_restarts(app_dir, OURS_WORKER)
    print(f"uvicorn-worker --max-requests 40 with 3 idle pooled connections, 10 s: "
          f"stock {stock} requests, ours {ours}")
    assert stock >= 80, stock  # restarts happened: the comparison means something
    assert ours >= stock / 2, (stock, ours)


# ---- issue 10: a uvicorn that no longer works the way we rely on refuses to start -------------

INCOMPATIBLE_UVICORN = textwrap.dedent('''
    import sys

    import uvicorn.server
    from uvicorn.main import main

    async def shutdown(self, sockets=None):  # a release that awaits before closing connections
        pass

    uvicorn.server.Server.shutdown = shutdown
    sys.exit(main())
''')
INCOMPATIBLE_UVICORN_WORKER = textwrap.dedent('''
    import sys

    import uvicorn_worker
    from gunicorn.app.wsgiapp import run

    def install_sigquit_handler(self):  # a release that no longer routes SIGQUIT to handle_exit
        pass

    uvicorn_worker.UvicornWorker._install_sigquit_handler = install_sigquit_handler
    sys.exit(run())
''')


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_an_incompatible_uvicorn_refuses_to_start_with_one_line(app_dir: Path, server: str) -> None:
    if server == "uvicorn":
        script, argv = INCOMPATIBLE_UVICORN, _uvicorn(app_dir, OURS_UVICORN["h11"]).argv[3:]
        expected = "Server.shutdown no longer shuts connections down before it awaits"
    else:
        script, argv = INCOMPATIBLE_UVICORN_WORKER, _gunicorn(app_dir, OURS_WORKER).argv[3:]
        expected = "uvicorn-worker no longer routes SIGQUIT to handle_exit"
    status, output = _run_to_exit([sys.executable, "-c", script, *argv], {})
    assert status is not None and status != 0, output
    lines = [line for line in output.splitlines() if "graceful-close" in line]
    assert len(lines) == 1 and expected in lines[0] and "uvicorn 0." in lines[0], output
    assert "Traceback" not in output and "Booting worker" not in output, output
