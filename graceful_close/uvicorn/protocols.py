"""uvicorn HTTP protocols whose every close is a lingering close.

    uvicorn app:app --http graceful_close.uvicorn:HttpToolsProtocol
    uvicorn app:app --http graceful_close.uvicorn:H11Protocol
    uvicorn app:app --http graceful_close.uvicorn:AutoHTTPProtocol   # httptools if installed

uvicorn closes with transport.close() in a dozen places (Connection: close,
HTTP/1.0, 400, 500, 503, keep-alive timeout, shutdown). These classes give the
stock protocol a transport wrapper whose close() starts a lingering close in
graceful_close.engines.aio instead, and route what the client still sends to
that engine, so uvicorn's parser never sees it. They also apply the keep-alive
policy (request cap, connection age, User-Agent rules) and re-arm the
keep-alive timer after an early response's unread body has been discarded.

Settings come from graceful_close.settings.current_settings(): GRACEFUL_CLOSE_*
variables, or configure(**kwargs) called before the server starts (it exports them,
so the workers `uvicorn --workers N` spawns get them too). They are checked when
uvicorn loads this module to start a server (graceful_close.uvicorn.lifecycle: a bad
value stops it with one line) and read at the first request.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Any

from uvicorn.protocols.http import h11_impl

from .. import metrics
from ..core.keepalive import KeepAliveDecision, KeepAlivePolicy
from ..engines.aio import drain_engine
from ..settings import configure, current_settings
from . import lifecycle

try:
    from uvicorn.protocols.http import httptools_impl
except ImportError:  # httptools is optional in uvicorn
    httptools_impl = None  # type: ignore[assignment]


# Built from current_settings() at the first request, not at import: configure() may run
# after this module is imported (uvicorn.run with the class), and in spawned workers.
_policy: KeepAlivePolicy | None = None


def _first_policy() -> KeepAlivePolicy:
    global _policy
    _policy = KeepAlivePolicy(current_settings())
    return _policy


_metrics_started = False


def _forget_metrics_start() -> None:
    global _metrics_started
    _metrics_started = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_metrics_start)


def _drop(*_args: Any) -> None:
    """write() once closing: nothing may follow the response we linger behind."""


class ClosingTransport(asyncio.Transport):
    """What the uvicorn protocol sees as its transport: close() lingers instead.

    Everything else is the real transport's own bound method, stored per instance,
    so the hot path (write, flow control) costs no extra call.
    """

    __slots__ = ("_real", "_on_close", "_closing", "write", "writelines", "write_eof",
                 "can_write_eof", "get_extra_info", "pause_reading", "resume_reading",
                 "is_reading", "set_write_buffer_limits", "get_write_buffer_size",
                 "get_write_buffer_limits", "set_protocol", "get_protocol")

    def __init__(self, real: asyncio.Transport, on_close: Any) -> None:
        self._real = real
        self._on_close = on_close
        self._closing = False
        for name in ClosingTransport.__slots__[3:]:
            setattr(self, name, getattr(real, name))

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.write = self.writelines = _drop
            on_close, self._on_close = self._on_close, _drop  # no cycle back to the protocol
            on_close()

    def is_closing(self) -> bool:
        return self._closing or self._real.is_closing()

    def abort(self) -> None:
        self._closing = True
        self._real.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _has_token(value: bytes, token: bytes) -> bool:
    return any(part.strip() == token for part in value.lower().split(b","))


class _LingeringCloseMixin:
    """What both protocols add to uvicorn's; the subclasses only say where a request starts."""

    # Attributes of uvicorn's protocols that we use.
    loop: asyncio.AbstractEventLoop
    server_state: Any
    transport: asyncio.Transport
    cycle: Any
    headers: list[tuple[bytes, bytes]]
    scope: Any
    flow: Any
    config: Any
    timeout_keep_alive: float
    timeout_keep_alive_task: asyncio.TimerHandle | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        global _metrics_started
        if not _metrics_started:
            _metrics_started = True
            metrics.maybe_start_for_worker()
        self._gc_real = transport
        self._gc_linger = False
        self._gc_lost = False
        self._gc_upgraded = False
        self._gc_requests = 0
        self._gc_accepted = self.loop.time()
        self._gc_close_decided = False
        self._gc_unanswered: deque[Any] = deque()  # cycles whose response is not complete
        super().connection_made(ClosingTransport(transport, self._gc_begin_linger))  # type: ignore[misc]

    # ---- the lingering close -------------------------------------------------------

    def _gc_begin_linger(self) -> None:
        if self._gc_linger or self._gc_lost:
            return
        self._gc_linger = True
        engine = drain_engine(self.loop)
        engine.when_server_empty = metrics.flush_at_worker_exit
        engine.hand_off(self._gc_real, self.server_state.connections)
        # The engine owns the socket now; uvicorn's own bookkeeping frees this protocol.
        self.connection_lost(None)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        cycle = self.cycle
        if (cycle is not None and cycle.response_complete and self.timeout_keep_alive_task is None
                and self._gc_between_requests() and not self.transport.is_closing()):
            # uvicorn cancels the keep-alive timer on every read and re-arms it only when a
            # response completes; after an early response whose unread body arrives later,
            # nothing would ever re-arm it and the connection would stay open forever.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gc_lost:
            return
        self._gc_lost = True  # uvicorn calls transport.close() in here: nothing to linger on
        super().connection_lost(exc)  # type: ignore[misc]
        if not self.server_state.connections and drain_engine(self.loop).stopping:
            # uvicorn leaves by re-raising SIGTERM/SIGINT, so atexit never runs: the last
            # connection of a stopping server is the last moment we can log the summary.
            metrics.flush_at_worker_exit()

    def shutdown(self) -> None:
        engine = drain_engine(self.loop)
        engine.begin_shutdown(_shutdown_grace(self.config))
        if not self._gc_linger:
            # Every unanswered request ends the connection, in particular the one in flight:
            # stock httptools marks only the last one parsed, and would first serve all the
            # pipelined ones; stock h11 closes without a Connection: close header.
            for cycle in self._gc_unanswered:
                _close_after_response(cycle)
            super().shutdown()  # type: ignore[misc]

    def handle_websocket_upgrade(self, *args: Any) -> None:
        # From here on the connection belongs to the WebSocket protocol: give it the real
        # transport so that it behaves exactly as in stock uvicorn.
        self._gc_upgraded = True
        self.transport = self._gc_real
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def _gc_between_requests(self) -> bool:
        """After a complete response: is the connection idle (nothing queued, not upgraded)?"""
        raise NotImplementedError

    # ---- keep-alive policy ---------------------------------------------------------

    def _gc_on_request(self, cycle: Any) -> None:
        """A new request cycle was created: decide keep-alive and set the response headers."""
        self._gc_requests += 1
        unanswered = self._gc_unanswered
        while unanswered and unanswered[0].response_complete:
            unanswered.popleft()
        unanswered.append(cycle)
        user_agent = None
        wants_close = self.scope.get("http_version") == "1.0"  # both parsers close HTTP/1.0
        for name, value in self.headers:
            if name == b"user-agent":
                user_agent = value
            elif name == b"connection" and _has_token(value, b"close"):
                wants_close = True
        if wants_close:  # uvicorn answers Connection: close itself
            self._gc_close_decided = True
            return
        if self._gc_close_decided:  # pipelined behind the last response: never answered
            cycle.keep_alive = False
            return
        decision = (_policy or _first_policy()).decide(
            self._gc_requests, self._gc_accepted, self.loop.time(), user_agent, self.scope["method"])
        if decision.keep_alive:
            extra = (b"keep-alive", _keep_alive_value(decision, self.timeout_keep_alive))
        else:
            self._gc_close_decided = True
            cycle.keep_alive = False
            extra = _CLOSE  # httptools would add it for keep_alive=False; h11 would not
        _add_default_header(cycle, extra)


