"""hypercorn's asyncio worker with the lingering close and the keep-alive policy.

- GracefulTCPServer (hypercorn.asyncio.run.TCPServer's replacement): where stock closes an
  HTTP/1.1 connection with write_eof() and close(), whatever the client is still sending
  (a pipelined request, an unread upload) turns the close into RST and cuts the response.
  Ours hands the transport to the drain engine of the loop (graceful_close.engines.aio) in
  one method, `_gc_hand_off`; the connection's task, protocol and streams end at once.
  HTTP/2 connections, and connections the client closed already, close as stock.
- GracefulH11Protocol: our request cap (hypercorn's own keep_alive_max_requests still
  holds), the connection age cap and the User-Agent rules of core.keepalive, and
  Connection: close on every response once the worker stops.
- worker_serve: hypercorn's, then the rest of the stop rule for what still lingers
  (`_gc_begin_stop` when hypercorn's stop begins, `_finish_lingering` after it), then the
  exit summary.

Every hypercorn name used is listed in graceful_close.hypercorn._compat.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import weakref
from typing import Any

import h11
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed
from hypercorn.logging import Logger
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H11Protocol

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
from ..settings import announce, current_settings, startup_settings
from . import _compat

ENTRY = "hypercorn -c python:graceful_close.hypercorn"
# Issue 16: how often a connection kept open for the stop's drain looks whether it is still
# idle (a request on it ends the wait: hypercorn serves it with Connection: close).
DRAIN_POLL = 0.05
CLOSE = (b"connection", b"close")
_NO_CAP = 2**62


class _Process:
    """What every connection of this worker process shares, built when the worker starts."""

    policy: KeepAlivePolicy | None = None
    keepalive_header = False
    at_once = False  # lingering_close=auto (issue 18, core.closing)
    # Issue 20: the open connections, and what keeps them within RLIMIT_NOFILE (None when
    # the limit is unknown), built at the first connection, once the listeners are open.
    connections: set[GracefulTCPServer] = set()
    reclaimer: DescriptorReclaimer | None = None
    reclaimer_loop: asyncio.AbstractEventLoop | None = None


class _Drain:
    """The stop's drain of this worker process (issue 16, core.stopping), begun when hypercorn's
    worker context is `terminated`; None before the stop."""

    current: StopDrain | None = None


def _reclaimer(loop: asyncio.AbstractEventLoop) -> DescriptorReclaimer | None:
    if _Process.reclaimer_loop is not loop:
        _Process.reclaimer_loop = loop
        budget = descriptor_budget()
        engine = drain_engine(loop)
        _Process.reclaimer = None if budget is None else DescriptorReclaimer(
            engine, budget, held=lambda: len(_Process.connections) + engine.lingering,
            close_idle=_close_idle)
    return _Process.reclaimer


def _close_idle(wanted: int, asking: Any) -> int:
    """Near RLIMIT_NOFILE: close idle keep-alive connections (between requests, hypercorn's
    keep-alive timer running) with nothing at stake, as nginx reuses its idle connections
    first; a plain close loses nothing there. How many were closed."""
    closed = 0
    for server in list(_Process.connections):
        if closed >= wanted:
            break
        if server is asking or server._gc_handed_off or not _compat.idle_timer_running(server):
            continue
        transport = server.writer.transport
        if transport.is_closing() or not nothing_at_stake(transport):
            continue
        transport.close()  # its reader sees the end, and hypercorn ends the connection
        _Process.connections.discard(server)
        closed += 1
    return closed


def _policy() -> KeepAlivePolicy:
    policy = _Process.policy
    if policy is None:
        settings = current_settings()
        _Process.keepalive_header = settings.keepalive_header
        _Process.at_once = settings.lingering_close == AUTO
        policy = _Process.policy = KeepAlivePolicy(settings)
    return policy


def refuse_other_workers(config: Config) -> None:
    """The trio worker closes through trio streams, not asyncio transports: the drain engine
    cannot take them over, so it is refused rather than served with stock closes."""
    if config.worker_class not in ("asyncio", "uvloop"):
        raise SystemExit(f"graceful-close: hypercorn's {config.worker_class} worker is not supported; "
                         "use -k asyncio or -k uvloop")


class GracefulLogger(Logger):
    """hypercorn's Logger; also what brings our module into every worker hypercorn spawns
    (the config names this class, and unpickling the config in a worker imports it), and
    where a trio worker is refused, in whichever process first logs."""

    def __init__(self, config: Config) -> None:
        refuse_other_workers(config)
        _compat.check()
        super().__init__(config)


class _Finished:
    """Stands in for the h11.Connection of a connection handed to the drain engine: its read
    loop (possibly waiting for h11 to leave PAUSED, which it never would with pipelined bytes
    buffered after a close) sees the end of the connection and returns."""

    __slots__ = ()
    our_state = their_state = h11.CLOSED
    they_are_waiting_for_100_continue = False
    trailing_data = (b"", True)

    def receive_data(self, data: bytes) -> None:
        pass

    def next_event(self) -> h11.ConnectionClosed:
        return h11.ConnectionClosed()

    def send(self, event: Any) -> bytes:
        return b""  # nothing may follow the response we linger behind

    def start_next_cycle(self) -> None:
        pass


_FINISHED = _Finished()


class GracefulH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol with the keep-alive policy. Per request it costs an
    integer increment and a compare against the loop clock; the User-Agent rule is decided on
    a connection's first request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        policy = _policy()
        now = asyncio.get_running_loop().time()
        self._gc_requests = 0
        self._gc_cap = 0 if _Process.keepalive_header else (policy.max_requests or _NO_CAP)
        self._gc_age_deadline = now + policy.max_age if policy.max_age else math.inf
        self._gc_accepted = now
        self._gc_user_agent: bytes | None = None  # set only when its rules may close
        self._gc_closing = False
        self._gc_remaining: int | None = None
        self._gc_request: h11.Request | None = None  # the last one (lingering_close=auto)
        self._gc_last_used = now  # the start of the last request, or the accept (issue 16)

    async def _create_stream(self, request: h11.Request) -> None:
        self._gc_requests = served = self._gc_requests + 1
        self._gc_request = request
        if served == 1:
            self._gc_first_request(request)
        # The clock read the age cap needs anyway, kept: when the stop's drain comes, how
        # recently the client used this connection (hypercorn keeps no time of its own).
        self._gc_last_used = now = asyncio.get_running_loop().time()
        if served >= self._gc_cap or now >= self._gc_age_deadline:
            self._gc_decide(served, request.method)
        await super()._create_stream(request)

    def _gc_first_request(self, request: h11.Request) -> None:
        """The User-Agent rule, once per connection: only a connection whose agent a rule
        matches (always, or on POST) decides on the slow path from now on."""
        rules = _policy().user_agents
        if not rules.active:
            return
        for name, value in request.headers:
            if name == b"user-agent":
                always, on_post = rules.verdict(value)
                if always or on_post:
                    self._gc_user_agent = value
                    self._gc_cap = 0  # decide every request of this connection
                return

    def _gc_decide(self, served: int, method: bytes) -> None:
        policy = _policy()
        decision = policy.decide(served, self._gc_accepted, asyncio.get_running_loop().time(),
                                 self._gc_user_agent, method)
        self._gc_closing = not decision.keep_alive
        self._gc_remaining = decision.remaining_requests

    async def stream_send(self, event: Any) -> None:
        if type(event) is Response and event.status_code >= 200:
            event = self._gc_response(event)
        await super().stream_send(event)

    def _gc_response(self, event: Response) -> Response:
        """Connection: close when the policy ends the connection or the worker stops (stock
        closes then without saying so); a Keep-Alive header when configured."""
        closing = self._gc_closing or self.context.terminated.is_set()
        if self.keep_alive_requests >= self.config.keep_alive_max_requests:
            return event  # hypercorn's own cap: it adds Connection: close itself
        headers = event.headers
        if closing:
            drain = _Drain.current
            if drain is not None and drain.window > 0 and not self._gc_closing:
                PROCESS_COUNTERS.count("drain_answered_close")  # issue 16
            if headers_say_close(headers):
                return event
            return dataclasses.replace(event, headers=[*headers, CLOSE])
        if _Process.keepalive_header and not headers_say_close(headers):
            value = keep_alive_value(self.config.keep_alive_timeout,
                                     getattr(self, "_gc_remaining", None))
            return dataclasses.replace(event, headers=[*headers, (b"keep-alive", value.encode())])
        return event

    def _gc_client_ended(self, reader: asyncio.StreamReader, transport: Any) -> bool:
        """lingering_close=auto (core.closing): the client ended this connection itself with
        an explicit Connection: close on its last request, whose body h11 received whole
        (their state MUST_CLOSE: not SEND_BODY, not ERROR), nothing held unparsed (h11's
        buffer, the stream reader's), nothing unread in the socket, and the response all
        sent and acknowledged: no byte can meet an RST, so the close need not linger. Only
        on a close. An HTTP/1.0 request without the header, a policy close (ours or
        hypercorn's with no Connection: close from the client) and an idle timeout linger."""
        request = self._gc_request
        connection = self.connection
        if request is None or self._gc_closing or connection.their_state is not h11.MUST_CLOSE:
            return False
        if not headers_say_close(request.headers) or connection.trailing_data[0] \
                or _compat.reader_buffered(reader):
            return False
        fd = fileno(transport)
        if fd is None or transport.get_write_buffer_size():
            return False
        return closes_at_once(AUTO, True, True, unread_bytes(fd), unacked_bytes(fd))

    def _gc_finished(self) -> None:
        """The drain engine owns the socket: the read loop ends (see _Finished)."""
        self.connection = _FINISHED  # type: ignore[assignment]
        _compat.wake(self.can_read)


_watched: weakref.WeakSet[Any] = weakref.WeakSet()  # worker contexts whose stop is watched
_stop_watches: set[asyncio.Task[None]] = set()  # strong references: the loop keeps weak ones


class GracefulTCPServer(TCPServer):
    """One connection of hypercorn's asyncio worker, whose HTTP/1.1 close lingers."""

    _gc_handed_off = False
    _gc_drain_wait: asyncio.Task[None] | None = None  # issue 16: kept open for the drain

    async def run(self) -> None:
        context = self.context
        if context not in _watched:  # the first connection of this worker: watch its stop
            _watched.add(context)
            _stop_watches.add(self.loop.create_task(_gc_watch_stop(self.loop, self.config, context)))
        _Process.connections.add(self)
        reclaimer = _reclaimer(self.loop)
        if reclaimer is not None:  # once per connection: near RLIMIT_NOFILE, free some
            reclaimer.check(self)
        try:
            await super().run()
        finally:
            _Process.connections.discard(self)

    async def _close(self) -> None:
        if self._gc_keep_for_drain():
            return
        if self._gc_handed_off or self._gc_hand_off():
            await self.idle_task.stop()
            return
        await super()._close()

    async def _initiate_server_close(self) -> None:
        """hypercorn closes an idle keep-alive connection: at its keep-alive timeout, and
        every idle one when the worker stops."""
        if self.context.terminated.is_set():
            await self._gc_close_idle_at_stop()
            return
        # The keep-alive timeout: a lingering close, so that a request the client sends just
        # then meets our FIN and a clean EOF, not RST.
        await self.protocol.handle(Closed())
        if not self._gc_hand_off():
            self.writer.close()

    def _gc_keep_for_drain(self) -> bool:
        """Issue 16: at the stop hypercorn closes a connection right after its response, even
        one whose headers went out before the stop began and so promised keep-alive: the
        client may send its next request at that very moment and get no answer. Such a
        connection (both sides of h11 DONE: nobody said close) is kept open for the drain
        instead, as an idle one is (_gc_close_idle_at_stop); its next request is served with
        Connection: close. Only on a close."""
        if self._gc_drain_wait is not None or not self.context.terminated.is_set():
            return False
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        if not isinstance(protocol, GracefulH11Protocol):
            return False
        connection = protocol.connection
        if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
            return False
        if self.writer.transport.is_closing() or _compat.reader_saw_eof(self.reader):
            return False
        connection.start_next_cycle()  # what hypercorn does between keep-alive requests
        self._gc_drain_wait = self.loop.create_task(self._gc_close_idle_at_stop())
        return True

    async def _gc_close_idle_at_stop(self) -> None:
        """Issue 16 (core.stopping): the stop began and this connection is idle. Used by its
        client within the drain window (its last request began, or it was accepted, less than
        the window ago), it stays open until the window ends: a request arriving on it is
        served, with Connection: close (GracefulH11Protocol._gc_response), and the connection
        then closes as any other. Unused for longer, or still idle when the window ends, it
        closes now: at once with nothing at stake (as stock closes it), else lingering.
        HTTP/2 connections close as stock."""
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        if not isinstance(protocol, GracefulH11Protocol):
            await super()._initiate_server_close()
            return
        loop = self.loop
        drain = _begin_drain(loop, self.config)
        if drain.keeps_open(protocol._gc_last_used, loop.time()):
            while not drain.over(loop.time()):
                await asyncio.sleep(min(DRAIN_POLL, max(0.0, drain.ends - loop.time())))
                if self._gc_handed_off or self.writer.transport.is_closing() \
                        or _compat.reader_saw_eof(self.reader):
                    return  # closed meanwhile: answered with Connection: close, or by the client
                if protocol.connection.their_state is not h11.IDLE:
                    return  # a request came: hypercorn serves it with Connection: close, then closes
            PROCESS_COUNTERS.count("drain_window_closed")
        elif drain.window > 0:
            PROCESS_COUNTERS.count("drain_idle_closed")
        if nothing_at_stake(self.writer.transport):
            await super()._initiate_server_close()
            return
        await self.protocol.handle(Closed())
        if not self._gc_hand_off():
            self.writer.close()

    def _gc_hand_off(self) -> bool:
        """The one hand-off: the drain engine takes the transport of an HTTP/1.1 connection
        whose client is still connected; the streams and the protocol are done with it now.
        False: close as stock (HTTP/2, the client closed or reset already, a transport
        closing already, or under lingering_close=auto a connection the client ended itself
        with nothing at stake: GracefulH11Protocol._gc_client_ended)."""
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        if not isinstance(protocol, GracefulH11Protocol):
            return False
        writer = self.writer
        transport = writer.transport
        if transport.is_closing() or _compat.reader_saw_eof(self.reader):
            return False
        if _Process.at_once and protocol._gc_client_ended(self.reader, transport):
            return False  # lingering_close=auto: close as stock does, at once
        stream_protocol = transport.get_protocol()
        self._gc_handed_off = True
        _Process.connections.discard(self)  # from now on the engine counts it
        reclaimer = _reclaimer(self.loop)
        if reclaimer is not None:  # once per hand-off: near RLIMIT_NOFILE, free some
            reclaimer.check(self)
        drain_engine(self.loop).hand_off(transport)  # type: ignore[arg-type]
        _compat.detach_writer(writer)
        stream_protocol.connection_lost(None)  # A2: EOF to the reader, drain() waiters woken
        protocol._gc_finished()
        return True


async def _gc_watch_stop(loop: asyncio.AbstractEventLoop, config: Config, context: Any) -> None:
    await context.terminated.wait()
    # The drain (issue 16) before the stop rule: hypercorn's idle-connection timers see the
    # same `terminated` and call _gc_close_idle_at_stop on the next loop turns.
    _begin_drain(loop, config)
    _gc_begin_stop(drain_engine(loop), config)


def _begin_drain(loop: asyncio.AbstractEventLoop, config: Config) -> StopDrain:
    """The stop's drain, once per stop: settings.drain_window within hypercorn's graceful_timeout."""
    drain = _Drain.current
    if drain is None:
        window = drain_window(current_settings(), float(config.graceful_timeout))
        drain = _Drain.current = StopDrain(window, loop.time())
    return drain


def _gc_begin_stop(engine: AsyncioDrainEngine, config: Config) -> None:
    """hypercorn's stop began (its worker context's `terminated`): the stop rule of
    core.linger for every lingering connection, none beyond hypercorn's graceful_timeout."""
    engine.begin_stop(float(config.graceful_timeout))


async def _finish_lingering(engine: AsyncioDrainEngine) -> None:
    """After hypercorn's own stop: wait until what lingers has ended by the stop rule (the
    engine's stop timer ends the rest at hypercorn's graceful_timeout)."""
    loop = engine.loop
    limit = getattr(engine, "_stop_limit", None)
    give_up = (limit if limit is not None else loop.time()) + SHUTDOWN_FORCE_GRACE + 0.5
    while (engine.lingering or getattr(engine, "_closing", None)) and loop.time() < give_up:
        await asyncio.sleep(0.05)


async def worker_serve(app: Any, config: Config, *, sockets: Any = None,
                       shutdown_trigger: Any = None) -> None:
    """hypercorn.asyncio.run.worker_serve, then the lingering connections' end."""
    _compat.check()
    if config.logger_class is GracefulLogger:
        # Its work (importing this module in a spawned worker, the trio check) is done: back to
        # hypercorn's own class, which hypercorn's statsd logger replaces when statsd_host is set.
        config.logger_class = Logger
    config.set_statsd_logger_class(_compat.statsd_logger_class())  # what stock does first
    _ = config.log  # hypercorn's loggers get their handlers here: the line must reach them
    # stop_delay: hypercorn's shutdown trigger comes from its parent and does not tell SIGTERM
    # from SIGINT, so no delay is applied; the start-up line says so.
    announce(f"{ENTRY} ({config.worker_class} worker)", logging.getLogger("hypercorn.error").info,
             unused=("stop_delay",))
    metrics.maybe_start_for_worker()
    _policy()
    loop = asyncio.get_running_loop()
    try:
        await _compat.STOCK_WORKER_SERVE(app, config, sockets=sockets, shutdown_trigger=shutdown_trigger)
    finally:
        engine = drain_engine(loop)
        if engine.lingering and not engine.stopping:
            _gc_begin_stop(engine, config)
        await _finish_lingering(engine)
        for task in list(_stop_watches):
            if task.get_loop() is loop:
                task.cancel()
                _stop_watches.discard(task)
        _Drain.current = None  # a later serve() in this process starts without a drain
        metrics.flush_at_worker_exit()


def install() -> None:
    """Make hypercorn's asyncio worker build our connections, in this process."""
    _compat.check()
    _compat.install(GracefulTCPServer, worker_serve, GracefulH11Protocol)
    _compat.guard_cli(_check_before_start)


def _check_before_start(config: Config) -> None:
    """In the hypercorn command's own process, before it spawns a worker: a trio worker or a
    bad setting exits there with one line and status 1. From a spawned worker only, hypercorn
    0.18's run() loses the worker's exit code and the command exits 0."""
    refuse_other_workers(config)
    startup_settings()


async def serve(app: Any, config: Config, *, shutdown_trigger: Any = None,
                mode: str | None = None) -> None:
    """hypercorn.asyncio.serve(app, config, ...) with our connections: for code that runs
    its own event loop (asyncio.run(serve(app, config)))."""
    install()
    await worker_serve(_compat.wrap_app(app, config.wsgi_max_body_size, mode), config,
                       shutdown_trigger=shutdown_trigger)


def run(config: Config) -> int:
    """hypercorn.run.run(config) with our connections, --workers N included: the workers
    hypercorn spawns import this module through the config's logger_class."""
    install()
    if config.logger_class is Logger:
        config.logger_class = GracefulLogger
    return _compat.run(config)
