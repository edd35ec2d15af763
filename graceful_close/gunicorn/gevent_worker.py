"""gunicorn's gevent worker (-k gevent) with lingering closes.

    gunicorn -k graceful_close.gunicorn.GeventWorker app:app

Stock -k gevent reads a Content-Length body it was not asked to read before the next
request, so an early 413 arrives whole; but a connection that ends (Connection: close,
a keep-alive timeout, an error) is closed with a plain close(). Requests pipelined
behind a Connection: close response are then unread and the kernel answers them with
RST, which cuts the response (a 2 MB response arrives as ~128 KB, then RST).

Here that close hands the socket to the worker hub's drain engine
(graceful_close.engines.gevent), which closes it lingering; the request cap, the
connection age cap and the User-Agent rules decide keep-alive.
"""

from __future__ import annotations

import math
import socket
import sys
import time
import weakref
from typing import Any

import gevent
import gunicorn.util
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers import ggevent

from .. import metrics
from ..core.closing import AUTO, closes_at_once, headers_say_close
from ..core.descriptors import DescriptorBudget
from ..core.keepalive import KeepAlivePolicy, keep_alive_value
from ..engines.gevent import GeventDrainEngine, at_stake
from ..engines.sockets import descriptor_budget, unacked_bytes, unread_bytes
from ..settings import Settings, announce, current_settings
from ._compat import check_gevent_worker, request_whole, route_responses
from .workers import start_stop_delay

__all__ = ["GeventWorker"]

# gunicorn's arbiter kills a worker at graceful_timeout: keep this much for the exit itself.
STOP_MARGIN = 1.0


class _KeepAliveHeaderResponse(gunicorn_wsgi.Response):
    """With keepalive_header=true: a response that keeps the connection says for how long and
    for how many more requests (issue 17 item 5). Installed only with the setting."""

    idle_timeout = 0.0  # gunicorn's --keep-alive
    cap = 0  # keepalive_requests; 0: no cap

    def default_headers(self) -> list[str]:
        headers: list[str] = super().default_headers()
        if not self.upgrade and not self.should_close():
            remaining = self.cap - self.req.req_number if self.cap else None
            headers.append(f"Keep-Alive: {keep_alive_value(self.idle_timeout, remaining)}\r\n")
        return headers


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
    # Issue 20: RLIMIT_NOFILE against what was open when serving began, and the
    # connections whose handler runs (each holds a descriptor).
    descriptor_budget: DescriptorBudget | None = None
    _gc_connections = 0
    # lingering_close=auto (core.closing): sockets whose client ended the connection itself
    # with its request whole, marked by handle_request, closed at once by _close_client.
    _at_once = False
    _client_closed: weakref.WeakSet[Any] = weakref.WeakSet()

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Runs in the master at start-up: refuse to start, in one line, when we route nothing."""
        problem = check_gevent_worker()
        if problem is not None:
            raise SystemExit(f"graceful-close: GeventWorker cannot run on {problem}")
        announce(f"gunicorn -k {cfg.worker_class_str}", log.info)

    def init_process(self) -> None:
        from . import _log_to_gunicorn

        self.graceful_settings = current_settings()
        self._at_once = self.graceful_settings.lingering_close == AUTO
        self.drain_engine = GeventDrainEngine(self.graceful_settings)
        self.keepalive_policy = KeepAlivePolicy(self.graceful_settings)
        self.clock = time.monotonic()
        # Rebinding in the forked worker process, which runs only this worker class: the one
        # caller of util.close there is AsyncWorker.handle()'s end of a connection.
        gunicorn.util.close = self._close_client
        if self.graceful_settings.keepalive_header:
            _KeepAliveHeaderResponse.idle_timeout = self.cfg.keepalive
            _KeepAliveHeaderResponse.cap = self.graceful_settings.keepalive_requests
            route_responses(_KeepAliveHeaderResponse)  # what wsgi.create builds (_compat, reach 3)
        _log_to_gunicorn(self.log)
        metrics.maybe_start_for_worker()
        super().init_process()

    def _close_client(self, sock: socket.socket) -> None:
        if self._client_closed and sock in self._client_closed:
            # lingering_close=auto: the client ended the connection itself, its request
            # whole; with nothing unread no byte can meet an RST: close as stock does.
            self._client_closed.discard(sock)
            fd = sock.fileno()
            if fd >= 0 and closes_at_once(AUTO, True, True, unread_bytes(fd), unacked_bytes(fd)):
                sock.close()
                return
        if not self.alive and not at_stake(sock, fin_sent=False):
            # Stopping or restarting, and nothing is at stake: do not make the stop wait
            # for this connection (a plain close still sends FIN).
            try:
                sock.close()
            except OSError:
                pass
            return
        self._keep_room()
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
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except StopIteration:  # gunicorn's way of saying this response ends the connection
            if self._at_once and headers_say_close(req.headers) and request_whole(req):
                self._client_closed.add(sock)
            raise

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

    _delaying = False

    def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM
        if self._term_at is None:
            self._term_at = time.monotonic()
            if start_stop_delay(self, lambda: self._stop_now(sig, frame), later=gevent.spawn_later):
                return
        elif self._delaying:
            return  # the stop begins when stop_delay has passed
        self._stop_now(sig, frame)

    def _stop_now(self, sig: int, frame: Any) -> None:
        self._delaying = False
        super().handle_exit(sig, frame)

    def handle_quit(self, sig: int, frame: Any) -> None:  # SIGINT, SIGQUIT
        self._quick_exit = True  # run()'s finally ends what lingers at once
        super().handle_quit(sig, frame)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self._gc_connections += 1
        try:
            self._keep_room()
            super().handle(listener, client, addr)
        finally:
            self._gc_connections -= 1

    def _keep_room(self) -> None:
        """Once per accepted connection and once per hand-off, never per request: near
        RLIMIT_NOFILE (core.descriptors), end the least recently active lingering
        connections, so that the next accept() finds a descriptor. (The gevent worker
        cannot tell an idle keep-alive connection from a busy one without a cost per
        request: those wait for gunicorn's keep-alive timeout, then linger.)"""
        budget = self.descriptor_budget
        if budget is not None:
            wanted = budget.to_free(self._gc_connections + self.drain_engine.lingering)
            if wanted:
                self.drain_engine.evict(wanted)

    def run(self) -> None:
        self.descriptor_budget = descriptor_budget()
        try:
            super().run()
        finally:
            self.drain_engine.stop(self._stop_grace())
            metrics.flush_at_worker_exit()

    def _stop_grace(self) -> float:
        """How long from now lingering sockets may still run, at most, once the worker loop
        has ended (the stop rule of core.linger ends most of them much sooner)."""
        if self._quick_exit:
            return 0.0
        now = time.monotonic()
        if self._term_at is None:  # max_requests restart or lost parent: the stop begins now
            self._term_at = now
        return max(0.0, self.cfg.graceful_timeout - (now - self._term_at) - STOP_MARGIN)
