"""Asyncio drain engine: the lingering close of transports handed off by a server.

    engine = drain_engine(loop)        # one per event loop
    engine.hand_off(transport)         # the response is queued; the engine owns it now

hand_off() takes the transport over: write_eof() on plain TCP (the FIN follows the
queued response), transport.set_protocol() to a LingeringConnection (a small
__slots__ protocol that only counts and discards what the client still sends), and
resume_reading(). The server's own protocol object, parser and request state are
no longer referenced by the transport and can be freed at once; the caller does its
connection-lost bookkeeping right after hand_off() and never touches the transport
again.

No thread, no blocking call, and no timer per connection: the lingering connections
of a loop sit in one OrderedDict ordered by their last activity, so with one shared
linger_timeout the idle deadlines are in the same order, and ONE timer handle per
loop (armed at the earliest deadline, at most every SWEEP_INTERVAL) ends the due
ones from the front. linger_time is checked whenever a connection shows activity
(data, or its response still flushing), which is the only way it can outlive its
idle deadline. Decisions come from the sans-io core, like the other engines:
LingerState, and the RST rule (core.linger.nothing_unacked) fed with SIOCOUTQ.

Detached (issue 18): once DETACH_ABOVE connections linger with their transports, a plain
TCP connection whose response has left the transport's buffer at the hand-off does not keep
its transport. Its descriptor is
duplicated, the transport aborted (no FIN, no RST: the socket lives on in the duplicate),
and the socket goes to a PollDrainEngine with its own epoll, which the loop watches with ONE
add_reader for all of them. A lingering socket then costs its LingerState and a small
record, as in the sync worker, instead of a transport and a protocol. TLS connections and
responses still flushing keep the transport path below.

Plain TCP: FIN after the response, discard until EOF or a deadline, then close;
RST on a deadline only when the transport's buffer is empty and the kernel says
nothing is unacknowledged. TLS (no half-close): discard until the client closes
or a deadline, then close() which sends close_notify after the response.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import select
import socket
import struct
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, MutableSet
from typing import Any, cast

from ..core.counters import PROCESS_COUNTERS, Counters
from ..core.descriptors import MAX_BATCH, DescriptorBudget
from ..core.linger import Ending, LingerState, bytes_at_stake, nothing_unacked
from ..settings import Settings, current_settings
from .poll import PollDrainEngine
from .sockets import unacked_bytes, unread_bytes

_LINGER_ZERO = struct.pack("ii", 1, 0)

# Deadlines are coarse, like nginx's: one sweep ends every connection due by then,
# and sweeps are at least this far apart however many connections linger.
SWEEP_INTERVAL = 0.1

# Detach only beyond this many lingering connections on the loop (issue 18, measured):
# detaching costs a few system calls more per close (dup, epoll registration, its own
# wake-up), about a quarter of stock's CPU per connection on a hello-world app, and saves
# memory (a transport per socket), which matters only when many linger at once.
DETACH_ABOVE = 64

# After a stop's limit, connections whose final close has not completed get this long
# before they are aborted (AsyncioDrainEngine._abort_stuck_closes).
SHUTDOWN_FORCE_GRACE = 1.0


class _Detached(asyncio.Protocol):
    """The protocol of a transport whose socket was detached: hears its end, does nothing."""

    __slots__ = ()

    def connection_lost(self, exc: BaseException | None) -> None:
        pass


_DETACHED = _Detached()


class DetachedConnections:
    """Stands, in a server's set of open connections, for every lingering socket of the
    engine's PollDrainEngine: uvicorn's stop calls its shutdown() and waits until it
    leaves the set (when the last detached socket has ended)."""

    __slots__ = ("engine",)

    def __init__(self, engine: AsyncioDrainEngine) -> None:
        self.engine = engine

    def shutdown(self) -> None:
        self.engine.begin_stop(self.engine.settings.linger_time)


class LingeringConnection(asyncio.Protocol):
    """One handed-off connection: the transport's protocol from the hand-off to the close."""

    __slots__ = ("engine", "transport", "state", "tls", "server_connections")

    def __init__(self, engine: AsyncioDrainEngine, transport: asyncio.Transport, tls: bool,
                 server_connections: MutableSet[Any] | None) -> None:
        self.engine = engine
        self.transport = transport
        self.state = LingerState(engine.settings, engine.loop.time())
        self.tls = tls
        # The server's set of open connections (uvicorn's server_state.connections): a
        # lingering connection stays in it, so the server's stop waits for it and calls
        # our shutdown(), as it did for the protocol object we replace.
        self.server_connections = server_connections

    # ---- transport callbacks (the transport's protocol after set_protocol) ------------

    def data_received(self, data: bytes) -> None:
        engine = self.engine
        ending = self.state.on_data(len(data), engine.loop.time())
        if ending is not None:
            engine._finish(self, ending)
        elif self in engine._lingering:
            engine._lingering.move_to_end(self)  # activity: its idle deadline moved back

    def eof_received(self) -> bool:
        """The client closed: the clean end. False: the transport closes itself."""
        ending = self.state.on_eof()
        if ending is not None:
            self.engine._finish(self, ending, closing=False)
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        engine = self.engine
        engine._closing.pop(self, None)
        if self.state.ending is None:  # the peer reset, or the transport closed on its own
            engine._lingering.pop(self, None)
            ending = self.state.on_error() if exc is not None else self.state.on_eof()
            assert ending is not None
            engine.counters.record_end(ending.reason, self.state.discarded, False)
        connections = self.server_connections
        if connections is not None:
            connections.discard(self)

    # ---- what a server calls on its open connections ----------------------------------

    def shutdown(self) -> None:
        """uvicorn's Server.shutdown() calls this on every open connection. The adapter's
        own protocols begin the stop with uvicorn's limit first; this is the fallback."""
        self.engine.begin_stop(self.engine.settings.linger_time)

    # ---- close -------------------------------------------------------------------

    def _at_stake(self, count_unread: bool = True) -> bool:
        """Could closing now lose a byte (core.linger.bytes_at_stake)? Unknown is at stake.
        count_unread=False: only what we sent counts."""
        if self.transport.get_write_buffer_size() > 0:
            return True
        fd = fileno(self.transport)
        # TLS: no half-close, so no FIN of ours in the count.
        return fd is None or bytes_at_stake(unread_bytes(fd) if count_unread else 0,
                                            unacked_bytes(fd), fin_sent=not self.tls)

    def _safe_to_abort(self) -> bool:
        if self.transport.get_write_buffer_size() > 0:
            return False
        fd = fileno(self.transport)
        # TLS: no half-close, so no FIN of ours in the count.
        return fd is not None and nothing_unacked(unacked_bytes(fd), fin_sent=not self.tls)


