"""Threaded drain engine: one daemon thread and one selector per worker process.

Server threads call hand_off(sock) and return at once; the engine thread owns
the socket from then on: it reads and discards what the client still sends and
closes on EOF, error, the idle deadline or the total deadline.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ..core.counters import PROCESS_COUNTERS, Counters
from ..core.linger import Ending, LingerState
from ..settings import Settings
from .sockets import close_for, half_close

log = logging.getLogger("graceful_close")

READ_CHUNK = 65536
READS_PER_WAKEUP = 16  # one flooding client cannot starve the others
# After a busy turn, let events pile up this long: one wake-up then serves many sockets.
# Without it the thread wakes twice per connection and trades the GIL with the worker
# each time. The FIN is already out, so a millisecond here delays nothing a client sees.
COALESCE_SECONDS = 0.001


class _Lingering:
    __slots__ = ("sock", "fd", "state")

    def __init__(self, sock: socket.socket, state: LingerState) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = state


class Lingerer:
    def __init__(self, settings: Settings, counters: Counters = PROCESS_COUNTERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.counters = counters
        self._clock = clock
        self._incoming: queue.SimpleQueue[tuple[socket.socket, bool]] = queue.SimpleQueue()
        self._by_start: OrderedDict[int, _Lingering] = OrderedDict()     # oldest first
        self._by_activity: OrderedDict[int, _Lingering] = OrderedDict()  # least recently read first
        self._buffer = memoryview(bytearray(READ_CHUNK))
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop_at: float | None = None  # set by stop(): end everything left by then
        self._stopped = threading.Event()

    # ---- called from server threads -------------------------------------------------

    def hand_off(self, sock: socket.socket) -> None:
        """Half-close now and let the engine drain and close; never blocks.

        The socket object is detached: the server's later close() or reuse of it is
        harmless, and calling hand_off twice for one socket does nothing.
        """
        family, kind, proto = sock.family, sock.type, sock.proto
        try:
            fd = sock.detach()
        except OSError:
            return
        if fd < 0:
            return
        # Naming family/type/proto spares the three getsockopt() probes of fileno= alone.
        owned = socket.socket(family, kind, proto, fileno=fd)
        owned.setblocking(False)
        shut = half_close(owned)  # FIN goes out now, behind the queued response
        self._ensure_started()
        self._incoming.put((owned, shut))
        self._wake()

    @property
    def lingering(self) -> int:
        return len(self._by_start)

    def stop(self, grace: float, tick: Callable[[], None] | None = None) -> None:
        """Wait up to `grace` seconds (at most linger_time) for lingering sockets to end,
        then close the rest. `tick` runs every second meanwhile (a worker's heartbeat)."""
        if self._thread is None:
            return
        grace = max(0.0, min(grace, self.settings.linger_time))
        self._stop_at = self._clock() + grace
        self._wake()
        give_up = time.monotonic() + grace + 2.0
        while not self._stopped.wait(1.0) and time.monotonic() < give_up:
            if tick is not None:
                tick()

    # ---- engine thread -------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is not None:
                return
            self._selector = selectors.DefaultSelector()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            thread = threading.Thread(target=self._run, name="graceful-close-lingerer", daemon=True)
            thread.start()
            self._thread = thread

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # pipe full: the engine is awake already

    def _run(self) -> None:
        assert self._selector is not None
        while True:
            try:
                if self._step(self._selector):
                    break
            except Exception:  # the engine must outlive any one bad socket
                log.exception("graceful-close: lingerer error")
        self._stopped.set()

    def _step(self, selector: selectors.BaseSelector) -> bool:
        """One turn of the loop; True when stopping and nothing is left."""
        events = selector.select(self._next_timeout())
        for key, _ in events:
            if key.data is None:
                self._take_incoming()
            else:
                self._drain(key.data)
        now = self._clock()
        self._expire(now)
        if self._stop_at is not None:
            if now >= self._stop_at:
                for entry in list(self._by_start.values()):
                    self._finish(entry, entry.state.on_shutdown())
            if not self._by_start and self._incoming.empty():
                return True
        if events:
            time.sleep(COALESCE_SECONDS)
        return False

    def _next_timeout(self) -> float | None:
        deadlines = []
        if self._by_start:
            deadlines.append(next(iter(self._by_start.values())).state.total_deadline)
            deadlines.append(next(iter(self._by_activity.values())).state.idle_deadline)
        if self._stop_at is not None:
            deadlines.append(self._stop_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self._clock())

    def _take_incoming(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass
        while True:
            try:
                sock, shut = self._incoming.get_nowait()
            except queue.Empty:
                return
            self._add(sock, shut)

    def _add(self, sock: socket.socket, shut: bool) -> None:
        assert self._selector is not None
        self.counters.lingering_started += 1
        entry = _Lingering(sock, LingerState(self.settings, self._clock()))
        if not shut:
            self._finish(entry, entry.state.on_error(), registered=False)
            return
        if len(self._by_start) >= self.settings.max_lingering:
            oldest = next(iter(self._by_start.values()))
            self._finish(oldest, oldest.state.on_evict())
        try:
            self._selector.register(sock, selectors.EVENT_READ, entry)
        except (OSError, ValueError):
            self._finish(entry, entry.state.on_error(), registered=False)
            return
        self._by_start[entry.fd] = entry
        self._by_activity[entry.fd] = entry

    def _drain(self, entry: _Lingering) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                n = entry.sock.recv_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return  # nothing to read *now* is not the end: wait for EOF or a deadline
            except OSError:
                self._finish(entry, entry.state.on_error())
                return
            if n == 0:
                self._finish(entry, entry.state.on_eof())
                return
            ending = entry.state.on_data(n, self._clock())
            self._by_activity.move_to_end(entry.fd)
            if ending:
                self._finish(entry, ending)
                return

    def _expire(self, now: float) -> None:
        for order in (self._by_start, self._by_activity):
            while order:
                entry = next(iter(order.values()))
                ending = entry.state.on_timer(now)
                if ending is None:
                    break
                self._finish(entry, ending)

    def _finish(self, entry: _Lingering, ending: Ending | None, registered: bool = True) -> None:
        if ending is None:  # ended already
            return
        if registered:
            self._by_start.pop(entry.fd, None)
            self._by_activity.pop(entry.fd, None)
            try:
                assert self._selector is not None
                self._selector.unregister(entry.sock)
            except (KeyError, ValueError, OSError):
                pass
        aborted = close_for(entry.sock, ending)
        self.counters.record_end(ending.reason, entry.state.discarded, aborted)


_process_lingerer: tuple[int, Lingerer] | None = None
_process_lock = threading.Lock()


def process_lingerer(settings: Settings | None = None) -> Lingerer:
    """The lingerer of this process, created on first use (after any fork)."""
    global _process_lingerer
    with _process_lock:
        if _process_lingerer is None or _process_lingerer[0] != os.getpid():
            _process_lingerer = (os.getpid(), Lingerer(settings or Settings.from_env()))
        return _process_lingerer[1]
