"""In-loop drain engine for gunicorn's sync and gthread workers: no thread of its own.

The worker's own loop drives it. hand_off(sock) half-closes the socket (the FIN goes
out behind the queued response) and registers it in a selector: gthread's own poller,
or for the sync worker a selector the engine owns, which the worker polls without
blocking before each accept() and includes in its idle wait. Readiness calls
on_readable(fd); the loop calls sweep(now) once per turn, one coarse timer pass for
every lingering socket (nginx's lingering deadlines are coarse too). No thread means no
GIL hand-over and no wake-up pipe per connection.

Decisions (when to stop reading, FIN or RST, what is at stake at a stop) come from
graceful_close.core.linger.
"""

from __future__ import annotations

import _socket
import functools
import logging
import math
import select
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from ..core.counters import PROCESS_COUNTERS, Counters
from ..core.linger import Ending, LingerState, bytes_at_stake
from ..settings import Settings
from .sockets import close_for, half_close, unacked_bytes, unread_bytes

log = logging.getLogger("graceful_close")

READ_CHUNK = 65536
READS_PER_EVENT = 16  # one flooding client cannot starve the loop

# gthread's PollableMethodQueue.defer(callback, *args): runs callback(*args) on the loop.
Defer = Callable[..., None]


class LingeringConnection:
    """The engine's record of one connection it owns: the socket and its LingerState."""

    __slots__ = ("sock", "fd", "state")

    def __init__(self, sock: _socket.socket, state: LingerState) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = state


