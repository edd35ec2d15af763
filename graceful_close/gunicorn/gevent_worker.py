"""gunicorn's gevent worker (-k gevent) with lingering closes.

    gunicorn -k graceful_close.gunicorn.GeventWorker app:app

Stock -k gevent reads a Content-Length body it was not asked to read before the next
request, so an early 413 arrives whole; but a connection that ends (Connection: close,
a keep-alive timeout, an error) is closed with a plain close(). Requests pipelined
behind a Connection: close response are then unread and the kernel answers them with
RST, which cuts the response (a 2 MB response arrives as ~128 KB, then RST).

Here that close hands the socket to a greenlet of the worker's own hub: shutdown(SHUT_WR)
(FIN after the response), read and discard until the client's EOF or a deadline, then
close; RST only on a deadline and only when the client acknowledged everything
(engines.sockets.close_for). Decisions come from the sans-io core (LingerState), like the
other drain engines. No thread: a lingering connection costs one greenlet.
"""

from __future__ import annotations

import math
import socket
import sys
import time
from collections import OrderedDict
from typing import Any

import gevent
import gevent.socket
import gunicorn.util
from gunicorn.workers import ggevent

from .. import metrics
from ..core.counters import PROCESS_COUNTERS, Counters
from ..core.keepalive import KeepAlivePolicy
from ..core.linger import Ending, LingerState, bytes_at_stake
from ..engines.sockets import close_for, half_close, unacked_bytes, unread_bytes
from ..settings import Settings, SettingsError, current_settings

__all__ = ["GeventDrainEngine", "GeventWorker"]

READ_SIZE = 65536
# gunicorn's arbiter kills a worker at graceful_timeout: keep this much for the exit itself.
STOP_MARGIN = 1.0


class GeventDrainEngine:
    """The lingering connections of one gevent hub, a greenlet each."""

    def __init__(self, settings: Settings, counters: Counters = PROCESS_COUNTERS) -> None:
        self.settings = settings
        self.counters = counters
        self._lingering: OrderedDict[socket.socket, LingerState] = OrderedDict()  # oldest first

    @property
    def lingering(self) -> int:
        return len(self._lingering)

    def hand_off(self, sock: socket.socket) -> None:
        """Take a socket whose response is sent; it is closed lingering. Never raises."""
        if sock.fileno() < 0:
            return  # closed already (gunicorn closes after an error past the headers)
        while len(self._lingering) >= self.settings.max_lingering:
            oldest, state = next(iter(self._lingering.items()))
            self._end(oldest, state, state.on_evict())
        # gevent's server closes the client socket object as soon as the handler returns
        # (StreamServer's do_close): the lingering close continues on a new object for the
        # same descriptor, and the old one's close() becomes a no-op.
        family, kind, proto = sock.family, sock.type, sock.proto
        sock = gevent.socket.socket(family, kind, proto, fileno=sock.detach())
        state = self._lingering[sock] = LingerState(self.settings, time.monotonic())
        self.counters.started()
        gevent.spawn(self._linger, sock, state)

    def _linger(self, sock: socket.socket, state: LingerState) -> None:
        if state.ending is None and not half_close(sock):
            self._end(sock, state, state.on_error())
        while state.ending is None:  # the engine may end it meanwhile (eviction, stop)
            sock.settimeout(max(0.0, state.deadline - time.monotonic()))
            try:
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                ending = state.on_timer(time.monotonic())
            except OSError:
                ending = state.on_error()
            else:
                ending = state.on_data(len(data), time.monotonic()) if data else state.on_eof()
            self._end(sock, state, ending)

    def _end(self, sock: socket.socket, state: LingerState, ending: Ending | None) -> None:
        if ending is None:  # still lingering, or ended already
            return
        del self._lingering[sock]
        # Closing wakes the greenlet blocked in recv(), which then sees state.ending and returns.
        self.counters.record_end(ending.reason, state.discarded, close_for(sock, ending))

    def stop(self, grace: float) -> None:
        """The worker is stopping. What has nothing at stake (the client has read our FIN
        and sent nothing unread) ends now, as stock closes it; the rest runs up to
        `grace` seconds, then ends (RST only when all was acknowledged)."""
        for sock, state in list(self._lingering.items()):
            if not _at_stake(sock, fin_sent=True):
                self._end(sock, state, state.on_shutdown())
        deadline = time.monotonic() + grace
        while self._lingering and time.monotonic() < deadline:
            gevent.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        for sock, state in list(self._lingering.items()):
            self._end(sock, state, state.on_shutdown())


def _at_stake(sock: socket.socket, fin_sent: bool) -> bool:
    """Could closing this socket now lose a byte (core.linger.bytes_at_stake)?"""
    fd = sock.fileno()
    return fd < 0 or bytes_at_stake(unread_bytes(fd), unacked_bytes(fd), fin_sent)


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker; every client close lingers on a greenlet, and the request
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
        # gunicorn 27's AsyncWorker.handle() ends every connection with util.close(client),
        # looked up on the module at call time: rebinding it routes them to us.
        if not callable(getattr(gunicorn.util, "close", None)) or "close" not in (
                ggevent.AsyncWorker.handle.__code__.co_names):
            print(f"graceful-close: GeventWorker cannot run on gunicorn {gunicorn.__version__}: "
                  "AsyncWorker.handle no longer closes with util.close", flush=True)
            raise SystemExit(1)
        try:
            log.info(current_settings().describe())
        except SettingsError as exc:
            print(exc, flush=True)
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
