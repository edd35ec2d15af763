"""The lingering close and the keep-alive policy for any asyncio protocol that closes
through its transport (uvicorn's h11, httptools and zttp protocols here).

The protocol is given a ClosingTransport: the real transport's write methods, bound
once per connection (no extra call per write), and a close() that hands the real
transport to the drain engine (graceful_close.engines.aio) and then runs the
protocol's own connection_lost(None) bookkeeping, so the protocol, its parser and
its request cycle are freed while the socket lingers.

Per request the policy costs an integer increment and a compare against the loop
clock: the User-Agent rule is decided once per connection, on its first request, and
everything else (the request cap, the age cap, a Keep-Alive header when configured)
runs only on a request that ends the connection.

A subclass says where a request starts (call _gc_on_request(cycle) once per new request
cycle), how a response says "close" (_gc_say_close) and which cycles are unanswered
when the server stops (_gc_unanswered). Every uvicorn attribute used is listed in
graceful_close.uvicorn._compat.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..core.closing import AUTO, closes_at_once, headers_say_close
from ..core.counters import PROCESS_COUNTERS
from ..core.keepalive import KeepAlivePolicy
from ..core.stopping import StopDrain
from ..engines.aio import DescriptorReclaimer, drain_engine, fileno, nothing_at_stake
from ..engines.sockets import descriptor_budget, queued_bytes
from ..settings import current_settings
from . import _compat, lifecycle

if TYPE_CHECKING:
    _Base = _compat.UvicornHTTPProtocol
else:
    _Base = object

CLOSE = (b"connection", b"close")
_NO_CAP = 2**62


class _Process:
    """What every connection of this process shares, built at its first connection
    (settings may be configured after this module is imported)."""

    policy: KeepAlivePolicy | None = None
    keepalive_header = False
    reclaimer: DescriptorReclaimer | None = None  # issue 20: None when RLIMIT_NOFILE is unknown
    at_once = False  # lingering_close=auto (issue 18, core.closing)
    user_agent_rules = False  # the policy has User-Agent rules: look at each first request
    first_cap = _NO_CAP  # _gc_cap of a new connection
    max_age = 0.0  # policy.max_age, 0: no age cap


def _start_process(first: LingeringCloseMixin) -> KeepAlivePolicy:
    """The first connection of this process: check uvicorn's protocols, build the policy."""
    found = _compat.protocol_problems()
    if found:
        raise SystemExit(_compat.refusal(found))
    settings = current_settings()
    lifecycle.first_connection(type(first))  # metrics, the start-up line if not logged yet, the stop watch
    _Process.keepalive_header = settings.keepalive_header
    _Process.at_once = settings.lingering_close == AUTO
    budget = descriptor_budget()
    if budget is not None:
        connections = first.server_state.connections
        engine = drain_engine(first.loop)
        _Process.reclaimer = DescriptorReclaimer(
            # lingering ones with a transport are in the set; detached ones are not
            engine, budget, held=lambda: len(connections) + engine.detached,
            close_idle=lambda wanted, asking: _close_idle(connections, wanted, asking))
    policy = _Process.policy = KeepAlivePolicy(settings)
    _Process.user_agent_rules = policy.user_agents.active
    _Process.first_cap = 0 if _Process.keepalive_header else (policy.max_requests or _NO_CAP)
    _Process.max_age = policy.max_age or 0.0
    return policy


class _Drain:
    """The stop's drain of this process (one uvicorn server per process; lifecycle._drain):
    the window, and the idle connections kept open for it (for the counters)."""

    current: StopDrain | None = None
    held: set[LingeringCloseMixin] = set()


# Issue 16: an idle connection with bytes arriving, or accepted less than this long ago, when
# uvicorn's shutdown closes the idle ones after a drain is looked at again this much later: a
# request is served by then, with Connection: close.
ARRIVING_GRACE = 0.1


def end_drain() -> None:
    """The server's shutdown is over (every connection gone): a later server in this process
    (uvicorn.run again, tests) starts without a drain."""
    _Drain.current = None
    _Drain.held = set()


def begin_drain(loop: asyncio.AbstractEventLoop, window: float) -> StopDrain:
    """The server's stop begins (window 0: a quick stop, no drain). A second call can only
    bring the end closer."""
    now = loop.time()
    drain = _Drain.current
    if drain is None:
        drain = _Drain.current = StopDrain(window, now)
    else:
        drain.quicken(now + window)
    return drain


