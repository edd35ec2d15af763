"""The in-loop drain engine on real loopback TCP sockets (no server): hand-off, endings,
bounds, stop. A small loop thread drives it the way a gunicorn worker's loop does; the
test thread hands sockets off from outside it, like a gthread pool thread."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from graceful_close.core import Counters
from graceful_close.engines.poll import PollDrainEngine
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


class Loop:
    """A worker loop in miniature: runs deferred calls, polls the engine, sweeps."""

    def __init__(self, settings: Settings, counters: Counters) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._done = threading.Event()
        built = threading.Event()

        def run() -> None:
            self.engine = PollDrainEngine(settings, defer=self.defer, counters=counters)
            built.set()
            while not self._done.is_set():
                while not self._calls.empty():
                    call, args = self._calls.get()
                    call(*args)
                if self.engine.lingering:
                    self.engine.poll(0.02)
                else:
                    time.sleep(0.01)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        built.wait(5)

    def defer(self, call: Callable[..., Any], *args: Any) -> None:
        self._calls.put((call, args))

    def hand_off(self, sock: socket.socket) -> None:
        self.engine.hand_off(sock)  # from this (foreign) thread: half-close, then defer

    @property
    def lingering(self) -> int:
        return self.engine.lingering

    def begin_stop(self, grace: float = 30.0) -> None:
        self.defer(self.engine.begin_stop, grace)

    def stop(self, grace: float) -> None:
        self.defer(self.engine.finish, grace)
        self.defer(self._done.set)
        self._thread.join(grace + 10)


def make(**kw) -> tuple[Loop, Counters]:
    counters = Counters()
    return Loop(Settings(**kw), counters), counters


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
    engine, counters = make(linger_time=5, linger_timeout=2)
    client, server = pair(listener)
    client.sendall(b"x" * 300_000)  # upload the server never reads
    server.sendall(b"R" * 500_000)
    engine.hand_off(server)
    time.sleep(0.3)
    assert read_all(client) == (500_000, "FIN")
    client.close()
    assert wait_until(lambda: counters.ended_eof == 1, 5)
    assert counters.bytes_discarded == 300_000 and counters.lingering_now == 0
    engine.stop(1)


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
    engine, _ = make()
    client, server = pair(listener)
    started = time.monotonic()
    engine.hand_off(server)
    assert time.monotonic() - started < 0.5
    assert server.fileno() == -1
    engine.hand_off(server)  # a second hand-off of the same object does nothing
    server.close()             # nor does the server's own close afterwards
    client.close()
    engine.stop(2)


def test_idle_and_total_deadlines(listener):
    engine, counters = make(linger_time=1.5, linger_timeout=0.4)
    silent, s1 = pair(listener)
    trickler, s2 = pair(listener)
    engine.hand_off(s1)
    engine.hand_off(s2)
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
    # abort_on_timeout is off by default (issue 20): a deadline closes plainly, and the
    # silent client, which had our FIN, sees nothing more (no RST).
    assert counters.aborted_with_rst == 0
    assert silent.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    engine.stop(1)


def test_deadlines_reset_with_abort_on_timeout(listener):
    """The opt-in: once the client acknowledged everything, a deadline ends with RST,
    which frees the socket at once instead of a FIN_WAIT_2 orphan."""
    engine, counters = make(linger_time=30, linger_timeout=0.3, abort_on_timeout=True)
    silent, server = pair(listener)
    engine.hand_off(server)
    assert wait_until(lambda: counters.ended_idle_timeout == 1, 5)
    assert counters.aborted_with_rst == 1
    assert wait_until(lambda: silent.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0, 5)
    silent.close()
    engine.stop(1)


def _stuck(listener) -> tuple[socket.socket, socket.socket, int]:
    """A connection whose client stopped reading: response bytes wait unacknowledged."""
    client, server = pair(listener)
    server.setblocking(False)
    sent = 0
    try:
        while sent < 20_000_000:
            sent += server.send(b"D" * 65536)
    except BlockingIOError:
        pass
    return client, server, sent


def test_timeout_never_destroys_unacknowledged_response(listener):
    """A client that stops reading leaves response bytes unacked: a timeout must not RST
    them, not even with abort_on_timeout=true."""
    engine, counters = make(linger_time=1, linger_timeout=0.3, abort_on_timeout=True)
    client, server, sent = _stuck(listener)
    engine.hand_off(server)
    assert wait_until(lambda: counters.ended_idle_timeout == 1, 5)
    assert counters.aborted_with_rst == 0
    assert read_all(client, timeout=20) == (sent, "FIN")


def test_full_set_evicts_oldest(listener):
    engine, counters = make(max_lingering=3, linger_time=30, linger_timeout=30)
    clients = []
    for _ in range(5):
        client, server = pair(listener)
        clients.append(client)
        engine.hand_off(server)
    assert wait_until(lambda: counters.ended_evicted == 2, 5)
    assert engine.lingering == 3
    for client in clients:
        client.close()
    assert wait_until(lambda: counters.lingering_now == 0, 5)
    engine.stop(1)


def test_stop_closes_what_is_left_within_grace(listener):
    engine, counters = make(linger_time=30, linger_timeout=30)
    client, server = pair(listener)
    client.sendall(b"unread upload")  # bytes at stake: this one lingers through the grace
    engine.hand_off(server)
    assert wait_until(lambda: engine.lingering == 1, 5)
    started = time.monotonic()
    engine.stop(0.5)
    assert time.monotonic() - started < 0.5 + 5
    assert counters.ended_shutdown == 1
    client.close()


def test_peer_already_reset(listener):
    engine, counters = make()
    client, server = pair(listener)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()  # RST
    time.sleep(0.1)
    engine.hand_off(server)
    assert wait_until(lambda: counters.ended_error + counters.ended_eof == 1, 5)
    engine.stop(1)


def test_young_evicted_socket_is_reset_not_orphaned(listener):
    """With abort_on_timeout=true: evicted before the client acked our FIN (a delayed ACK):
    only the FIN is outstanding (SIOCOUTQ 1), so RST loses nothing and spares a 60 s
    FIN_WAIT_2 orphan. Counting the FIN as data (outstanding must be 0) made this close a
    plain one."""
    engine, counters = make(max_lingering=1, linger_time=30, linger_timeout=30,
                            abort_on_timeout=True)  # the opt-in (issue 20)
    first_client, first = pair(listener)
    second_client, second = pair(listener)
    first.sendall(b"response")
    engine.hand_off(first)
    engine.hand_off(second)  # evicts the first at once
    assert wait_until(lambda: counters.ended_evicted == 1, 5)
    assert counters.aborted_with_rst == 1
    assert read_all(first_client) == (len(b"response"), "FIN")  # every byte arrived first
    for sock in (first_client, second_client):
        sock.close()
    engine.stop(1)


def test_stop_rule_closes_what_has_nothing_at_stake_and_gives_the_rest_stop_linger(listener):
    """Issue 20, the stop rule: at a graceful stop a connection whose response is
    acknowledged and with nothing unread closes at once (plain close: the client had our
    FIN), whether its client sent nothing (issue 12), drained an upload and went quiet
    (used to linger linger_timeout), or sent bytes that had just arrived (read first); one
    with bytes at stake (here response bytes the client has not acknowledged) ends
    stop_linger after its half-close, not at the grace."""
    engine, counters = make(linger_time=30, linger_timeout=30, stop_linger=1.0)
    quiet_client, quiet = pair(listener)
    drained_client, drained = pair(listener)
    late_client, late = pair(listener)
    stuck_client, stuck, sent = _stuck(listener)
    quiet.sendall(b"response")
    for sock in (quiet, drained, late, stuck):
        engine.hand_off(sock)
    assert wait_until(lambda: engine.lingering == 4, 5)
    drained_client.sendall(b"x" * 10_000)  # an upload the app never read
    time.sleep(0.3)  # read and discarded by the loop, every FIN acknowledged
    handed_off = time.monotonic()
    late_client.sendall(b"y" * 100)  # may still be unread when the stop begins
    engine.begin_stop(30)
    assert wait_until(lambda: counters.ended_shutdown == 3, 5)
    assert engine.lingering == 1 and counters.aborted_with_rst == 0
    assert wait_until(lambda: engine.lingering == 0, 10)
    assert time.monotonic() - handed_off < 10  # stop_linger (1 s), not the grace (30 s)
    assert counters.ended_shutdown == 4 and counters.bytes_discarded == 10_100
    assert read_all(quiet_client) == (len(b"response"), "FIN")
    assert read_all(stuck_client, timeout=20) == (sent, "FIN")  # the close lost nothing
    for sock in (quiet_client, drained_client, late_client, stuck_client):
        sock.close()
    engine.stop(1)


def test_stop_never_lingers_beyond_the_grace(listener):
    engine, counters = make(linger_time=30, linger_timeout=30, stop_linger=30)
    client, server, sent = _stuck(listener)
    engine.hand_off(server)
    assert wait_until(lambda: engine.lingering == 1, 5)
    started = time.monotonic()
    engine.begin_stop(0.5)
    assert wait_until(lambda: engine.lingering == 0, 5)
    assert time.monotonic() - started < 5 and counters.ended_shutdown == 1
    assert read_all(client, timeout=20) == (sent, "FIN")
    client.close()
    engine.stop(1)


def test_quiet_hand_off_while_stopping_closes_without_lingering(listener):
    engine, counters = make(linger_time=30, linger_timeout=30)
    engine.begin_stop()
    client, server = pair(listener)
    server.sendall(b"last response")
    time.sleep(0.2)  # acknowledged
    engine.hand_off(server)
    assert read_all(client) == (len(b"last response"), "FIN")
    assert counters.lingering_started == 0 and engine.lingering == 0
    client.close()
    engine.stop(1)


def test_evict_ends_the_oldest_first(listener):
    """Short of descriptors (issue 20): evict(n) ends the n oldest lingering connections
    with a plain close; the others keep lingering."""
    engine, counters = make(linger_time=30, linger_timeout=30)
    clients = []
    for _ in range(4):
        client, server = pair(listener)
        clients.append(client)
        engine.hand_off(server)
        time.sleep(0.05)
    assert wait_until(lambda: engine.lingering == 4, 5)
    ended: list[int] = []
    engine.defer(lambda: ended.append(engine.engine.evict(2)))
    assert wait_until(lambda: ended == [2] and engine.lingering == 2, 5)
    assert counters.ended_evicted == 2 and counters.aborted_with_rst == 0
    for client in clients:  # a byte to a closed socket is answered with RST
        client.send(b"x")
    time.sleep(0.3)
    errors = [client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for client in clients]
    assert [bool(e) for e in errors] == [True, True, False, False], errors
    for client in clients:
        client.close()
    engine.stop(1)
