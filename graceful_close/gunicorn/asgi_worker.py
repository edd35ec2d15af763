"""gunicorn's native ASGI worker (-k asgi) with lingering closes and the keep-alive policy.

    gunicorn -k graceful_close.gunicorn.ASGIWorker app:app

Stock gasgi ends a connection with write_eof() and close() at once: a client whose
request body or pipelined requests are still unread gets RST, which can destroy the
response it has not read yet (an early 413 to an 8 MB upload is cut at ~128 KB).
Here every close of an HTTP/1.x or HTTP/2 connection goes to the asyncio drain
engine (graceful_close.engines.aio), and every HTTP/1.x response is subject to the
request cap, the connection age cap and the User-Agent rules.

Per keep-alive request this costs two comparisons: gunicorn already counts the
connection's requests (req_count) and the worker's heartbeat refreshes a coarse
clock once a second. The policy itself runs on a connection's first request (the
User-Agent rule) and when a cap is due.
"""

from __future__ import annotations

import asyncio
import math
import sys
from typing import Any

from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi

from .. import metrics
from ..core.closing import AUTO, closes_at_once, headers_say_close
from ..core.counters import PROCESS_COUNTERS
from ..core.keepalive import KeepAlivePolicy, keep_alive_value
from ..core.stopping import StopDrain, drain_window
from ..engines.aio import (
    SHUTDOWN_FORCE_GRACE,
    AsyncioDrainEngine,
    DescriptorReclaimer,
    drain_engine,
    fileno,
    nothing_at_stake,
)
from ..engines.sockets import descriptor_budget, unacked_bytes, unread_bytes
from ..settings import Settings, announce, current_settings
from ._compat import check_asgi_worker, share_asgi_parser_cache

__all__ = ["ASGIWorker"]

# Issue 16: once the drain ends the worker stops accepting, and a connection accepted just
# before gets this long for its first request to arrive before idle ones are closed.
ACCEPTED_GRACE = 0.05