def _drop(*_args: Any) -> None:
    """write() once closing: nothing may follow the response we linger behind."""


def _true() -> bool:
    return True


class ClosingTransport:
    """What the protocol sees as its transport: close() hands the connection off.

    write, writelines, is_closing and get_extra_info (uvicorn asks it four times per
    connection) are the real transport's bound methods, stored per instance, so they cost
    no extra call; the rest forward. (Not an asyncio.Transport subclass: its methods would
    shadow these instance attributes.)
    """

    __slots__ = ("_real", "_on_close", "write", "writelines", "is_closing", "get_extra_info")

    write: Callable[[bytes | bytearray | memoryview], None]
    writelines: Callable[[Iterable[bytes | bytearray | memoryview]], None]
    is_closing: Callable[[], bool]
    get_extra_info: Callable[..., Any]

    def __init__(self, real: asyncio.Transport, on_close: Callable[[], None]) -> None:
        self._real = real
        self._on_close = on_close
        self.write = real.write
        self.writelines = real.writelines
        self.is_closing = real.is_closing
        self.get_extra_info = real.get_extra_info

    def close(self) -> None:
        on_close = self._on_close
        if on_close is not _drop:
            self._on_close = _drop  # once; and no reference cycle back to the protocol
            self.write = self.writelines = _drop
            self.is_closing = _true
            on_close()

    def abort(self) -> None:
        self.close()
        self._real.abort()

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._real.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return False  # the drain engine half-closes; uvicorn's protocols never ask


def add_header_unless_app_closes(cycle: Any, extra: tuple[bytes, bytes]) -> None:
    """Add `extra` through the cycle's default headers (uvicorn writes them before the
    app's), unless the app's response says Connection: close itself (then a Keep-Alive
    header would be wrong and a second Connection header redundant).

    Only on responses that end the connection, or with keepalive_header: it wraps the
    cycle's send, which the request task looks up when it first runs. The app's headers
    are never consumed: any other iterable than a list or tuple is copied into a list
    once and handed on in a copy of the message.
    """
    plain = cycle.default_headers
    send = cycle.send

    def send_with_header(message: Any) -> Any:
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            if not isinstance(headers, (list, tuple)):
                headers = list(headers)
                message = {**message, "headers": headers}
            if not headers_say_close(headers):
                cycle.default_headers = [*plain, extra]
        return send(message)

    cycle.send = send_with_header