class PollDrainEngine:
    """Owns the lingering connections of one worker loop; see the module docstring.

    Every method except hand_off must run on the loop's thread. hand_off from another
    thread (a gthread pool thread on an error path) half-closes at once and lets
    `defer` run the registration on the loop.
    """

    def __init__(self, settings: Settings, selector: selectors.BaseSelector | None = None, *,
                 defer: Defer | None = None, counters: Counters = PROCESS_COUNTERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.counters = counters
        self._clock = clock
        self._defer = defer
        self._loop_thread = threading.get_ident()
        self._by_start: OrderedDict[int, LingeringConnection] = OrderedDict()     # oldest first
        self._by_activity: OrderedDict[int, LingeringConnection] = OrderedDict()  # least recently read first
        self._buffer = memoryview(bytearray(READ_CHUNK))
        # No deadline is earlier than this (the earliest one seen by the last sweep):
        # deadlines only move later (new sockets, reads), so most sweeps end at one compare.
        self._due = math.inf
        self.stopping = False  # set by begin_stop(): the stop rule of core.linger applies
        self._stop_limit = math.inf  # nothing lingers past this (the server's graceful timeout)
        self._own: Any = None  # our own epoll/selector, when the worker has no selector to share
        if selector is not None:
            self._use_selector(selector)
        else:
            self._use_own()

    def _use_selector(self, selector: selectors.BaseSelector) -> None:
        # The worker's selector (gthread's poller): its loop calls key.data(key.fileobj),
        # and every key carries the same bound method, so a registration allocates none.
        self._register: Callable[[int], Any] = functools.partial(
            selector.register, events=selectors.EVENT_READ, data=self.on_readable)
        self._unregister: Callable[[int], Any] = selector.unregister

    def _use_own(self) -> None:
        if hasattr(select, "epoll"):  # Linux: C calls only, no selectors bookkeeping
            epoll = select.epoll()
            self._own = epoll
            self._register = functools.partial(epoll.register, eventmask=select.EPOLLIN)
            self._unregister = epoll.unregister
            self._ready: Callable[[float | None], list[tuple[int, int]]] = epoll.poll
        else:  # pragma: no cover - elsewhere
            selector = selectors.DefaultSelector()
            self._own = selector
            self._register = functools.partial(selector.register, events=selectors.EVENT_READ)
            self._unregister = selector.unregister
            self._ready = lambda timeout: [(key.fd, mask) for key, mask in selector.select(timeout)]

    @property
    def lingering(self) -> int:
        return len(self._by_start)

    def fileno(self) -> int | None:
        """The engine's own epoll (or kqueue) as one descriptor, for a worker's select()."""
        fileno: Callable[[], int] | None = getattr(self._own, "fileno", None)
        return fileno() if fileno is not None else None

    # ---- entry point ---------------------------------------------------------------

    def hand_off(self, sock: _socket.socket) -> None:
        """Take the connection over: half-close now, drain and close later; never blocks.

        The socket object is detached: the server's later close() or reuse of it is
        harmless, and a second hand_off of the same object does nothing.
        """
        # The C socket's own attributes are plain ints: socket.socket's properties convert
        # them to enums, which costs more than the rest of the hand-off.
        raw = cast(_socket.socket, super(socket.socket, sock)) if isinstance(sock, socket.socket) else sock
        family, kind, proto = raw.family, raw.type, raw.proto
        try:
            fd = sock.detach()
        except OSError:
            return
        if fd < 0:
            return
        # The engine keeps the C socket (no Python wrapper to build); naming family, type
        # and protocol spares the three getsockopt() probes of fileno= alone.
        owned = _socket.socket(family, kind, proto, fd)
        owned.setblocking(False)
        if self.stopping and not bytes_at_stake(unread_bytes(fd), unacked_bytes(fd), fin_sent=False):
            # A stopping server closes an idle connection at once, as nginx does: its
            # response is acknowledged and nothing is unread, so a plain close sends FIN.
            half_close(owned)
            owned.close()
            return
        shut = half_close(owned)  # FIN goes out now, behind the queued response
        if self._defer is not None and threading.get_ident() != self._loop_thread:
            self._defer(self._adopt, owned, shut)
        else:
            self._adopt(owned, shut)

    # ---- called by the loop --------------------------------------------------------

    def on_readable(self, fd: Any) -> None:
        entry = self._by_start.get(fd)
        if entry is None:
            return
        state = entry.state
        for _ in range(READS_PER_EVENT):
            try:
                n = entry.sock.recv_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return  # nothing to read *now* is not the end: wait for EOF or a deadline
            except OSError:
                self._finish(entry, state.on_error())
                return
            if n == 0:
                self._finish(entry, state.on_eof())
                return
            ending = state.on_data(n, self._clock())
            self._by_activity.move_to_end(fd)
            if ending:
                self._finish(entry, ending)
                return

    def next_deadline(self) -> float | None:
        if not self._by_start:
            return None
        oldest = next(iter(self._by_start.values())).state.total_deadline
        quietest = next(iter(self._by_activity.values())).state.idle_deadline
        return min(oldest, quietest)

    def timeout(self, longest: float | None, now: float) -> float | None:
        """How long the loop may wait for events before the next sweep is due."""
        if not self._by_start:
            return longest
        due = max(0.0, self._due - now)
        return due if longest is None else min(longest, due)

    def sweep(self, now: float) -> None:
        """The coarse timer pass: end every connection whose deadline has passed."""
        if now < self._due:
            return
        for order in (self._by_start, self._by_activity):
            while order:
                entry = next(iter(order.values()))
                ending = entry.state.on_timer(now)
                if ending is None:
                    break
                self._finish(entry, ending)
        self._due = self.next_deadline() or math.inf

    def poll(self, timeout: float | None = 0.0) -> None:
        """One turn on the engine's own selector (sync worker): events, then the sweep."""
        if not self._by_start:
            return
        for fd, _ in self._ready(-1 if timeout is None else timeout):
            self.on_readable(fd)
        self.sweep(self._clock())

    def evict(self, count: int) -> int:
        """The process is short of descriptors (core.descriptors): end up to `count`
        lingering connections, oldest first; how many ended."""
        ended = 0
        while ended < count and self._by_start:
            entry = next(iter(self._by_start.values()))
            self._finish(entry, entry.state.on_evict())
            ended += 1
        return ended

    def end_all(self) -> None:
        """A stop's limit: whatever still lingers ends now (an engine on an asyncio loop)."""
        for entry in list(self._by_start.values()):
            self._finish(entry, entry.state.on_shutdown())

    # ---- stopping ------------------------------------------------------------------

    def begin_stop(self, grace: float) -> None:
        """The server stops gracefully (grace 0: quickly): the stop rule of core.linger for
        every lingering connection, none beyond `grace` seconds from now. A later call can
        only bring the end closer."""
        now = self._clock()
        self._stop_limit = min(self._stop_limit, now + max(0.0, grace))
        self.stopping = True
        for entry in list(self._by_start.values()):
            state = entry.state
            fd = entry.fd
            if not state.stopping:
                self.on_readable(fd)  # what has arrived is read first: unread, it would count
                if state.ending is not None:
                    continue  # the client's EOF was there
            at_stake = state.stopping or bytes_at_stake(unread_bytes(fd), unacked_bytes(fd),
                                                        fin_sent=True)
            ending = state.on_stop(now, self._stop_limit, at_stake)
            if ending is not None:
                self._finish(entry, ending)
        self._due = self.next_deadline() or math.inf

    def finish(self, grace: float, tick: Callable[[], None] | None = None) -> None:
        """The worker loop has ended: run what still lingers to its end by the stop rule
        (none beyond `grace` seconds from now), then close what is left. `tick` runs about
        once a second (a worker's heartbeat)."""
        self.begin_stop(grace)
        if self._by_start:
            if self._own is None:
                self._rehome()  # the worker's poller is closed or about to be
            next_tick = time.monotonic() + 1.0
            while self._by_start and (now := self._clock()) < self._stop_limit:
                self.poll(min(self._stop_limit - now, self.timeout(1.0, now) or 0.0))
                if tick is not None and time.monotonic() >= next_tick:
                    tick()
                    next_tick = time.monotonic() + 1.0
        for entry in list(self._by_start.values()):
            self._finish(entry, entry.state.on_shutdown())
        if self._own is not None:
            self._own.close()

    # ---- internals -----------------------------------------------------------------

    def _rehome(self) -> None:
        self._use_own()
        for fd in list(self._by_start):
            try:
                self._register(fd)
            except (OSError, ValueError):
                entry = self._by_start[fd]
                self._finish(entry, entry.state.on_error(), registered=False)

    def _adopt(self, sock: _socket.socket, shut: bool) -> None:
        self.counters.started()
        entry = LingeringConnection(sock, LingerState(self.settings, self._clock()))
        if not shut:
            self._finish(entry, entry.state.on_error(), registered=False)
            return
        if self.stopping:  # handed off during the stop: its bytes are at stake (see hand_off)
            ending = entry.state.on_stop(entry.state.started, self._stop_limit, at_stake=True)
            if ending is not None:
                self._finish(entry, ending, registered=False)
                return
        if len(self._by_start) >= self.settings.max_lingering:
            oldest = next(iter(self._by_start.values()))
            self._finish(oldest, oldest.state.on_evict())
        try:
            self._register(entry.fd)
        except (OSError, ValueError, KeyError):
            self._finish(entry, entry.state.on_error(), registered=False)
            return
        self._by_start[entry.fd] = entry
        self._by_activity[entry.fd] = entry
        if self._due > entry.state.deadline:  # a stop's deadlines need not come in order
            self._due = entry.state.deadline

    def _finish(self, entry: LingeringConnection, ending: Ending | None,
                registered: bool = True) -> None:
        if ending is None:  # ended already
            return
        if registered:
            self._by_start.pop(entry.fd, None)
            self._by_activity.pop(entry.fd, None)
            try:
                self._unregister(entry.fd)
            except (KeyError, ValueError, OSError, RuntimeError, AttributeError):
                pass  # RuntimeError: gthread closed its poller already
        aborted = close_for(entry.sock, ending)
        self.counters.record_end(ending.reason, entry.state.discarded, aborted)
