"""The gevent drain engine: the lingering connections of one gevent hub.

For gunicorn's gevent worker (graceful_close.gunicorn.GeventWorker), whose handler hands
each ending connection over with hand_off(sock): shutdown(SHUT_WR) (FIN after the
response), read and discard until the client's EOF or a deadline, then close; RST only on
a deadline and only when the client acknowledged everything (engines.sockets.close_for).
Decisions come from the sans-io core (LingerState), like the other drain engines. No
thread and no greenlet per connection: a libev read watcher each, and one sweeper greenlet
for the deadlines. The only module of the package that imports gevent at import time.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from typing import Any

import gevent
import gevent.monkey

from ..core.counters import PROCESS_COUNTERS, Counters
from ..core.linger import Ending, LingerState, bytes_at_stake
from ..settings import Settings
from .sockets import close_for, half_close, unacked_bytes, unread_bytes

__all__ = ["GeventDrainEngine", "LingeringConnection", "at_stake"]

READ_SIZE = 65536
READS_PER_WAKE = 4       # a client flooding us cannot hold the hub for longer than this
SWEEP_INTERVAL = 0.1     # deadlines are coarse, like nginx's: at most 10 sweeps a second
_READ = 1                # libev EV_READ
# gevent's monkey patching replaces socket.socket; the engine wants the plain one.
_PlainSocket: type[socket.socket] = gevent.monkey.get_original("socket", "socket")


class LingeringConnection:
    """One handed-off connection: its socket, its LingerState and its libev read watcher."""

    __slots__ = ("sock", "state", "watcher")

    def __init__(self, sock: socket.socket, state: LingerState, watcher: Any) -> None:
        self.sock = sock
        self.state = state
        self.watcher = watcher


class GeventDrainEngine:
    """The lingering connections of one gevent hub.

    No greenlet per connection: a libev read watcher per socket whose callback reads and
    discards in the hub, and one sweeper greenlet that ends what passed its deadline.
    The connections sit in an OrderedDict ordered by their last activity, so with one
    shared linger_timeout the front has the earliest idle deadline (linger_time is checked
    whenever a connection shows activity, the only way it can outlive its idle deadline).
    """

    def __init__(self, settings: Settings, counters: Counters = PROCESS_COUNTERS) -> None:
        self.settings = settings
        self.counters = counters
        self._lingering: OrderedDict[LingeringConnection, None] = OrderedDict()
        self._sweeper: gevent.Greenlet | None = None
        self._stop_limit: float | None = None  # stop(): nothing lingers past this

    @property
    def lingering(self) -> int:
        return len(self._lingering)

    def hand_off(self, sock: socket.socket) -> None:
        """Take a socket whose response is sent; it is closed lingering. Never raises."""
        if sock.fileno() < 0:
            return  # closed already (gunicorn closes after an error past the headers)
        while len(self._lingering) >= self.settings.max_lingering:
            oldest = next(iter(self._lingering))
            self._end(oldest, oldest.state.on_evict())
        # gevent's server closes the client socket object as soon as the handler returns
        # (StreamServer's do_close): take the descriptor out of it (its close() becomes a
        # no-op) into a plain non-blocking socket; the hub's loop watches it for us.
        raw = _PlainSocket(sock.family, sock.type, sock.proto, sock.detach())
        raw.setblocking(False)
        state = LingerState(self.settings, time.monotonic())
        conn = LingeringConnection(raw, state, gevent.get_hub().loop.io(raw.fileno(), _READ))
        self._lingering[conn] = None
        self.counters.started()
        if not half_close(raw):
            self._end(conn, state.on_error())
            return
        conn.watcher.start(self._readable, conn)
        if self._stop_limit is not None:  # handed off during the stop: bytes are at stake
            ending = state.on_stop(state.started, self._stop_limit, at_stake=True)
            if ending is not None:
                self._end(conn, ending)
                return
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep)

    def _readable(self, conn: LingeringConnection) -> None:
        """libev callback, in the hub: read and discard what is there (never blocks)."""
        state = conn.state
        ending = None
        try:
            for _ in range(READS_PER_WAKE):
                data = conn.sock.recv(READ_SIZE)
                ending = state.on_data(len(data), time.monotonic()) if data else state.on_eof()
                if ending is not None or len(data) < READ_SIZE:
                    break
        except BlockingIOError:
            pass
        except OSError:
            ending = state.on_error()
        if ending is not None:
            self._end(conn, ending)
        elif conn in self._lingering:
            self._lingering.move_to_end(conn)  # activity: its idle deadline moved back

    def _sweep(self) -> None:
        """One greenlet per engine: ends the connections whose deadline has passed."""
        lingering = self._lingering
        while lingering:
            conn = next(iter(lingering))
            now = time.monotonic()
            if conn.state.deadline > now:
                gevent.sleep(max(conn.state.deadline - now, SWEEP_INTERVAL))
                continue
            ending = conn.state.on_timer(now)
            assert ending is not None  # its deadline passed
            self._end(conn, ending)
        self._sweeper = None

    def _end(self, conn: LingeringConnection, ending: Ending | None) -> None:
        if ending is None:  # still lingering, or ended already
            return
        self._lingering.pop(conn, None)
        conn.watcher.stop()  # before the descriptor is closed
        conn.watcher.close()
        self.counters.record_end(ending.reason, conn.state.discarded, close_for(conn.sock, ending))

    def evict(self, count: int) -> int:
        """The process is short of descriptors (core.descriptors): end up to `count`
        lingering connections, the least recently active first; how many ended."""
        ended = 0
        while ended < count and self._lingering:
            conn = next(iter(self._lingering))
            self._end(conn, conn.state.on_evict())
            ended += 1
        return ended

    def stop(self, grace: float) -> None:
        """The worker is stopping (grace 0: quickly): the stop rule of core.linger for every
        lingering connection, none beyond `grace` seconds from now; returns when the last
        one has ended."""
        now = time.monotonic()
        limit = now + max(0.0, grace)
        self._stop_limit = limit
        for conn in list(self._lingering):
            self._readable(conn)  # what has arrived is read first: unread, it would count
            state = conn.state
            if state.ending is None:
                self._end(conn, state.on_stop(now, limit, at_stake(conn.sock, fin_sent=True)))
        # The sweeper follows the order of activity, which a stop's deadlines do not keep:
        # look at every connection here instead, a few times a second (stop_linger is short).
        while self._lingering and (now := time.monotonic()) < limit:
            for conn in [conn for conn in self._lingering if conn.state.deadline <= now]:
                self._end(conn, conn.state.on_timer(now))
            if self._lingering:
                deadline = min(conn.state.deadline for conn in self._lingering)
                gevent.sleep(min(SWEEP_INTERVAL, max(0.0, deadline - now)))
        for conn in list(self._lingering):
            self._end(conn, conn.state.on_shutdown())


def at_stake(sock: socket.socket, fin_sent: bool) -> bool:
    """Could closing this socket now lose a byte (core.linger.bytes_at_stake)?"""
    fd = sock.fileno()
    return fd < 0 or bytes_at_stake(unread_bytes(fd), unacked_bytes(fd), fin_sent)
