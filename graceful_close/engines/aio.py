"""Asyncio drain engine: the lingering close driven by transport callbacks.

No thread and no blocking call: the protocol forwards data_received,
eof_received and connection_lost of a closing connection here, and one timer
per connection (re-armed lazily at LingerState.deadline) ends the ones that
never close. Decisions come from the sans-io core, like the threaded engine.

Plain TCP: write_eof() (the transport sends FIN after the queued response),
read and discard until EOF or a deadline, then close; RST on a timeout only
when the transport's buffer is empty and the kernel says nothing is unacked.
TLS (no write_eof): read and discard until the client closes or a deadline,
then close() which sends close_notify.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import weakref
from collections import OrderedDict

from ..core.counters import PROCESS_COUNTERS, Counters
from ..core.linger import Ending, LingerState
from ..settings import Settings
from .sockets import can_abort_safely

_LINGER_ZERO = struct.pack("ii", 1, 0)

# After the shutdown deadline, connections whose final close has not completed
# (a client that stopped reading, a TLS peer that never answers close_notify)
# get this long before they are aborted: the process is about to exit and
# would drop their buffers anyway.
SHUTDOWN_FORCE_GRACE = 1.0


class Linger:
    """One connection between its half-close and its close."""

    __slots__ = ("_engine", "transport", "state", "tls", "_timer", "_lost", "_closing_since",
                 "__weakref__")

    def __init__(self, engine: AioLingerer, transport: asyncio.Transport, now: float) -> None:
        self._engine = engine
        self.transport = transport
        self.state = LingerState(engine.settings, now)
        self.tls = bool(transport.get_extra_info("sslcontext"))
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._closing_since: float | None = None

    @property
    def ended(self) -> bool:
        return self.state.ending is not None

    # ---- events from the protocol --------------------------------------------------

    def data_received(self, nbytes: int) -> None:
        if not self.ended:
            self._finish(self.state.on_data(nbytes, self._engine.loop.time()))

    def eof_received(self) -> bool:
        """The client closed: the clean end. Returns False so the transport closes."""
        self._finish(self.state.on_eof())
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._cancel_timer()
        self._engine._closing.discard(self)
        if not self.ended:  # the peer reset, or the transport closed on its own
            ending = self.state.on_error() if exc is not None else self.state.on_eof()
            self._engine._lingering.pop(id(self), None)
            assert ending is not None
            self._engine.counters.record_end(ending.reason, self.state.discarded, False)

    # ---- engine side ---------------------------------------------------------------

    def _begin(self) -> None:
        transport = self.transport
        if not self.tls and transport.can_write_eof():
            try:
                transport.write_eof()  # FIN goes out once the queued response is flushed
            except (OSError, RuntimeError):
                self._finish(self.state.on_error())
                return
        try:
            transport.resume_reading()  # uvicorn may have paused it (pipelining, flow control)
        except (OSError, RuntimeError):
            pass
        self._arm(self.state.deadline)

    def _arm(self, when: float) -> None:
        self._cancel_timer()
        self._timer = self._engine.loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.ended:
            return
        now = self._engine.loop.time()
        if self.transport.get_write_buffer_size() > 0:
            # Still flushing the response to a client that reads it: that is activity,
            # so only linger_time bounds it.
            ending = self.state.on_data(0, now)
        else:
            ending = self.state.on_timer(now)
        if ending is None:
            self._arm(self.state.deadline)
        else:
            self._finish(ending)

    def _finish(self, ending: Ending | None) -> None:
        if ending is None:  # ended already, or nothing to end yet
            return
        engine = self._engine
        engine._lingering.pop(id(self), None)
        self._cancel_timer()
        aborted = False
        if not self._lost:
            if ending.abort_if_acked and not self.tls and self._safe_to_abort():
                aborted = _abort_with_rst(self.transport)
            if not aborted:
                self.transport.close()  # flushes what is queued, then closes (TLS: close_notify)
                if not self._lost:
                    self._closing_since = engine.loop.time()
                    engine._closing.add(self)
                    if self.tls and ending.abort_if_acked:
                        # The client ignored our close_notify for linger_timeout: RST once
                        # it has acknowledged everything, close_notify included.
                        self._timer = engine.loop.call_later(
                            engine.settings.linger_timeout, self._abort_tls_if_acked)
        engine.counters.record_end(ending.reason, self.state.discarded, aborted)

    def _safe_to_abort(self) -> bool:
        if self.transport.get_write_buffer_size() > 0:
            return False
        fd = _fileno(self.transport)
        return fd is not None and can_abort_safely(fd, fin_sent=not self.tls)  # TLS: no half-close

    def _abort_tls_if_acked(self) -> None:
        self._timer = None
        if not self._lost and self._safe_to_abort() and _abort_with_rst(self.transport):
            self._engine.counters.aborted_with_rst += 1

    def _force_abort(self) -> None:
        if not self._lost:
            self.transport.abort()


class AioLingerer:
    """The lingering connections of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: Settings,
                 counters: Counters = PROCESS_COUNTERS) -> None:
        self.loop = loop
        self.settings = settings
        self.counters = counters
        self._lingering: OrderedDict[int, Linger] = OrderedDict()  # oldest first
        self._closing: weakref.WeakSet[Linger] = weakref.WeakSet()  # ended, close in progress
        self._shutdown_at: float | None = None

    @property
    def lingering(self) -> int:
        return len(self._lingering)

    @property
    def closing(self) -> int:
        return len(self._closing)

    def start(self, transport: asyncio.Transport) -> Linger | None:
        """Begin the lingering close of a transport whose response is queued.

        None when the transport is closing already (nothing to linger on).
        """
        if transport.is_closing():
            return None
        while len(self._lingering) >= self.settings.max_lingering:
            oldest = next(iter(self._lingering.values()))
            oldest._finish(oldest.state.on_evict())
        linger = Linger(self, transport, self.loop.time())
        self.counters.lingering_started += 1
        self._lingering[id(linger)] = linger
        linger._begin()
        return linger

    @property
    def stopping(self) -> bool:
        return self._shutdown_at is not None

    def begin_shutdown(self, grace: float) -> None:
        """The server is stopping: whatever lingers `grace` seconds from now ends then.

        Idempotent; `grace` is capped at linger_time.
        """
        if self._shutdown_at is not None:
            return
        grace = max(0.0, min(grace, self.settings.linger_time))
        self._shutdown_at = self.loop.time() + grace
        self.loop.call_at(self._shutdown_at, self._end_for_shutdown)

    def _end_for_shutdown(self) -> None:
        assert self._shutdown_at is not None
        for linger in list(self._lingering.values()):
            if linger.state.started <= self._shutdown_at:
                linger._finish(linger.state.on_shutdown())
        self.loop.call_later(SHUTDOWN_FORCE_GRACE, self._abort_stuck_closes)

    def _abort_stuck_closes(self) -> None:
        assert self._shutdown_at is not None
        for linger in list(self._closing):
            since = linger._closing_since
            if since is not None and since <= self._shutdown_at:
                linger._force_abort()
        self._shutdown_at = None  # done; a later server on this loop may stop again


def _fileno(transport: asyncio.BaseTransport) -> int | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        fd = sock.fileno()
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


_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AioLingerer] = (
    weakref.WeakKeyDictionary())


def aio_lingerer(loop: asyncio.AbstractEventLoop, settings: Settings) -> AioLingerer:
    """The engine of this event loop, created on first use."""
    engine = _engines.get(loop)
    if engine is None:
        engine = _engines[loop] = AioLingerer(loop, settings)
    return engine