class LingeringASGIProtocol(ASGIProtocol):
    """gasgi's protocol whose closes linger and whose responses follow the keep-alive policy."""

    worker: ASGIWorker
    transport: Any
    req_count: int
    _closed: bool
    # The request number at which the policy must decide (1: the User-Agent rule of the
    # first request), and the worker clock at which the age cap ends the connection.
    _gc_check_at = 1
    _gc_expires = math.inf
    _gc_accepted = 0.0
    # The policy's answer for request number _gc_decided (gasgi may ask twice per request).
    _gc_decided = 0
    _gc_close = False
    _gc_reuse = False  # closed as a reusable connection: plainly, without lingering
    _gc_refused = False  # gasgi answered an error of its own (400, 413, 431, ...): it lingers
    _current_request: Any
    _body_receiver: Any
    _callback_parser: Any
    _keepalive_handle: Any
    _request_ready: Any
    _awaiting_request: bool
    _keepalive: float

    def connection_made(self, transport: Any) -> None:
        worker = self.worker
        policy = worker.keepalive_policy
        self._gc_accepted = worker.loop.time()
        if policy.max_age:
            self._gc_expires = worker.clock + policy.max_age
        super().connection_made(transport)
        worker.open_protocols.add(self)
        if worker.reclaimer is not None:  # once per connection: near RLIMIT_NOFILE, free some
            worker.reclaimer.check(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.open_protocols.discard(self)
        super().connection_lost(exc)

    def _gc_close_if_idle(self) -> bool:
        """Short of descriptors: close at once if idle between requests (gasgi's keep-alive
        timer runs) with nothing at stake, as nginx drops its reusable connections first."""
        transport = self.transport
        if self._closed or self._keepalive_handle is None or transport is None or (
                not nothing_at_stake(transport)):
            return False
        self._gc_reuse = True
        self._keepalive_timeout()  # gasgi's own end of an idle connection, made early
        return True

    def _will_close(self, request: Any, response_requires_close: bool) -> bool:
        # The hot path: two comparisons; the policy runs only when something is due.
        if self.req_count >= self._gc_check_at or self.worker.clock >= self._gc_expires:
            if self._gc_policy_closes(request):
                return True
        worker = self.worker
        # One comparison: gc_max_requests is 0 once the worker drains (ASGIWorker.begin_drain).
        if worker.nr + 1 >= worker.gc_max_requests:
            if worker.drain is not None:  # the worker stops: answer, and end the connection
                if not (response_requires_close or request.should_close()):
                    PROCESS_COUNTERS.count("drain_answered_close")
            else:
                # This response trips --max-requests (gasgi's own check is switched off: see
                # ASGIWorker.init_process): it says Connection: close and the drain begins.
                worker.begin_drain("max_requests")
            return True
        return ASGIProtocol._will_close(self, request, response_requires_close)

    # ---- the stop's drain (issue 16, core.stopping) ----------------------------------

    def _gc_idle(self) -> bool:
        """Waiting for its next request with nothing of it received or arriving (gasgi's
        connection loop; unread bytes are a request on its way: it is served instead)."""
        transport = self.transport
        return (not self._closed and self._awaiting_request and not self._request_ready.is_set()
                and transport is not None and nothing_at_stake(transport))

    def _gc_last_used(self) -> float:
        """When its last response completed (gasgi armed the keep-alive timer then), or
        when it was accepted."""
        handle = self._keepalive_handle
        if handle is not None:
            return float(handle.when()) - self._keepalive
        return self._gc_accepted

    def _gc_close_idle_now(self) -> None:
        """Close this idle connection: plainly when nothing is at stake, else lingering."""
        transport = self.transport
        if transport is not None and nothing_at_stake(transport):
            self._gc_reuse = True  # a plain close
        self._keepalive_timeout()  # gasgi's own end of an idle connection, made early

    def _gc_policy_closes(self, request: Any) -> bool:
        count = self.req_count
        if self._gc_decided == count:
            return self._gc_close
        if request.should_close():
            return False  # closing anyway: nothing to decide, nothing to count
        worker = self.worker
        policy = worker.keepalive_policy
        user_agent = None
        for name, value in getattr(request, "headers_bytes", None) or ():
            if name == b"user-agent":
                user_agent = value
                break
        decision = policy.decide(count, self._gc_accepted, worker.loop.time(), user_agent,
                                 request.method)
        self._gc_decided, self._gc_close = count, not decision.keep_alive
        if decision.keep_alive:
            rules = policy.user_agents
            if user_agent and rules.active and rules.verdict(user_agent)[1]:
                # a rule that depends on each request's method (msie6: POST)
                self._gc_check_at = count + 1
            elif decision.remaining_requests is not None:
                self._gc_check_at = count + decision.remaining_requests
            else:
                self._gc_check_at = sys.maxsize
            if worker.clock >= self._gc_expires:  # due by the coarse clock, not yet by the exact one
                self._gc_expires = worker.clock + 1.0
        return self._gc_close

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        self._closed = True
        if transport.is_closing():
            return  # the peer is gone already; connection_lost() follows from the transport
        if self._gc_reuse or (not self.worker.alive and nothing_at_stake(transport)) or (
                self.worker.at_once and self._gc_client_ended(transport)):
            # Stopping or restarting, and no byte is at stake: close at once, as nginx
            # closes idle keep-alive connections on a stop (a plain close sends FIN).
            transport.close()
            return
        if self.worker.reclaimer is not None:  # once per hand-off
            self.worker.reclaimer.check(self)
        self.worker.drain_engine.hand_off(transport)
        # The transport reports to the drain engine from now on: do gasgi's own bookkeeping
        # (nr_conns, timers, disconnect to the app) as its connection_lost would, on the next
        # loop turn, when the connection task that usually called us has finished.
        self.worker.loop.call_soon(self.connection_lost, None)


    def _gc_client_ended(self, transport: Any) -> bool:
        """lingering_close=auto (core.closing): the client ended the connection itself with
        an explicit Connection: close on its last request, received whole (gasgi's body
        receiver complete), nothing fed after it held by the parser, nothing unread in the
        socket: no byte can meet an RST, so the close need not linger. Only on a close."""
        request, receiver, parser = self._current_request, self._body_receiver, self._callback_parser
        if request is None or receiver is None or parser is None or self._gc_refused:
            return False
        if not receiver._complete or not headers_say_close(request.headers_bytes):
            return False
        remaining = getattr(parser, "remaining", None)
        if remaining is None or remaining() or getattr(parser, "remaining_truncated", False):
            return False
        fd = fileno(transport)
        if fd is None or transport.get_write_buffer_size():
            return False
        return closes_at_once(AUTO, True, True, unread_bytes(fd), unacked_bytes(fd))

    def _send_error_response(self, *args: Any, **kwargs: Any) -> None:
        self._gc_refused = True  # the server ends this connection: it lingers
        super()._send_error_response(*args, **kwargs)


class KeepAliveHeaderASGIProtocol(LingeringASGIProtocol):
    """With keepalive_header=true: a response that keeps the connection says for how long and
    for how many more requests (issue 17 item 5). A class of its own, so that without the
    setting no response pays for the check."""

    def _send_response_start(self, status: Any, headers: Any, request: Any, close: bool = False) -> None:
        # gasgi calls this once per HTTP/1.x response with the close decision it announces
        # (_will_close, our policy included): the same place stock adds "Connection: close".
        if not close and not headers_say_close(headers):
            cap = self.worker.keepalive_policy.max_requests
            remaining = cap - self.req_count if cap else None
            value = keep_alive_value(self._keepalive, remaining).encode("latin-1")
            headers = [*headers, (b"keep-alive", value)]
        super()._send_response_start(status, headers, request, close)


class ASGIWorker(gasgi.ASGIWorker):
    """gunicorn's asgi worker whose every close lingers, with the keep-alive policy.

    SIGTERM and --max-requests (issue 16): first the drain (begin_drain, core.stopping),
    the worker still alive and accepting: every response says Connection: close, idle
    connections used within drain_window stay open for their next request, the others close
    at once. Stock gasgi instead ends its connection loop as soon as the worker is not alive,
    even right after a response that promised keep-alive, and waits for idle connections
    until graceful_timeout. Then gasgi's graceful stop, and what still lingers gets the rest
    of graceful_timeout (at most linger_time); a connection with nothing at stake
    (aio.nothing_at_stake) is closed at once instead of lingering. stop_delay: SIGTERM first
    keeps serving normally that long. SIGINT/SIGQUIT: lingering connections end at once.
    """

    graceful_settings: Settings
    keepalive_policy: KeepAlivePolicy
    drain_engine: AsyncioDrainEngine
    loop: asyncio.AbstractEventLoop
    # A coarse clock (loop.time() at the last heartbeat) for the per-request age check.
    clock = 0.0
    at_once = False  # lingering_close=auto (issue 18, core.closing)
    _term_at: float | None = None
    # Issue 20: keeps connections within RLIMIT_NOFILE (None when it is unknown), and the
    # open connections (gasgi only counts them) whose idle ones a shortage may close.
    reclaimer: DescriptorReclaimer | None = None
    open_protocols: set[LingeringASGIProtocol]
    # Issue 16: the stop's drain (None until a graceful stop begins); gunicorn's max_requests
    # for this worker, which our protocol checks instead of gasgi's connection loop.
    alive: bool
    servers: list[Any]
    drain: StopDrain | None = None
    gc_max_requests: int = sys.maxsize
    _gc_held: set[LingeringASGIProtocol]
    _gc_open_at_stop: set[LingeringASGIProtocol]
    _gc_main_task: asyncio.Task[Any] | None = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Runs in the master at start-up: refuse to start, in one line, when we route nothing."""
        problem = check_asgi_worker()
        if problem is not None:
            raise SystemExit(f"graceful-close: ASGIWorker cannot run on {problem}")
        announce(f"gunicorn -k {cfg.worker_class_str}", log.info)
        super().check_config(cfg, log)

    def init_process(self) -> None:
        from . import _log_to_gunicorn

        self.graceful_settings = current_settings()
        self.at_once = self.graceful_settings.lingering_close == AUTO
        self.keepalive_policy = KeepAlivePolicy(self.graceful_settings)
        # The smallest override of _serve(): its protocol factory looks up the module global
        # gasgi.ASGIProtocol per connection, so rebinding it in this worker process (which
        # runs only this worker class) gives every connection our protocol without copying
        # _serve()'s 80 lines of lifespan, listener and heartbeat code.
        protocol = (KeepAliveHeaderASGIProtocol if self.graceful_settings.keepalive_header
                    else LingeringASGIProtocol)
        gasgi.ASGIProtocol = protocol
        # gunicorn_h1c (--http-parser fast/auto): the same parser as stock (_compat, reach 6).
        # Checked in the master already; a worker forked from it inherits the filled cache.
        problem = share_asgi_parser_cache(protocol)
        if problem is not None:  # pragma: no cover - refused by check_config in the master
            raise SystemExit(f"graceful-close: ASGIWorker cannot run on gunicorn: {problem}")
        _log_to_gunicorn(self.log)
        metrics.maybe_start_for_worker()
        # Issue 16: gasgi ends its connection loop as soon as the worker is not alive, even
        # right after a response that promised keep-alive, under a pool that may be sending
        # its next request on it. Our protocol counts max_requests instead (_will_close),
        # and a stop drains first (begin_drain), with the worker still alive.
        self.gc_max_requests = int(getattr(self, "max_requests"))  # noqa: B009 - untyped in gunicorn
        setattr(self, "max_requests", sys.maxsize)  # noqa: B010
        super().init_process()  # sets up the loop, then runs the worker; returns at exit

    def run(self) -> None:
        self.drain_engine = drain_engine(self.loop)
        self.clock = self.loop.time()
        self.open_protocols = set()
        budget = descriptor_budget()
        if budget is not None:
            self.reclaimer = DescriptorReclaimer(
                self.drain_engine, budget, held=lambda: self.nr_conns + self.drain_engine.lingering,
                close_idle=self._close_idle)
        try:
            super().run()
        finally:
            metrics.flush_at_worker_exit()

    def notify(self) -> None:
        self.clock = self.loop.time()
        if self._gc_main_task is None:  # gasgi's main loop calls notify() once a second
            self._gc_main_task = asyncio.current_task()
        super().notify()

    def _close_idle(self, wanted: int, asking: Any) -> int:
        """Up to `wanted` idle keep-alive connections with nothing at stake, closed at once
        (the DescriptorReclaimer's first resort); how many."""
        closed = 0
        for protocol in list(self.open_protocols):
            if closed >= wanted:
                break
            if protocol is not asking and protocol._gc_close_if_idle():
                closed += 1
        return closed

    def handle_exit_signal(self) -> None:  # SIGTERM
        if self._term_at is None:
            self._term_at = self.loop.time()
            delay = min(self.graceful_settings.stop_delay, self.cfg.graceful_timeout / 2)
            if delay > 0:  # keep serving normally first (stop_delay)
                self.log.info("graceful-close: SIGTERM; serving %gs more before the stop "
                              "(stop_delay)", delay)
                self.loop.call_later(delay, self.begin_drain, "SIGTERM")
                return
        self.begin_drain("SIGTERM")

    def begin_drain(self, why: str) -> None:
        """A graceful stop begins, the worker still alive and listening: responses say
        Connection: close from now on; idle connections used within the drain window stay
        open for it, the others close now (core.stopping); when the window ends, or no
        connection is left, gasgi's own stop runs."""
        if self.drain is not None or not self.alive:
            return
        if why == "max_requests":
            self.log.info("Autorestarting worker after current request.")
        now = self.loop.time()
        if self._term_at is None:
            self._term_at = now
        left = self.cfg.graceful_timeout - (now - self._term_at) - 1.0
        drain = self.drain = StopDrain(drain_window(self.graceful_settings, left), now)
        if why != "max_requests":
            # Accepting during the drain only helps a worker that recycles itself while the
            # master holds the listening socket. On SIGTERM the server may be going away (the
            # master closes its copy first): connections still in the backlog when our copy
            # closes would be reset. Stop accepting now, as stock does; others are refused.
            for server in self.servers:
                server.close()
        self.gc_max_requests = 0  # every response from now on: _will_close's slow path
        self._gc_held = set()
        self._gc_open_at_stop = set(self.open_protocols)
        for protocol in list(self.open_protocols):
            if not protocol._gc_idle():
                continue  # busy: its response says Connection: close
            if drain.keeps_open(protocol._gc_last_used(), now):
                self._gc_held.add(protocol)
            else:
                PROCESS_COUNTERS.count("drain_idle_closed")
                protocol._gc_close_idle_now()
        self._drain_tick()

    def _drain_tick(self) -> None:
        drain = self.drain
        assert drain is not None
        if not self.alive:
            return  # a quick stop or a lost parent took over
        now = self.loop.time()
        # Until every connection open at the stop has been answered and closed, or the window
        # ends; those accepted meanwhile are answered once each, with Connection: close.
        if drain.over(now) or not self._gc_open_at_stop & self.open_protocols:
            self._end_drain()
        else:
            self.loop.call_later(min(0.05, max(0.0, drain.ends - now)), self._drain_tick)

    def _end_drain(self) -> None:
        """The window ended (or nothing is left): stop accepting; a connection accepted just
        before gets a moment for its request to arrive; then gasgi's stop runs."""
        for server in self.servers:
            server.close()
        self.loop.call_later(ACCEPTED_GRACE, self._stop_after_drain)

    def _stop_after_drain(self) -> None:
        if not self.alive:
            return
        for protocol in list(self.open_protocols):
            if protocol._gc_idle():
                if protocol in self._gc_held:
                    PROCESS_COUNTERS.count("drain_window_closed")
                protocol._gc_close_idle_now()
        self.alive = False
        task = self._gc_main_task
        if task is not None and not task.done():
            task.cancel()  # wakes gasgi's main loop from its 1 s sleep: its stop begins now

    async def _shutdown(self) -> None:
        await super()._shutdown()
        engine = self.drain_engine
        grace = self._stop_grace()
        engine.begin_stop(grace)
        # The loop closes when this returns: let what lingers end first (the stop rule ends
        # most at once, the rest by stop_linger, every one by `grace`; stuck closes are
        # aborted a little later).
        deadline = self.loop.time() + grace + SHUTDOWN_FORCE_GRACE
        while engine.lingering and self.loop.time() < deadline:
            if self._quick_shutdown:
                engine.begin_stop(0.0)
            self.notify()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)  # closes requested by the engine's last sweep go out

    def _stop_grace(self) -> float:
        """How long from now lingering connections may still run, at most, once gasgi's stop
        is done (the stop rule of core.linger ends most of them much sooner)."""
        if self._quick_shutdown:
            return 0.0
        now = self.loop.time()
        if self._term_at is None:  # max_requests restart or lost parent: the stop begins now
            self._term_at = now
        # gunicorn's arbiter kills the worker at graceful_timeout: keep a second for the exit.
        return max(0.0, self.cfg.graceful_timeout - (now - self._term_at) - 1.0)