class AsyncioDrainEngine:
    """The lingering connections of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: Settings,
                 counters: Counters = PROCESS_COUNTERS) -> None:
        self.loop = loop
        self.settings = settings
        self.counters = counters
        # Oldest activity first: the front has the earliest idle deadline, and is evicted first.
        self._lingering: OrderedDict[LingeringConnection, None] = OrderedDict()
        # Ended, transport.close() called, connection_lost not yet: value = when it ended.
        self._closing: dict[LingeringConnection, float] = {}
        # TLS connections whose close_notify the client may ignore: (when the TCP connection
        # closes too, the connection, RST allowed once everything is acknowledged).
        self._tls_close_due: deque[tuple[float, LingeringConnection, bool]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0
        # The server's stop (begin_stop): nothing lingers past this loop time.
        self._stop_limit: float | None = None
        self._stop_timer: asyncio.TimerHandle | None = None
        # At stake at the stop only by bytes that had arrived but the loop had not read yet:
        # judged again at the next sweep, once it has read them.
        self._stop_recheck: list[LingeringConnection] = []
        # Detached sockets (see the module docstring). Its epoll is made now, with the engine
        # (at a server's first connection), not at the first linger: a descriptor that
        # appears later would look like a leak.
        self._detached: PollDrainEngine | None = None
        self._detached_timer: asyncio.TimerHandle | None = None
        self._detached_in: list[MutableSet[Any]] = []  # server sets holding the stand-in
        self._stand_in = DetachedConnections(self)
        self.detach = hasattr(os, "dup") and hasattr(select, "epoll")
        if self.detach:
            engine = self._detached = PollDrainEngine(settings, counters=counters)
            loop.add_reader(cast(int, engine.fileno()), self._on_detached_ready)

    @property
    def lingering(self) -> int:
        detached = self._detached
        return len(self._lingering) + (detached.lingering if detached is not None else 0)

    @property
    def detached(self) -> int:
        """Lingering sockets without a transport (not in any server's set of connections)."""
        detached = self._detached
        return detached.lingering if detached is not None else 0

    @property
    def stopping(self) -> bool:
        return self._stop_limit is not None

    # ---- entry point -----------------------------------------------------------------

    def hand_off(self, transport: asyncio.Transport,
                 server_connections: MutableSet[Any] | None = None) -> None:
        """Take a transport whose last response is queued, and close it lingering.

        server_connections: the server's set of open connections; the lingering
        connection replaces the caller's protocol in it until the socket is closed.
        """
        if transport.is_closing():
            return  # closed already: nothing to linger on
        if self.detach and len(self._lingering) >= DETACH_ABOVE and self._detach(
                transport, server_connections):
            return
        lingering = self._lingering
        while len(lingering) >= self.settings.max_lingering:
            oldest = next(iter(lingering))
            ending = oldest.state.on_evict()
            assert ending is not None
            self._finish(oldest, ending)
        tls = transport.get_extra_info("sslcontext") is not None
        conn = LingeringConnection(self, transport, tls, server_connections)
        if server_connections is not None:
            server_connections.add(conn)
        transport.set_protocol(conn)
        self.counters.started()
        lingering[conn] = None
        if self._stop_limit is not None:  # handed off during the stop: bytes are at stake
            stop_ending = conn.state.on_stop(conn.state.started, self._stop_limit, at_stake=True)
            if stop_ending is not None:
                self._finish(conn, stop_ending)
                return
        if not tls and transport.can_write_eof():
            try:
                transport.write_eof()  # FIN goes out once the queued response is flushed
            except (OSError, RuntimeError):
                ending = conn.state.on_error()
                assert ending is not None
                self._finish(conn, ending)
                return
        try:
            transport.resume_reading()  # the server may have paused it (pipelining, flow control)
        except (OSError, RuntimeError):
            pass
        if self._sweep is None:
            self._arm(conn.state.deadline)
        elif self._stop_limit is not None:
            self._rearm()

    # ---- detached sockets --------------------------------------------------------------

    def _detach(self, transport: asyncio.Transport,
                server_connections: MutableSet[Any] | None) -> bool:
        """Take the socket out of a plain TCP transport whose buffer is empty and give it to
        the PollDrainEngine; False (nothing done) when it cannot be."""
        if transport.get_write_buffer_size() or not transport.can_write_eof():
            return False
        if transport.get_extra_info("sslcontext") is not None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            family, kind = int(sock.family), int(sock.type)
            fd = os.dup(sock.fileno())
        except (OSError, ValueError, AttributeError):
            return False
        try:
            owned = _socket.socket(family, kind, 0, fd)
        except OSError:
            os.close(fd)
            return False
        # The transport closes its descriptor; the socket lives on in ours (no FIN, no RST).
        transport.set_protocol(_DETACHED)
        transport.abort()
        engine = self._detached
        assert engine is not None
        if self._stop_limit is not None and not engine.stopping:
            engine.begin_stop(max(0.0, self._stop_limit - self.loop.time()))
        engine.hand_off(owned)  # half-close (FIN behind the response), register, linger
        if server_connections is not None and engine.lingering:
            server_connections.add(self._stand_in)
            if not any(held is server_connections for held in self._detached_in):
                self._detached_in.append(server_connections)
        if self._detached_timer is None and engine.lingering:
            self._arm_detached()
        return True

    def _on_detached_ready(self) -> None:
        engine = self._detached
        assert engine is not None
        engine.poll(0)
        self._detached_changed()

    def _arm_detached(self) -> None:
        engine = self._detached
        assert engine is not None
        due = engine.next_deadline()
        if due is None:
            return
        delay = max(SWEEP_INTERVAL, due - time.monotonic())
        self._detached_timer = self.loop.call_later(delay, self._on_detached_timer)

    def _on_detached_timer(self) -> None:
        self._detached_timer = None
        engine = self._detached
        assert engine is not None
        engine.sweep(time.monotonic())
        self._detached_changed()
        if engine.lingering and self._detached_timer is None:
            self._arm_detached()

    def _detached_changed(self) -> None:
        """After detached sockets ended: the stand-in leaves the server's set once none is left."""
        engine = self._detached
        if engine is not None and not engine.lingering and self._detached_in:
            for connections in self._detached_in:
                connections.discard(self._stand_in)
            self._detached_in.clear()
            if self._detached_timer is not None:
                self._detached_timer.cancel()
                self._detached_timer = None

    # ---- the one timer ---------------------------------------------------------------

    def _arm(self, when: float) -> None:
        when = max(when, self._sweep_at + SWEEP_INTERVAL)
        self._sweep = self.loop.call_at(when, self._on_sweep)

    def _rearm(self) -> None:
        """Deadlines moved closer (a stop): the sweep runs at the earliest one."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        when = self._next_deadline()
        if when is not None:
            self._arm(when)

    def _next_deadline(self) -> float | None:
        due = self._tls_close_due
        deadlines = [due[0][0]] if due else []
        if self._stop_recheck:
            deadlines.append(self.loop.time())  # as soon as the sweep interval allows
        lingering = self._lingering
        if lingering:
            deadlines.append(next(iter(lingering)).state.deadline)
            if self._stop_limit is not None:  # a stop's deadlines come in no particular order
                deadlines.append(min(conn.state.deadline for conn in lingering))
        return min(deadlines) if deadlines else None

    def _on_sweep(self) -> None:
        now = self._sweep_at = self.loop.time()
        self._sweep = None
        lingering = self._lingering
        while lingering:
            conn = next(iter(lingering))
            if conn.state.deadline > now:
                break
            self._end_due(conn, now)
        if self._stop_limit is not None:
            for conn in self._stop_recheck:
                if conn in lingering and not conn._at_stake():
                    ending = conn.state.on_quiet_shutdown()
                    assert ending is not None
                    self._finish(conn, ending)
            self._stop_recheck.clear()
            # During a stop (stop_linger, 2 s at most) every sweep looks at every connection.
            for conn in [conn for conn in lingering if conn.state.deadline <= now]:
                self._end_due(conn, now)
        due = self._tls_close_due
        while due and due[0][0] <= now:
            _, conn, abort = due.popleft()
            if conn not in self._closing:
                continue  # closed already: the client answered our close_notify
            if abort and conn._safe_to_abort() and _abort_with_rst(conn.transport):
                self.counters.count("aborted_with_rst")
            elif conn.transport.get_write_buffer_size() == 0:
                # A plain close of the TCP connection (FIN), instead of waiting for the
                # client's close_notify until the loop's ssl_shutdown_timeout (30 s).
                conn.transport.abort()
        when = self._next_deadline()
        if when is not None:
            self._arm(when)

    def _end_due(self, conn: LingeringConnection, now: float) -> None:
        """A connection whose deadline has passed ends, unless its response is still flushing
        to a client that reads it: that is activity, so only linger_time bounds it."""
        state = conn.state
        if conn.transport.get_write_buffer_size() > 0:
            ending = state.on_data(0, now)
            if ending is None:
                self._lingering.move_to_end(conn)  # its deadline is now + linger_timeout
                return
        else:
            ending = state.on_timer(now)
            assert ending is not None  # its deadline passed
        self._finish(conn, ending)

    # ---- ending one connection -------------------------------------------------------

    def _finish(self, conn: LingeringConnection, ending: Ending, closing: bool = True) -> None:
        """End a lingering connection; closing=False when the transport closes itself (EOF)."""
        self._lingering.pop(conn, None)
        aborted = False
        transport = conn.transport
        if closing and not transport.is_closing():
            if ending.abort_if_acked and not conn.tls and conn._safe_to_abort():
                aborted = _abort_with_rst(transport)
            if not aborted:
                transport.close()  # flushes what is queued, then closes (TLS: close_notify)
                now = self.loop.time()
                self._closing[conn] = now
                if conn.tls and ending.forced:
                    # TLS has no half-close: if the client ignores our close_notify for
                    # linger_timeout, the TCP connection closes too: plainly (FIN), or with
                    # abort_on_timeout by RST once it acknowledged everything.
                    self._tls_close_due.append((now + self.settings.linger_timeout, conn,
                                                ending.abort_if_acked))
                    if self._sweep is None:
                        self._arm(now + self.settings.linger_timeout)
        self.counters.record_end(ending.reason, conn.state.discarded, aborted)

    def evict(self, count: int) -> int:
        """The process is short of descriptors (core.descriptors): end up to `count`
        lingering connections, the least recently active first; how many ended."""
        ended = 0
        lingering = self._lingering
        while ended < count and lingering:
            conn = next(iter(lingering))
            ending = conn.state.on_evict()
            assert ending is not None
            self._finish(conn, ending)
            ended += 1
        if ended < count and self._detached is not None:
            ended += self._detached.evict(count - ended)
            self._detached_changed()
        return ended

    # ---- stop ------------------------------------------------------------------------

    def begin_stop(self, grace: float) -> None:
        """The server stops gracefully (grace 0: quickly): the stop rule of core.linger for
        every lingering connection, none beyond `grace` seconds from now. A later call can
        only bring the end closer (uvicorn calls it once per open connection)."""
        now = self.loop.time()
        limit = now + max(0.0, grace)
        if self._stop_limit is not None and self._stop_limit <= limit:
            return
        self._stop_limit = limit
        for conn in list(self._lingering):
            state = conn.state
            at_stake = state.stopping or conn._at_stake()
            if at_stake and not state.stopping and not conn._at_stake(count_unread=False):
                self._stop_recheck.append(conn)
            ending = state.on_stop(now, limit, at_stake)
            if ending is not None:
                self._finish(conn, ending)
        if self._detached is not None:
            self._detached.begin_stop(max(0.0, grace))
            self._detached_changed()
            if self._detached_timer is not None:  # deadlines moved closer
                self._detached_timer.cancel()
                self._detached_timer = None
            if self._detached.lingering:
                self._arm_detached()
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self._stop_timer = self.loop.call_at(limit, self._end_for_stop)
        self._rearm()

    def _end_for_stop(self) -> None:
        """The limit: whatever still lingers ends now (a response still flushing included)."""
        limit = self._stop_limit
        assert limit is not None
        for conn in list(self._lingering):
            ending = conn.state.on_shutdown()
            assert ending is not None
            self._finish(conn, ending)
        if self._detached is not None:
            self._detached.end_all()
            self._detached_changed()
        self._stop_timer = self.loop.call_later(SHUTDOWN_FORCE_GRACE, self._abort_stuck_closes)

    def _abort_stuck_closes(self) -> None:
        """Closes that did not complete SHUTDOWN_FORCE_GRACE after the limit (a client that
        stopped reading, a TLS peer that never answers close_notify) are aborted: the
        process is about to exit and would drop their buffers anyway."""
        limit = self._stop_limit
        assert limit is not None
        for conn, since in list(self._closing.items()):
            if since <= limit:
                conn.transport.abort()
        self._stop_limit = None  # done; a later server on this loop may stop again
        self._stop_timer = None


class DescriptorReclaimer:
    """Keeps the connections of one event loop within a DescriptorBudget (issue 20).

    check() runs once per accepted connection and once per hand-off, never per request.
    Near the limit it closes idle keep-alive connections with nothing at stake
    (`close_idle(wanted, asking)`, the adapter's: it knows its protocols), then the least
    recently active lingering ones. When that falls short (the connections are busy with
    requests), it looks again every SWEEP_INTERVAL until there is room: the loop's own
    accept() gives no sign when it runs out (uvloop closes the new connection at once,
    asyncio pauses accepting for a second); asyncio's report of it, through the loop's
    exception handler, frees a batch at once.
    """

    def __init__(self, engine: AsyncioDrainEngine, budget: DescriptorBudget,
                 held: Callable[[], int], close_idle: Callable[[int, Any], int]) -> None:
        self.engine = engine
        self.loop = loop = engine.loop
        self.budget = budget
        self._held = held
        self._close_idle = close_idle
        self._again: asyncio.TimerHandle | None = None
        # While the connections' set holds fewer than this, check() frees nothing: an adapter
        # may skip the call per accepted connection (issue 18). Detached sockets only grow in
        # hand_off(); after one, refresh_watermark(). Fewer detached later only makes it low.
        self.watermark = budget.capacity - engine.detached
        previous = loop.get_exception_handler()

        def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                self._free(MAX_BATCH, None)
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(on_loop_error)

    def check(self, asking: Any = None) -> None:
        """`asking`: the connection being accepted or handed off (never closed here)."""
        self.refresh_watermark()
        wanted = self.budget.to_free(self._held())
        if wanted:
            self._free(wanted, asking)

    def refresh_watermark(self) -> None:
        self.watermark = self.budget.capacity - self.engine.detached

    def _free(self, wanted: int, asking: Any) -> None:
        freed = self._close_idle(wanted, asking)
        if freed < wanted:
            freed += self.engine.evict(wanted - freed)
        if freed < wanted and self._again is None:
            self._again = self.loop.call_later(SWEEP_INTERVAL, self._look_again)

    def _look_again(self) -> None:
        self._again = None
        self.check()


def nothing_at_stake(transport: asyncio.BaseTransport) -> bool:
    """A stopping server may close this connection at once, without lingering: nothing
    queued or unacknowledged of ours, nothing of the client's unread (the rule itself:
    core.linger.bytes_at_stake). Unknown counts (no socket, not Linux) are at stake."""
    if cast(asyncio.WriteTransport, transport).get_write_buffer_size() > 0:
        return False
    fd = fileno(transport)
    if fd is None:
        return False
    return not bytes_at_stake(unread_bytes(fd), unacked_bytes(fd), fin_sent=False)


def fileno(transport: asyncio.BaseTransport) -> int | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        fd: int = sock.fileno()
    except (OSError, ValueError):
        return None
    return fd if fd >= 0 else None


def _abort_with_rst(transport: asyncio.Transport) -> bool:
    """SO_LINGER 0 then abort: the kernel frees the socket at once with RST.

    Only called when nothing queued or unacknowledged can be lost by it.
    """
    sock = transport.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except (OSError, AttributeError, ValueError):
        return False
    transport.abort()
    return True


_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncioDrainEngine] = (
    weakref.WeakKeyDictionary())


_last: AsyncioDrainEngine | None = None  # a WeakKeyDictionary lookup makes a weakref per call


def drain_engine(loop: asyncio.AbstractEventLoop) -> AsyncioDrainEngine:
    """The drain engine of this event loop, created on first use with current_settings()."""
    global _last
    engine = _last
    if engine is not None and engine.loop is loop:
        return engine
    engine = _engines.get(loop)
    if engine is None:
        engine = _engines[loop] = AsyncioDrainEngine(loop, current_settings())
    _last = engine
    return engine


__all__ = ["SHUTDOWN_FORCE_GRACE", "SWEEP_INTERVAL", "AsyncioDrainEngine", "DescriptorReclaimer",
           "DetachedConnections",
           "LingeringConnection", "drain_engine", "fileno", "nothing_at_stake"]
