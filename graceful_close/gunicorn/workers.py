"""SyncLingerWorker and ThreadWorker: gunicorn's sync and gthread workers whose every close lingers.

gunicorn closes client sockets with util.close_graceful (end of every sync response,
an error after headers, gthread connections ending) and gthread's TConn.close
(keep-alive expiry, pending expiry, errors). Stock close_graceful half-closes and reads
on the worker's own thread: a client that never closes stalls the worker for 2 s, and
more than 64 KiB of unread upload still ends in RST. Here both paths hand the socket to
the worker's drain engine (engines.poll.PollDrainEngine), which the worker's own loop
drives: gthread's poller, or the sync worker's poll before each accept() and its idle
select(). No thread, no wake-up pipe.

Every reach into gunicorn lives in ._compat and is checked at start-up.
"""

from __future__ import annotations

import errno
import logging
import math
import select
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers import base, gthread, sync

from .. import metrics
from ..core.closing import AUTO, closes_at_once, headers_say_close
from ..core.counters import PROCESS_COUNTERS
from ..core.descriptors import DescriptorBudget
from ..core.keepalive import KeepAlivePolicy, keep_alive_value
from ..core.linger import bytes_at_stake
from ..core.stopping import StopDrain, drain_window
from ..engines.poll import PollDrainEngine
from ..engines.sockets import descriptor_budget, unacked_bytes, unread_bytes
from ..settings import Settings, announce, current_settings
from . import _compat

__all__ = ["SyncLingerWorker", "SyncWorker", "ThreadWorker"]

# Leave this much of gunicorn's graceful_timeout for the exit itself: the arbiter
# sends SIGKILL when it runs out, and a killed worker resets what still lingers.
STOP_MARGIN = 1.0
# Out of descriptors with nothing left to free: stop accepting this long instead of
# letting accept() raise out of the worker loop; nginx pauses 500 ms as well.
ACCEPT_PAUSE = 0.5
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# The drain engine of this worker process (one worker per process).
_engine: PollDrainEngine | None = None
# lingering_close=auto (core.closing): set by the worker's init_process.
_at_once = False
# The ThreadWorker of this process, for its responses; set by its init_process.
_worker: ThreadWorker


# Sockets whose last request the client ended itself with an explicit Connection: close,
# received whole (lingering_close=auto, core.closing): their close does not linger if
# nothing is unread by then. Marked by a worker (thread) after the response, unmarked here.
_client_closed: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def mark_if_client_closed(req: Any, sock: socket.socket) -> None:
    """After a response that ends the connection: mark `sock` when the client itself ended
    it and its request was received whole (lingering_close=auto only)."""
    if _at_once and headers_say_close(req.headers) and _compat.request_whole(req):
        _client_closed.add(sock)


def _nothing_pending(sock: socket.socket) -> bool:
    """Nothing unread, and the response all acknowledged (core.closing.closes_at_once)."""
    try:
        fd = sock.fileno()
    except OSError:
        return False
    return fd >= 0 and closes_at_once(AUTO, True, True, unread_bytes(fd), unacked_bytes(fd))


def _hand_off(sock: socket.socket, *_args: Any, **_kwargs: Any) -> None:
    """Drop-in for gunicorn.util.close_graceful(sock, timeout, max_drain)."""
    if _client_closed and sock in _client_closed:
        _client_closed.discard(sock)
        if _nothing_pending(sock):  # no byte can meet an RST: close as stock does
            sock.close()
            return
    if _engine is not None:
        _engine.hand_off(sock)
    else:  # a close before the loop started (none in gunicorn 27): nothing to linger for
        sock.close()


def _log_to_gunicorn(gunicorn_log: Any) -> None:
    """Our log lines (engine errors, the exit summary) go where gunicorn's error log goes,
    unless the application configured the "graceful_close" logger itself."""
    ours = logging.getLogger("graceful_close")
    error_log = getattr(gunicorn_log, "error_log", None)
    if ours.handlers or not isinstance(error_log, logging.Logger):
        return
    for handler in error_log.handlers:
        ours.addHandler(handler)
    ours.setLevel(error_log.level)
    ours.propagate = False


