"""gunicorn's gevent worker (-k gevent) with lingering closes.

    gunicorn -k graceful_close.gunicorn.GeventWorker app:app

Stock -k gevent reads a Content-Length body it was not asked to read before the next
request, so an early 413 arrives whole; but a connection that ends (Connection: close,
a keep-alive timeout, an error) is closed with a plain close(). Requests pipelined
behind a Connection: close response are then unread and the kernel answers them with
RST, which cuts the response (a 2 MB response arrives as ~128 KB, then RST).

Here that close hands the socket to the worker hub's drain engine: shutdown(SHUT_WR)
(FIN after the response), read and discard until the client's EOF or a deadline, then
close; RST only on a deadline and only when the client acknowledged everything
(engines.sockets.close_for). Decisions come from the sans-io core (LingerState), like the
other drain engines. No thread and no greenlet per connection: a libev read watcher each,
and one sweeper greenlet for the deadlines.
"""

from __future__ import annotations

import math
import socket
import sys
import time
from collections import OrderedDict
from typing import Any

import gevent
import gevent.monkey
import gunicorn.util
from gunicorn.http import message
from gunicorn.workers import ggevent

from .. import metrics
from ..core.counters import PROCESS_COUNTERS, Counters
from ..core.keepalive import KeepAlivePolicy
from ..core.linger import Ending, LingerState, bytes_at_stake
from ..engines.sockets import close_for, half_close, unacked_bytes, unread_bytes
from ..settings import Settings, SettingsError, current_settings

__all__ = ["GeventDrainEngine", "GeventWorker"]

READ_SIZE = 65536
READS_PER_WAKE = 4       # a client flooding us cannot hold the hub for longer than this
SWEEP_INTERVAL = 0.1     # deadlines are coarse, like nginx's: at most 10 sweeps a second
_READ = 1                # libev EV_READ
# gevent's monkey patching replaces socket.socket; the engine wants the plain one.
_PlainSocket: type[socket.socket] = gevent.monkey.get_original("socket", "socket")
# gunicorn's arbiter kills a worker at graceful_timeout: keep this much for the exit itself.
STOP_MARGIN = 1.0


# ---- _compat: every reach into gunicorn's gevent worker internals (gunicorn 27) ----------
# Kept here, apart from graceful_close/gunicorn/_compat.py, and checked by check_compat() in
# the master at start-up. What it depends on:
#   1. AsyncWorker.handle() ends every connection with util.close(client), looked up on the
#      gunicorn.util module at call time (GeventWorker rebinds it in its worker process).
#   2. gevent's StreamServer closes the client socket object once the handler returns, so the
#      engine takes the descriptor out of it (socket.detach()).
#   3. gunicorn's Request numbers the requests of a connection (req_number) and keeps the
#      connection's unreader (req.unreader), where the policy keeps per-connection limits.
def check_compat() -> str | None:
    """None when gunicorn still routes what GeventWorker needs; else what changed, in one line."""
    version = f"gunicorn {gunicorn.__version__}"
    handle = getattr(getattr(ggevent.AsyncWorker, "handle", None), "__code__", None)
    if not callable(getattr(gunicorn.util, "close", None)) or handle is None or (
            "close" not in handle.co_names):
        return f"{version}: AsyncWorker.handle no longer ends connections with util.close"
    init = getattr(message.Request.__init__, "__code__", None)
    if init is None or not {"req_number", "unreader"} <= set(init.co_names) | set(init.co_varnames):
        return f"{version}: http.message.Request no longer has req_number and unreader"
    return None
# ---- end of _compat -----------------------------------------------------------------


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

    def stop(self, grace: float) -> None:
        """The worker is stopping. What has nothing at stake (the client has read our FIN
        and sent nothing unread) ends now, as stock closes it; the rest runs up to
        `grace` seconds, then ends (RST only when all was acknowledged)."""
        for conn in list(self._lingering):
            if not _at_stake(conn.sock, fin_sent=True):
                self._end(conn, conn.state.on_shutdown())
        deadline = time.monotonic() + grace
        while self._lingering and time.monotonic() < deadline:
            gevent.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        for conn in list(self._lingering):
            self._end(conn, conn.state.on_shutdown())


