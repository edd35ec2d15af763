"""The threaded engine on real loopback TCP sockets (no server): hand-off, endings, bounds."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from graceful_close.core import Counters
from graceful_close.engines.threaded import Lingerer
from graceful_close.settings import Settings
from tests.helpers import wait_until


@pytest.fixture
def listener():
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def pair(listener):
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return client, server


def make(**kw) -> tuple[Lingerer, Counters]:
    counters = Counters()
    return Lingerer(Settings(**kw), counters=counters), counters


def read_all(sock: socket.socket, timeout: float = 10) -> tuple[int, str]:
    sock.settimeout(timeout)
    got = 0
    try:
        while data := sock.recv(1 << 16):
            got += len(data)
    except ConnectionResetError:
        return got, "RST"
    return got, "FIN"


def test_response_survives_unread_upload(listener):
    """With a plain close() this loses the response to RST; handed off, it arrives whole."""
    lingerer, counters = make(linger_time=5, linger_timeout=2)
    client, server = pair(listener)
    client.sendall(b"x" * 300_000)  # upload the server never reads
    server.sendall(b"R" * 500_000)
    lingerer.hand_off(server)
    time.sleep(0.3)
    assert read_all(client) == (500_000, "FIN")
    client.close()
    assert wait_until(lambda: counters.ended_eof == 1, 5)
    assert counters.bytes_discarded == 300_000 and counters.lingering_now == 0
    lingerer.stop(1)


def test_plain_close_loses_the_same_response(listener):
    """The failure the engine exists for, shown with the same sockets and a plain close()."""
    client, server = pair(listener)
    client.sendall(b"x" * 300_000)
    server.sendall(b"R" * 500_000)
    server.close()
    time.sleep(0.3)
    got, end = read_all(client)
    assert end == "RST" and got < 500_000


def test_hand_off_returns_at_once_and_detaches(listener):
    lingerer, _ = make()
    client, server = pair(listener)
    started = time.monotonic()
    lingerer.hand_off(server)
    assert time.monotonic() - started < 0.5
    assert server.fileno() == -1
    lingerer.hand_off(server)  # a second hand-off of the same object does nothing
    server.close()             # nor does the server's own close afterwards
    client.close()
    lingerer.stop(2)


def test_idle_and_total_deadlines(listener):
    lingerer, counters = make(linger_time=1.5, linger_timeout=0.4)
    silent, s1 = pair(listener)
    trickler, s2 = pair(listener)
    lingerer.hand_off(s1)
    lingerer.hand_off(s2)
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.1):
            try:
                trickler.send(b"t")
            except OSError:
                return
    threading.Thread(target=trickle, daemon=True).start()
    assert wait_until(lambda: counters.ended_idle_timeout == 1, 5)
    assert wait_until(lambda: counters.ended_total_timeout == 1, 1.5 + 5)
    stop.set()
    # Both clients had acknowledged everything, so the engine closed them with RST.
    assert counters.aborted_with_rst == 2
    lingerer.stop(1)


def test_timeout_never_destroys_unacknowledged_response(listener):
    """A client that stops reading leaves response bytes unacked: the timeout must not RST them."""
    lingerer, counters = make(linger_time=1, linger_timeout=0.3)
    client, server = pair(listener)
    server.setblocking(False)
    sent = 0
    try:
        while sent < 20_000_000:
            sent += server.send(b"D" * 65536)
    except BlockingIOError:
        pass  # the send queue is full: bytes are waiting for the client's window
    lingerer.hand_off(server)
    assert wait_until(lambda: counters.ended_idle_timeout == 1, 5)
    assert counters.aborted_with_rst == 0
    assert read_all(client, timeout=20) == (sent, "FIN")


def test_full_set_evicts_oldest(listener):
    lingerer, counters = make(max_lingering=3, linger_time=30, linger_timeout=30)
    clients = []
    for _ in range(5):
        client, server = pair(listener)
        clients.append(client)
        lingerer.hand_off(server)
    assert wait_until(lambda: counters.ended_evicted == 2, 5)
    assert lingerer.lingering == 3
    for client in clients:
        client.close()
    assert wait_until(lambda: counters.lingering_now == 0, 5)
    lingerer.stop(1)


def test_stop_closes_what_is_left_within_grace(listener):
    lingerer, counters = make(linger_time=30, linger_timeout=30)
    client, server = pair(listener)
    lingerer.hand_off(server)
    started = time.monotonic()
    lingerer.stop(0.5)
    assert time.monotonic() - started < 0.5 + 5
    assert counters.ended_shutdown == 1
    client.close()


def test_peer_already_reset(listener):
    lingerer, counters = make()
    client, server = pair(listener)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()  # RST
    time.sleep(0.1)
    lingerer.hand_off(server)
    assert wait_until(lambda: counters.ended_error + counters.ended_eof == 1, 5)
    lingerer.stop(1)


def test_young_evicted_socket_is_reset_not_orphaned(listener):
    """Evicted before the client acked our FIN (a delayed ACK): only the FIN is outstanding
    (SIOCOUTQ 1), so RST loses nothing and spares a 60 s FIN_WAIT_2 orphan. Counting the
    FIN as data (outstanding must be 0) made this close a plain one."""
    lingerer, counters = make(max_lingering=1, linger_time=30, linger_timeout=30)
    first_client, first = pair(listener)
    second_client, second = pair(listener)
    first.sendall(b"response")
    lingerer.hand_off(first)
    lingerer.hand_off(second)  # evicts the first at once
    assert wait_until(lambda: counters.ended_evicted == 1, 5)
    assert counters.aborted_with_rst == 1
    assert read_all(first_client) == (len(b"response"), "FIN")  # every byte arrived first
    for sock in (first_client, second_client):
        sock.close()
    lingerer.stop(1)