class LingeringCloseMixin(_Base):
    """Put it first in the bases of an asyncio protocol that closes through its transport."""

    __slots__ = ("_gc_transport", "_gc_done", "_gc_requests", "_gc_cap", "_gc_accepted",
                 "_gc_age_deadline", "_gc_user_agent", "_gc_closing", "_gc_refused", "_gc_input_after")

    _gc_transport: asyncio.Transport  # the real one; the protocol only sees its ClosingTransport
    _gc_done: bool  # handed off, closed at once, or lost: the protocol is done with the socket
    _gc_requests: int  # requests on this connection, the current one included
    _gc_cap: int  # from this request number on, decide on the slow path (0: every request)
    _gc_accepted: float  # loop.time() at connection_made
    _gc_age_deadline: float  # loop.time() from which the age cap ends the connection
    _gc_user_agent: bytes | None  # of the first request, when User-Agent rules are active
    _gc_closing: bool  # a response that ends the connection was decided
    _gc_refused: bool  # the protocol answered 400 to input it could not parse
    _gc_input_after: bool  # bytes arrived after the last request was whole (reset per request)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if _Process.policy is None:
            _start_process(self)
        real: asyncio.Transport = transport  # type: ignore[assignment]  # (cast() is a call)
        now = self.loop.time()
        self._gc_transport = real
        self._gc_done = False
        self._gc_requests = 0
        self._gc_cap = _Process.first_cap
        self._gc_accepted = now
        max_age = _Process.max_age
        self._gc_age_deadline = now + max_age if max_age else math.inf
        self._gc_user_agent = None
        self._gc_closing = False
        self._gc_refused = False
        self._gc_input_after = False
        super().connection_made(ClosingTransport(real, self._gc_hand_off))  # type: ignore[arg-type]
        if _Drain.current is not None:
            # Accepted just before the server stopped listening, after it asked its
            # connections to shut down: served once, with Connection: close.
            self._gc_cap = 0
        reclaimer = _Process.reclaimer
        # Once per connection: near RLIMIT_NOFILE, free some. Below the watermark the check
        # cannot want anything (DescriptorReclaimer.watermark), so it is not called.
        if reclaimer is not None and len(self.server_state.connections) >= reclaimer.watermark:
            reclaimer.check(self)

    # ---- short of descriptors (issue 20) -------------------------------------------

    def _gc_close_if_idle(self) -> bool:
        """Close at once if idle between requests (uvicorn's keep-alive timer runs) with
        nothing at stake: a plain close loses nothing, as nginx drops its reusable
        connections first. True when closed."""
        if self._gc_done or self.timeout_keep_alive_task is None or not nothing_at_stake(
                self._gc_transport):
            return False
        self._gc_done = True
        self._gc_transport.close()
        super().connection_lost(None)  # uvicorn's bookkeeping, as for any closed connection
        return True

    # ---- the lingering close -------------------------------------------------------

    def _gc_hand_off(self) -> None:
        """The protocol closed its transport: the engine takes the socket over, and the
        protocol does its connection-lost bookkeeping now (not when the socket closes)."""
        if self._gc_done:
            return
        if _Process.at_once and self._gc_client_ended():
            # lingering_close=auto: no byte can meet an RST; close as stock does. uvicorn's
            # bookkeeping is called directly (our connection_lost would only set _gc_done).
            self._gc_done = True
            self._gc_transport.close()
            super().connection_lost(None)
            return
        reclaimer = _Process.reclaimer
        if reclaimer is not None:  # once per hand-off: near RLIMIT_NOFILE, free some
            reclaimer.check(self)
        drain_engine(self.loop).hand_off(self._gc_transport, self.server_state.connections)
        if reclaimer is not None:  # the hand-off may have detached a socket: fewer free
            reclaimer.refresh_watermark()
        self.connection_lost(None)

    def _gc_client_ended(self) -> bool:
        """The client ended this connection itself (core.closing): its last request said
        Connection: close explicitly and was received whole, nothing of the client's is
        held unparsed, the socket's receive queue is empty and the response has left
        (transport buffer empty, all acknowledged). Only on a close."""
        cycle = self.cycle
        if cycle is None or cycle.more_body or self._gc_closing or self._gc_refused:
            return False
        if not headers_say_close(cycle.scope["headers"]) or self._gc_held_input(cycle):
            return False
        transport = self._gc_transport
        if transport.get_write_buffer_size():
            return False
        fd = fileno(transport)
        if fd is None:
            return False
        unread, unacked = queued_bytes(fd)
        return closes_at_once(AUTO, True, True, unread, unacked)

    def _gc_held_input(self, cycle: Any) -> bool:
        """Bytes received after `cycle`'s request (held unparsed or unserved, or dropped).

        Seen here: a later request begun (a new cycle) and bytes read after the request was
        whole. Bytes that came in the same read as the request's end are each protocol's
        (H11Protocol, HttpToolsProtocol); zttp shows none of them."""
        return cycle is not self.cycle or self._gc_input_after

    def send_400_response(self, msg: str) -> None:
        self._gc_refused = True  # the server ends this connection: it lingers
        super().send_400_response(msg)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gc_done:
            return
        self._gc_done = True
        super().connection_lost(exc)

    def _unset_keepalive_if_required(self) -> None:
        """uvicorn's own, replaced (same body, no extra call): every data_received() starts
        with it, so what we need to know of each read costs no frame of ours (issue 18)."""
        task = self.timeout_keep_alive_task
        if task is not None:
            task.cancel()
            self.timeout_keep_alive_task = None
        cycle = self.cycle
        if cycle is None or self._gc_done:
            return
        if not cycle.more_body:
            # Bytes after a whole request (lingering_close=auto; reset by the next request).
            self._gc_input_after = True
        elif cycle.response_complete:
            # The unread body of an early response is still arriving: uvicorn cancels the
            # keep-alive timer on every read and re-arms it only when a response completes,
            # so nothing would re-arm it and the connection would stay open forever.
            self.loop.call_soon(self._gc_rearm_if_idle)

    def _gc_rearm_if_idle(self) -> None:
        if self.timeout_keep_alive_task is None and not self._gc_done:
            cycle = self.cycle
            if cycle is not None and cycle.response_complete and self._gc_idle():
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def shutdown(self) -> None:
        drain_engine(self.loop).begin_stop(_shutdown_grace(self.config))
        if self._gc_done:
            return
        if self.cycle is None or self.timeout_keep_alive_task is not None:
            # Idle (no request yet, or nothing received since the last response); the drain,
            # if any, is over (lifecycle._drain).
            drained = _Drain.current is not None and _Drain.current.window > 0
            if drained and self.cycle is None and (
                    self.loop.time() - self._gc_accepted < ARRIVING_GRACE):
                # Accepted during the drain an instant ago: its first request is on its way.
                self._gc_cap = 0
                self.loop.call_later(ARRIVING_GRACE, self._gc_end_drain)
                return
            if nothing_at_stake(self._gc_transport):
                # Nothing unread and nothing unacknowledged: close at once, as stock and
                # nginx do; lingering protects bytes in flight and there are none.
                self._gc_count_idle_close()
                self._gc_done = True
                self._gc_transport.close()
                super().connection_lost(None)
                return
            if drained:
                # Bytes arriving: most likely a request. Served (with Connection: close)
                # rather than read and discarded by a lingering close; judged again soon.
                self._gc_cap = 0
                self.loop.call_later(ARRIVING_GRACE, self._gc_end_drain)
                return
        # Every unanswered request ends the connection and says so, the one in flight too.
        for cycle in self._gc_unanswered():
            if not cycle.response_complete:
                _close_after_response(cycle)
        super().shutdown()

    # ---- the stop's drain (issue 16, core.stopping, lifecycle._drain) ---------------

    def _gc_begin_drain(self, drain: StopDrain, now: float) -> None:
        """The server's drain begins: from now on every response here says Connection: close
        (the slow path, _gc_decide); an idle connection unused for longer than the window
        closes now, one used within it stays open for its next request."""
        if self._gc_done:
            return
        self._gc_cap = 0
        for cycle in self._gc_unanswered():
            if not cycle.response_complete:
                _close_after_response(cycle)
        if not (self.cycle is None or self.timeout_keep_alive_task is not None):
            return  # busy: its response says Connection: close
        if drain.keeps_open(self._gc_last_used(), now) or not nothing_at_stake(self._gc_transport):
            _Drain.held.add(self)
            return
        PROCESS_COUNTERS.count("drain_idle_closed")
        self._gc_done = True
        self._gc_transport.close()
        super().connection_lost(None)

    def _gc_count_idle_close(self) -> None:
        if self in _Drain.held:
            _Drain.held.discard(self)
            PROCESS_COUNTERS.count("drain_window_closed")
        elif _Drain.current is not None and _Drain.current.window > 0:
            PROCESS_COUNTERS.count("drain_idle_closed")

    def _gc_last_used(self) -> float:
        """When the client last used this idle connection: its last response completed
        (uvicorn armed the keep-alive timer then), or it was accepted."""
        timer = self.timeout_keep_alive_task
        if timer is not None:
            return timer.when() - self.timeout_keep_alive
        return self._gc_accepted

    def _gc_end_drain(self) -> None:
        """Bytes were arriving when the stop closed idle connections: still idle now, the
        connection closes (lingering when bytes are at stake); busy, its response says
        Connection: close already."""
        if self._gc_done or not (self.cycle is None or self.timeout_keep_alive_task is not None):
            return
        if nothing_at_stake(self._gc_transport):
            self._gc_done = True
            self._gc_transport.close()
            super().connection_lost(None)
            return
        for cycle in self._gc_unanswered():
            if not cycle.response_complete:
                _close_after_response(cycle)
        super().shutdown()

    # ---- keep-alive policy ---------------------------------------------------------

    def _gc_on_request(self, cycle: Any) -> None:
        """Once per new request cycle, before its task runs: the policy's per-request cost."""
        n = self._gc_requests = self._gc_requests + 1
        self._gc_input_after = False
        if n == 1 and _Process.user_agent_rules:
            self._gc_first_request()
        if n < self._gc_cap and self.loop.time() < self._gc_age_deadline:
            return
        self._gc_decide(cycle, n)

    def _gc_first_request(self) -> None:
        """The User-Agent rule, once per connection (when the policy has User-Agent rules)."""
        policy = _Process.policy
        assert policy is not None
        if policy.user_agents.active:
            for name, value in self.headers:
                if name == b"user-agent":
                    always, on_post = policy.user_agents.verdict(value)
                    if always or on_post:
                        self._gc_user_agent = value
                        self._gc_cap = 0  # decide every request of this client
                    break

    def _gc_decide(self, cycle: Any, n: int) -> None:
        """The slow path: a cap, the age or the User-Agent may end the connection here."""
        if self._gc_closing:  # pipelined behind the response that ends the connection
            cycle.keep_alive = False
            return
        if _Drain.current is not None:  # the server stops: answer, and end the connection
            self._gc_closing = True
            PROCESS_COUNTERS.count("drain_answered_close")
            self._gc_say_close(cycle)
            return
        policy = _Process.policy
        assert policy is not None
        decision = policy.decide(n, self._gc_accepted, self.loop.time(), self._gc_user_agent,
                                 self.scope["method"])
        if not decision.keep_alive:
            self._gc_closing = True
            self._gc_cap = 0
            self._gc_say_close(cycle)
        elif _Process.keepalive_header and not self._gc_client_closes():
            add_header_unless_app_closes(
                cycle, (b"keep-alive", _keep_alive_value(decision.keep_alive_header,
                                                         self.timeout_keep_alive,
                                                         decision.remaining_requests)))

    def _gc_client_closes(self) -> bool:
        """The request ends the connection itself (HTTP/1.0 without keep-alive, or
        Connection: close): uvicorn closes after the response, so no Keep-Alive header."""
        if self.scope.get("http_version") == "1.0":
            return True
        return headers_say_close(self.headers)

    # ---- what each protocol says ---------------------------------------------------

    def _gc_say_close(self, cycle: Any) -> None:
        """This request's response ends the connection and must say Connection: close."""
        cycle.keep_alive = False
        add_header_unless_app_closes(cycle, CLOSE)

    def _gc_unanswered(self) -> Iterator[Any]:
        """The request cycles whose responses a stop must end with Connection: close."""
        if self.cycle is not None:
            yield self.cycle

    def _gc_idle(self) -> bool:
        """After a complete response: nothing queued to serve next."""
        return True

    def handle_websocket_upgrade(self, *args: Any) -> None:
        # From here on the connection belongs to the WebSocket protocol: give it the real
        # transport so that it behaves exactly as in stock uvicorn.
        self._gc_done = True
        self.transport = self._gc_transport
        super().handle_websocket_upgrade(*args)


