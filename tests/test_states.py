"""`graceful-close states` sees real leaked sockets: CLOSE_WAIT held by a process that
never closes, and FIN_WAIT2 orphans that no process holds any more."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import wait_until

# Accepts and never closes: every client that closes leaves a CLOSE_WAIT socket here.
LEAKY_SERVER = """
import socket
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
held = []
while True:
    conn, _ = srv.accept()
    held.append(conn)  # the leak: never closed
"""

# Accepts and closes at once: clients that never close leave orphans in FIN_WAIT2.
CLOSING_SERVER = """
import socket
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    conn.close()
"""


@pytest.fixture
def run_server():
    started: list[subprocess.Popen] = []

    def start(source: str) -> tuple[int, int]:
        proc = subprocess.Popen([sys.executable, "-c", source], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        port = int(proc.stdout.readline())
        return port, proc.pid

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def states(*args: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "graceful_close.diagnostics.cli", "states", *args],
                          capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout, done.stderr


def census(*args: str) -> dict:
    status, out, err = states(*args, "--json")
    assert status == 0, err
    return json.loads(out)


def test_census_sees_leaked_close_wait(run_server) -> None:
    port, pid = run_server(LEAKY_SERVER)
    assert census("--port", str(port))["states"]["CLOSE_WAIT"]["total"] == 0
    for _ in range(3):
        socket.create_connection(("127.0.0.1", port)).close()
    assert wait_until(lambda: census("--port", str(port))["states"]["CLOSE_WAIT"]["total"] == 3,
                      timeout=5)
    by_port = census("--port", str(port))
    assert by_port["close_wait_by_pid"] == {str(pid): 3}
    by_pid = census("--pid", str(pid))
    assert by_pid["states"]["CLOSE_WAIT"] == {"total": 3, "owned": 3, "no_owner": 0}
    assert by_pid["states"]["LISTEN"]["owned"] == 1
    status, table, _ = states("--pid", str(pid), "--port", str(port))
    assert status == 0
    assert "CLOSE_WAIT" in table and f"held by pid {pid}: 3" in table


def test_census_counts_orphans_psutil_cannot_see(run_server) -> None:
    """The server closed; the clients never do: the server's sockets become orphans in
    FIN_WAIT2 that belong to no process. --pid still counts them on its listening port."""
    port, pid = run_server(CLOSING_SERVER)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        assert wait_until(
            lambda: census("--pid", str(pid))["states"]["FIN_WAIT2"]["no_owner"] == 2, timeout=5)
        found = census("--pid", str(pid))
        assert found["states"]["FIN_WAIT2"]["owned"] == 0  # what psutil alone would report
        assert found["orphans_counted"] is True
        assert isinstance(found["tcp_fin_timeout"], int)
    finally:
        for client in clients:
            client.close()


def test_watch_prints_one_json_line_per_sample(run_server) -> None:
    port, _ = run_server(LEAKY_SERVER)
    start = time.monotonic()
    status, out, err = states("--port", str(port), "--watch", "0.2", "--samples", "3", "--json")
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["states"]["LISTEN"]["total"] == 1 for line in lines)
    assert time.monotonic() - start < 20


def test_ipv6_sockets_are_decoded() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no ::1 here")
    with server:
        from graceful_close.diagnostics.states import kernel_sockets

        port = server.getsockname()[1]
        mine = [s for s in kernel_sockets() or [] if s.local_port == port]
        assert [(s.state, s.local) for s in mine] == [("LISTEN", f"::1:{port}")]