_CLOSE = (b"connection", b"close")
_keep_alive_values: dict[tuple[float, int | None], bytes] = {}


def _keep_alive_value(decision: KeepAliveDecision, idle_timeout: float) -> bytes:
    key = (idle_timeout, decision.remaining_requests)
    value = _keep_alive_values.get(key)
    if value is None:
        if len(_keep_alive_values) > 100_000:
            _keep_alive_values.clear()
        value = _keep_alive_values[key] = decision.keep_alive_header(idle_timeout)
    return value


def _add_default_header(cycle: Any, extra: tuple[bytes, bytes]) -> None:
    """Add a header through the cycle's default headers (which uvicorn writes before the
    app's), and drop it again if the app answers Connection: close itself: then a
    Keep-Alive header would be wrong and a second Connection header redundant.

    The replacement send is a plain function returning uvicorn's coroutine, so it adds
    no coroutine per message; run_asgi looks up self.send when its task first runs.
    """
    plain = cycle.default_headers
    cycle.default_headers = [*plain, extra]
    send = cycle.send

    def send_unless_app_closes(message: Any) -> Any:
        if message["type"] == "http.response.start":
            for name, value in message.get("headers", ()):
                # len() first: both names we look for are 10 bytes long
                if len(name) == 10 and bytes(name).lower() == b"connection" and _has_token(
                        bytes(value), b"close"):
                    cycle.default_headers = plain
                    break
        return send(message)

    cycle.send = send_unless_app_closes


def _close_after_response(cycle: Any) -> None:
    """The server is stopping: this response ends the connection and says so."""
    cycle.keep_alive = False
    if not cycle.response_started:
        headers = [h for h in cycle.default_headers if h[0] != b"keep-alive"]
        cycle.default_headers = headers if _CLOSE in headers else [*headers, _CLOSE]


def _shutdown_grace(config: Any) -> float:
    """Lingering connections end by linger_time after shutdown begins, and before uvicorn's
    own --timeout-graceful-shutdown if that is shorter."""
    grace = current_settings().linger_time
    graceful = getattr(config, "timeout_graceful_shutdown", None)
    if graceful:
        grace = min(grace, max(graceful - 0.5, 0.0))
    return grace


class H11Protocol(_LingeringCloseMixin, h11_impl.H11Protocol):
    """uvicorn's h11 protocol with the lingering close and the keep-alive policy."""

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        # h11 yields at most one new request per call (the next one waits, PAUSED).
        if self.cycle is not before and not self._gc_linger:
            self._gc_on_request(self.cycle)

    def _gc_between_requests(self) -> bool:
        return not self._gc_upgraded


if httptools_impl is not None:
    class HttpToolsProtocol(_LingeringCloseMixin, httptools_impl.HttpToolsProtocol):
        """uvicorn's httptools protocol with the lingering close and the keep-alive policy."""

        def on_headers_complete(self) -> None:
            before = self.cycle
            super().on_headers_complete()
            if self.cycle is not before:  # not a WebSocket upgrade
                self._gc_on_request(self.cycle)

        def _gc_between_requests(self) -> bool:
            return not self.pipeline and not self._gc_upgraded

    AutoHTTPProtocol: type[asyncio.Protocol] = HttpToolsProtocol
else:  # pragma: no cover - without httptools
    AutoHTTPProtocol = H11Protocol

__all__ = ["AutoHTTPProtocol", "ClosingTransport", "H11Protocol", "HttpToolsProtocol",
           "configure", "current_settings"]

lifecycle.protocols_loaded()  # uvicorn is loading us to start a server: check, watch its stop