def _close_idle(connections: set[Any], wanted: int, asking: Any) -> int:
    """Up to `wanted` idle keep-alive connections with nothing at stake, closed at once
    (the DescriptorReclaimer's first resort); how many."""
    closed = 0
    for conn in list(connections):
        if closed >= wanted:
            break
        if conn is not asking and isinstance(conn, LingeringCloseMixin) and conn._gc_close_if_idle():
            closed += 1
    return closed


_keep_alive_values: dict[tuple[float, int | None], bytes] = {}


def _keep_alive_value(make: Callable[[float], bytes], idle_timeout: float,
                      remaining: int | None) -> bytes:
    key = (idle_timeout, remaining)
    value = _keep_alive_values.get(key)
    if value is None:
        if len(_keep_alive_values) > 100_000:
            _keep_alive_values.clear()
        value = _keep_alive_values[key] = make(idle_timeout)
    return value


def _close_after_response(cycle: Any) -> None:
    """The server is stopping: this response ends the connection and says so. Its task
    may run already (it holds cycle.send): only the default headers can still change."""
    cycle.keep_alive = False
    if not cycle.response_started:
        headers = [h for h in cycle.default_headers if h[0] != b"keep-alive"]
        cycle.default_headers = headers if CLOSE in headers else [*headers, CLOSE]


def _shutdown_grace(config: Any) -> float:
    """Lingering connections end by linger_time after shutdown begins, and before uvicorn's
    own --timeout-graceful-shutdown if that is shorter."""
    grace = current_settings().linger_time
    graceful = getattr(config, "timeout_graceful_shutdown", None)
    if graceful:
        grace = min(grace, max(graceful - 0.5, 0.0))
    return grace