def _at_stake(sock: socket.socket, fin_sent: bool) -> bool:
    """Could closing this socket now lose a byte (core.linger.bytes_at_stake)?"""
    fd = sock.fileno()
    return fd < 0 or bytes_at_stake(unread_bytes(fd), unacked_bytes(fd), fin_sent)


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker; every client close lingers in the hub, and the request
    cap, the connection age cap and the User-Agent rules decide keep-alive.

    Per keep-alive request that costs two comparisons: gunicorn numbers a connection's
    requests (req.req_number), and the heartbeat refreshes a coarse clock once a second.
    The policy runs on a connection's first request and when a cap is due; what it needs
    per connection lives on the connection's unreader (gevent sockets take no attributes).
    """

    graceful_settings: Settings
    drain_engine: GeventDrainEngine
    keepalive_policy: KeepAlivePolicy
    clock = 0.0  # time.monotonic() at the last heartbeat
    _quick_exit = False
    _term_at: float | None = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Runs in the master at start-up: refuse to start, in one line, when we route nothing."""
        problem = check_compat()
        if problem is not None:
            print(f"graceful-close: GeventWorker cannot run on {problem}", file=sys.stderr, flush=True)
            raise SystemExit(1)
        try:
            log.info(current_settings().describe())
        except SettingsError as exc:
            print(exc, file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def init_process(self) -> None:
        from . import _log_to_gunicorn

        self.graceful_settings = current_settings()
        self.drain_engine = GeventDrainEngine(self.graceful_settings)
        self.keepalive_policy = KeepAlivePolicy(self.graceful_settings)
        self.clock = time.monotonic()
        # Rebinding in the forked worker process, which runs only this worker class: the one
        # caller of util.close there is AsyncWorker.handle()'s end of a connection.
        gunicorn.util.close = self._close_client
        _log_to_gunicorn(self.log)
        metrics.maybe_start_for_worker()
        super().init_process()

    def _close_client(self, sock: socket.socket) -> None:
        if not self.alive and not _at_stake(sock, fin_sent=False):
            # Stopping or restarting, and nothing is at stake: do not make the stop wait
            # for this connection (a plain close still sends FIN).
            try:
                sock.close()
            except OSError:
                pass
            return
        self.drain_engine.hand_off(sock)

    def notify(self) -> None:
        self.clock = time.monotonic()
        super().notify()

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        number = req.req_number
        if number == 1:
            req.unreader.gc_accepted = time.monotonic()
            if self._policy_closes(req):
                req.must_close = True  # gunicorn then answers "Connection: close"
        elif number >= req.unreader.gc_check_at or self.clock >= req.unreader.gc_expires:
            if self._policy_closes(req):
                req.must_close = True
        return super().handle_request(listener_name, req, sock, addr)

    def _policy_closes(self, req: Any) -> bool:
        """The full policy for this request; notes when the connection must be asked next."""
        if req.should_close():
            return False  # closing anyway: nothing to decide
        policy, unreader, number = self.keepalive_policy, req.unreader, req.req_number
        user_agent = next((value for name, value in req.headers if name == "USER-AGENT"), None)
        decision = policy.decide(number, unreader.gc_accepted, time.monotonic(), user_agent,
                                 req.method)
        if not decision.keep_alive:
            return True
        rules = policy.user_agents
        if user_agent and rules.active and rules.verdict(user_agent)[1]:
            unreader.gc_check_at = number + 1  # a rule that depends on each request's method
        elif decision.remaining_requests is not None:
            unreader.gc_check_at = number + decision.remaining_requests
        else:
            unreader.gc_check_at = sys.maxsize
        unreader.gc_expires = (unreader.gc_accepted + policy.max_age if policy.max_age
                               else math.inf)
        return False

    def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM
        if self._term_at is None:
            self._term_at = time.monotonic()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig: int, frame: Any) -> None:  # SIGINT, SIGQUIT
        self._quick_exit = True  # run()'s finally ends what lingers at once
        super().handle_quit(sig, frame)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.drain_engine.stop(self._stop_grace())
            metrics.flush_at_worker_exit()

    def _stop_grace(self) -> float:
        if self._quick_exit:
            return 0.0
        linger_time = self.graceful_settings.linger_time
        if self._term_at is not None:
            left = self.cfg.graceful_timeout - (time.monotonic() - self._term_at) - STOP_MARGIN
            return max(0.0, min(linger_time, left))
        return min(linger_time, self.graceful_settings.linger_timeout)