def _later_in_a_thread(delay: float, call: Callable[[], None]) -> None:
    timer = threading.Timer(delay, call)
    timer.daemon = True
    timer.start()


def start_stop_delay(worker: Any, stop: Callable[[], None],
                     later: Callable[[float, Callable[[], None]], Any] = _later_in_a_thread) -> bool:
    """stop_delay (issue 16): after SIGTERM keep serving normally this long, then `stop()`;
    False when there is no delay. Never more than half of graceful_timeout: the arbiter
    kills the worker graceful_timeout after its SIGTERM, and the stop itself needs the rest."""
    delay = min(current_settings().stop_delay, float(worker.cfg.graceful_timeout) / 2)
    if delay <= 0:
        return False
    worker._delaying = True
    worker.log.info("graceful-close: SIGTERM; serving %gs more before the stop (stop_delay)", delay)
    later(delay, stop)  # a thread's timer; gevent's worker: a greenlet (signal handlers run in the hub)
    return True


class _GracefulWorker(base.Worker):
    """Shared by both workers: checks at start-up, closes routed to the drain engine,
    and the stop within gunicorn's limits. (A base.Worker, so that super() reaches the
    sync or gthread worker it is mixed into: their common base comes after both.)"""

    graceful_settings: Settings
    drain: PollDrainEngine
    # RLIMIT_NOFILE against what the worker opened before serving (core.descriptors).
    descriptor_budget: DescriptorBudget | None = None
    _quick_exit = False
    _term_at: float | None = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Runs in the master at start-up: an incompatible gunicorn or a bad setting
        stops gunicorn with one line; else one line says what runs, with every setting."""
        problem = _compat.check()
        if problem is not None:
            raise SystemExit(problem)
        where = f"gunicorn -k {cfg.worker_class_str}"
        if not str(cfg.worker_class_str).endswith(cls.__name__):  # SyncLingerWorker --threads N
            where += f" --threads {cfg.threads}, served by graceful_close.gunicorn.{cls.__name__}"
        announce(where, log.info)
        parent = getattr(super(), "check_config", None)
        if parent is not None:
            parent(cfg, log)

    def init_process(self) -> None:
        global _at_once
        self.graceful_settings = current_settings()
        _at_once = self.graceful_settings.lingering_close == AUTO
        _compat.route_closes(_hand_off)
        _log_to_gunicorn(self.log)
        metrics.maybe_start_for_worker()
        super().init_process()  # runs the worker loop; returns at exit

    def _start_engine(self, engine: PollDrainEngine) -> None:
        global _engine
        self.drain = _engine = engine
        self.descriptor_budget = descriptor_budget()

    def _free_descriptors(self, wanted: int) -> int:
        """Short of descriptors: close up to `wanted` connections nobody loses anything
        by (core.descriptors), oldest lingering ones here; how many were closed."""
        return self.drain.evict(wanted)

    def _accept_failed(self, exc: OSError) -> bool:
        """accept() failed for lack of descriptors: free some (the connection waits in
        the backlog and the next turn accepts it) and True; False when it is another
        error or nothing could be freed (then the caller pauses accepting)."""
        if exc.errno not in _OUT_OF_DESCRIPTORS:
            raise exc
        budget = self.descriptor_budget
        freed = self._free_descriptors(budget.batch if budget is not None else 1)
        if freed:
            self.log.warning("graceful-close: accept() failed (%s); closed %d idle or "
                             "lingering connections", exc.strerror, freed)
            return True
        self.log.warning("graceful-close: accept() failed (%s); pausing accepts for %gs",
                         exc.strerror, ACCEPT_PAUSE)
        return False

    def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM: graceful stop
        if self._term_at is None:
            self._term_at = time.monotonic()
            if start_stop_delay(self, lambda: self._stop_now(sig, frame)):
                return
        elif self._delaying:
            return  # the stop begins when stop_delay has passed
        self._stop_now(sig, frame)

    _delaying = False

    def _stop_now(self, sig: int, frame: Any) -> None:
        self._delaying = False
        super().handle_exit(sig, frame)

    def handle_quit(self, sig: int, frame: Any) -> None:  # SIGQUIT, SIGINT: quick stop
        self._quick_exit = True
        super().handle_quit(sig, frame)

    def handle_abort(self, sig: int, frame: Any) -> None:  # the arbiter's timeout
        self._quick_exit = True
        super().handle_abort(sig, frame)

    def _finish_engine(self) -> None:
        engine = getattr(self, "drain", None)
        try:
            if engine is not None:
                engine.finish(self._stop_grace(), tick=self.notify)
        finally:
            metrics.flush_at_worker_exit()

    def _stop_grace(self) -> float:
        """How long from now lingering sockets may still run, at most, once the worker
        stops (the stop rule of core.linger ends most of them much sooner): what
        graceful_timeout leaves of the stop, less the margin for the exit itself."""
        if self._quick_exit:
            return 0.0
        now = time.monotonic()
        if self._term_at is None:  # max_requests restart or lost parent: the stop begins now
            self._term_at = now
        return max(0.0, self.cfg.graceful_timeout - (now - self._term_at) - STOP_MARGIN)


class SyncLingerWorker(_GracefulWorker, sync.SyncWorker):
    """gunicorn's sync worker; lingering sockets are drained between requests.

    Before each accept() the worker polls its lingering set without blocking, and its
    idle select() includes the set (one epoll descriptor), so a client that never
    closes costs the worker nothing and delays no one.

    The sync worker answers every request with "Connection: close" (gunicorn forces
    it): there is no keep-alive to decide; use ThreadWorker for keep-alive.

    Why not "SyncWorker": gunicorn replaces any worker class whose name ends in
    "SyncWorker" by its stock gthread worker when --threads > 1, before importing it, so
    none of our code would run (issue 17 item 4). This name is left alone, and with
    --threads > 1 this class serves our ThreadWorker, as gunicorn serves gthread for sync.
    """

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cls is SyncLingerWorker and cfg.threads > 1:
            ThreadWorker.check_config(cfg, log)  # its checks and its start-up line
        else:
            super().check_config(cfg, log)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # --threads > 1: the arbiter's worker is our ThreadWorker (_compat, reach 10). Only
        # for this class itself: a subclass keeps what it defines, as a stock one would.
        cfg = _compat.worker_cfg(args, kwargs)
        if cls is SyncLingerWorker and cfg is not None and cfg.threads > 1:
            return ThreadWorker(*args, **kwargs)
        return super().__new__(cls)

    wait_fds: list[Any]
    _wait_fds_with_drain: list[Any]
    _drain_fd: int | None = None

    def run(self) -> None:
        self._start_engine(PollDrainEngine(self.graceful_settings))
        self._drain_fd = self.drain.fileno()
        self._wait_fds_with_drain = [*self.wait_fds, self._drain_fd]
        try:
            super().run()
        finally:  # also when handle_quit's sys.exit unwinds the loop
            self._finish_engine()

    def accept(self, listener: socket.socket) -> None:
        drain = self.drain
        if drain.lingering:
            drain.poll(0)
        try:
            super().accept(listener)
        except OSError as exc:
            if self._accept_failed(exc):
                return
            # The connection waits in the kernel's backlog. Meanwhile serve the lingering
            # sockets: they are what holds the descriptors.
            until = time.monotonic() + ACCEPT_PAUSE
            while (left := until - time.monotonic()) > 0:
                if drain.lingering:
                    drain.poll(left)
                else:
                    time.sleep(left)

    def handle_request(self, listener: Any, req: Any, client: socket.socket, addr: Any) -> None:
        super().handle_request(listener, req, client, addr)
        mark_if_client_closed(req, client)  # every sync response ends its connection

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        # Once per connection (one request each): keep room for the next accept().
        budget = self.descriptor_budget
        if budget is not None and self.drain.lingering:
            wanted = budget.to_free(self.drain.lingering + 1)
            if wanted:
                self.drain.evict(wanted)
        super().handle(listener, client, addr)

    def wait(self, timeout: float) -> Any:
        drain = self.drain
        if not drain.lingering or self._drain_fd is None:
            return super().wait(timeout)
        own = self.wait_fds
        self.wait_fds = self._wait_fds_with_drain
        until = time.monotonic() + timeout
        try:
            while True:
                now = time.monotonic()
                ready = super().wait(drain.timeout(max(0.0, until - now), now))
                drain.poll(0)
                if not ready:  # a deadline or the worker's timeout: back to the loop
                    return ready
                listeners = [fd for fd in ready if fd != self._drain_fd]
                # Woken by lingering sockets alone: serve them and wait on, without a turn
                # of the worker loop (a failing accept and a parent check) for each one.
                if listeners or not drain.lingering or not self.alive or now >= until:
                    return listeners
        finally:
            self.wait_fds = own


class _Connection(gthread.TConn):
    """gthread's connection plus what the keep-alive policy needs; every close lingers.

    The policy runs on a connection's first request (the User-Agent rule, decided once),
    when its request cap is due, when it is older than the age cap, and for every request
    of a client whose rule closes only on POST. Other requests pay one increment.
    """

    data_ready: bool
    # Set by ThreadWorker.init_process (one worker per process).
    age_cap = math.inf
    first_check = 1
    # Every open connection, wherever it is (a pool thread, the poller): a quick stop ends
    # them all. Weak, so that a connection gunicorn drops without close() is not kept.
    everyone: weakref.WeakSet[_Connection] = weakref.WeakSet()

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.everyone.add(self)
        self.accepted_at = time.monotonic()
        self.close_after = self.accepted_at + self.age_cap
        self.requests = 0
        self.next_check = self.first_check  # request number at which the policy runs
        self.post_closes = False

    def close(self, graceful: bool = False) -> None:
        # Keep-alive expiry and errors can leave unread client bytes too. Never raises:
        # TConn.close(graceful=True) on a socket already closed raises EBADF and makes
        # finish_request count the connection twice.
        _hand_off(self.sock)

    def wait_for_data(self, timeout: float) -> bool:
        # Copied from TConn.wait_for_data, with poll() for its per-connection epoll: poll()
        # takes no descriptor, so a worker short of them (lingering sockets hold some)
        # still serves the connections it has accepted instead of failing them.
        if self.data_ready:
            return True
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN)
            ready = bool(poller.poll(timeout * 1000))
        except (OSError, ValueError):
            return False
        self.data_ready = ready
        return ready


class _Response(gunicorn_wsgi.Response):
    """gunicorn's HTTP/1 response; its Connection header is chosen when it is sent.

    That is the last moment it can be chosen: an app may read the request body after
    start_response, so "unread body" is decided here, not at start_response.
    """

    must_close: bool

    def default_headers(self) -> list[str]:
        worker = _worker  # installed by ThreadWorker.init_process, after _worker is set
        if not self.must_close and (worker.terminating or _compat.unread_over(self.req, _compat.DRAIN_LIMIT)):
            # SIGTERM: the response in flight ends the connection. Unread body: gthread
            # would announce keep-alive, give up draining after DRAIN_LIMIT, and close.
            self.must_close = True
        headers: list[str] = super().default_headers()
        if worker.keepalive_header and not self.should_close():
            headers.append(worker.keepalive_header_for(self.req))
        return headers


class ThreadWorker(_GracefulWorker, gthread.ThreadWorker):
    """gunicorn's gthread worker with lingering closes and the keep-alive policy.

    Per request: the request cap, the connection age cap and the User-Agent rules
    decide; a response that ends the connection carries "Connection: close". With
    keepalive_header=true, one that keeps it carries "Keep-Alive: timeout, max".
    After SIGTERM, responses in flight carry "Connection: close"; at --max-requests the
    one in flight keeps keep-alive and the next request is answered with close (stock).
    """

    keepalive_policy: KeepAlivePolicy
    keepalive_header = False
    terminating = False  # SIGTERM received
    clock = 0.0  # the loop's clock, read once per loop turn: the age cap checks against it
    _accept_paused_until = 0.0

    def init_process(self) -> None:
        global _worker
        settings = current_settings()
        self.keepalive_policy = KeepAlivePolicy(settings)
        self.keepalive_header = settings.keepalive_header
        _Connection.age_cap = settings.keepalive_time or math.inf
        # Without a cap, User-Agent rule or header there is nothing to decide per request.
        needs_first = bool(settings.keepalive_requests or settings.keepalive_time
                           or self.keepalive_policy.user_agents.active or self.keepalive_header)
        _Connection.first_check = 1 if needs_first else sys.maxsize
        _worker = self
        self.clock = time.monotonic()
        _compat.route_connections(_Connection)
        _compat.route_responses(_Response)
        super().init_process()

    def run(self) -> None:
        self._start_engine(PollDrainEngine(self.graceful_settings, _compat.poller(self),
                                           defer=_compat.defer(self)))
        try:
            super().run()
        finally:
            self._finish_engine()

    def _stop_now(self, sig: int, frame: Any) -> None:
        self.terminating = True
        super()._stop_now(sig, frame)

    def _cap_keepalive(self, deadline: float) -> None:
        """The stop's drain (issue 16, core.stopping; reach 12): stock gthread keeps every
        kept-alive connection open for 2 s at a stop and answers a request on it with
        Connection: close. Ours keeps those the client used within the window (drain_window,
        at least stock's 2 s) until it ends, and closes those idle for longer at once."""
        now = time.monotonic()
        # Never shorter than stock's own hold (STOP_KEEPALIVE_LINGER, 2 s in gunicorn 27):
        # with drain_window 0 only, every kept-alive connection closes at once.
        stock_hold = float(getattr(gthread, "STOP_KEEPALIVE_LINGER", 0.0))
        window = current_settings().drain_window and max(current_settings().drain_window,
                                                         stock_hold)
        window = drain_window(current_settings().replace(drain_window=window),
                              self.cfg.graceful_timeout - (now - (self._term_at or now)) - STOP_MARGIN)
        drain = StopDrain(window, now)
        keepalive = float(self.cfg.keepalive)
        idle_closed = 0
        # Oldest first: closing the front at once and capping the rest at the window's end
        # keeps the deque sorted by timeout, as gthread needs.
        for conn in self.keepalived_conns:
            # timeout - keepalive is its last use, unless gthread capped it already (a response
            # completed after the worker stopped, a --max-requests stop): used just now.
            last_used = conn.timeout - keepalive if conn.timeout > now + stock_hold else now
            if drain.keeps_open(last_used, now):
                conn.timeout = min(conn.timeout, drain.ends)
            else:
                conn.timeout = now
                idle_closed += 1
        if idle_closed:
            PROCESS_COUNTERS.count("drain_idle_closed", idle_closed)

    def handle_quit(self, sig: int, frame: Any) -> None:
        # SIGINT/SIGQUIT end every connection at once. A pool thread blocked reading a
        # request that never completes would otherwise hold the exit (the interpreter
        # joins the pool's threads) until the arbiter's SIGKILL, graceful_timeout later.
        for conn in list(_Connection.everyone):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # handed off or closed already
        super().handle_quit(sig, frame)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        # One turn of gthread's loop (also while stopping): events, then one clock read,
        # one coarse sweep of the lingering sockets, and the stop rule once alive is off.
        drain = self.drain
        if drain.lingering:
            timeout = drain.timeout(timeout, self.clock) or 0.0
        super().wait_for_and_dispatch_events(timeout)
        self.clock = now = time.monotonic()
        if drain.lingering:
            drain.sweep(now)
        if not self.alive and not drain.stopping:
            drain.begin_stop(self._stop_grace())

    def accept(self, listener: socket.socket) -> None:
        try:
            super().accept(listener)
        except OSError as exc:
            # Stock gthread re-raises EMFILE and the worker dies (and with it every open
            # connection). Free idle and lingering ones instead; when there are none,
            # unregister the listeners for a moment: sleeping here would stall the poller
            # and every connection on it.
            if not self._accept_failed(exc):
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                self.set_accept_enabled(False)
            return
        # Once per accepted connection: keep room for the next one (core.descriptors).
        budget = self.descriptor_budget
        if budget is not None:
            wanted = budget.to_free(self.nr_conns + self.drain.lingering)
            if wanted:
                self._free_descriptors(wanted)

    def _free_descriptors(self, wanted: int) -> int:
        """Idle keep-alive connections with nothing at stake first (nothing unread, the
        last response acknowledged: a plain close loses nothing), oldest first, then
        connections still waiting for their first byte, then the oldest lingering ones."""
        freed = 0
        for idle in _compat.idle_connections(self):
            if freed >= wanted:
                break
            fd = idle.sock.fileno()
            if fd < 0 or bytes_at_stake(unread_bytes(fd), unacked_bytes(fd), fin_sent=False):
                continue  # its next request is arriving: not ours to drop
            _compat.forget_idle(self, idle)
            try:
                idle.sock.close()
            except OSError:
                pass
            freed += 1
        return freed + self.drain.evict(wanted - freed)

    def set_accept_enabled(self, enabled: bool) -> None:
        # gthread's loop re-enables accepting on every turn; hold off until the pause ends.
        if enabled and self._accept_paused_until and time.monotonic() < self._accept_paused_until:
            return
        super().set_accept_enabled(enabled)

    def handle_request(self, req: Any, conn: _Connection) -> bool:
        conn.requests += 1
        if conn.requests >= conn.next_check or self.clock >= conn.close_after:
            self._apply_policy(req, conn)
        keep_alive: bool = super().handle_request(req, conn)
        if not keep_alive:
            mark_if_client_closed(req, conn.sock)
        return keep_alive

    def _apply_policy(self, req: Any, conn: _Connection) -> None:
        """The rare path: first request, a cap due, or a client whose rule needs the method."""
        policy = self.keepalive_policy
        if req.should_close():  # the client closes anyway
            return
        settings = self.graceful_settings
        user_agent = None
        if conn.requests == 1 and policy.user_agents.active:
            user_agent = _user_agent(req)
            if user_agent:
                conn.post_closes = policy.user_agents.verdict(user_agent)[1]
        elif conn.post_closes:
            user_agent = _user_agent(req)
        decision = policy.decide(conn.requests, conn.accepted_at, self.clock, user_agent, req.method)
        if not decision.keep_alive:
            req.must_close = True  # gunicorn then answers "Connection: close"
            return
        if self.keepalive_header or conn.post_closes:
            conn.next_check = 0  # every request
        elif settings.keepalive_requests:
            conn.next_check = settings.keepalive_requests
        else:
            conn.next_check = sys.maxsize

    def keepalive_header_for(self, req: Any) -> str:
        """Keep-Alive: timeout=<keepalive>[, max=<requests left>] (keepalive_header=true)."""
        cap = self.graceful_settings.keepalive_requests
        remaining = cap - req.req_number if cap else None
        return f"Keep-Alive: {keep_alive_value(self.cfg.keepalive, remaining)}\r\n"


def _user_agent(req: Any) -> str | None:
    for name, value in req.headers:  # gunicorn upper-cases header names
        if name == "USER-AGENT":
            return str(value)
    return None


# The sync worker's first name, kept for `-k graceful_close.gunicorn.SyncWorker` without
# --threads. With --threads > 1 gunicorn swaps that name for stock gthread before importing
# ours, unless graceful_close was imported in the master (a gunicorn.conf.py calling
# configure()): then it is served by our ThreadWorker as well (_compat, reach 8).
SyncWorker = SyncLingerWorker
