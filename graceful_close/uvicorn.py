"""uvicorn HTTP protocols whose every close is a lingering close.

    uvicorn app:app --http graceful_close.uvicorn:HttpToolsProtocol
    uvicorn app:app --http graceful_close.uvicorn:H11Protocol
    uvicorn app:app --http graceful_close.uvicorn:AutoHTTPProtocol   # httptools if installed

uvicorn closes with transport.close() in a dozen places (Connection: close,
HTTP/1.0, 400, 500, 503, keep-alive timeout, shutdown). These classes give the
stock protocol a transport wrapper whose close() starts a lingering close in
graceful_close.aio_lingerer instead, and route what the client still sends to
that engine, so uvicorn's parser never sees it. They also apply the keep-alive
policy (request cap, connection age, User-Agent rules) and re-arm the
keep-alive timer after an early response's unread body has been discarded.

Settings come from GRACEFUL_CLOSE_* variables, read once when uvicorn imports
this module at startup (a bad value stops it with a one-line message), or from
configure(**kwargs) called before the server starts.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Any

from uvicorn.protocols.http import h11_impl

from . import metrics
from .aio_lingerer import Linger, aio_lingerer
from .core.keepalive import KeepAliveDecision, KeepAlivePolicy
from .settings import Settings, SettingsError

try:
    from uvicorn.protocols.http import httptools_impl
except ImportError:  # httptools is optional in uvicorn
    httptools_impl = None  # type: ignore[assignment]

def _settings_or_exit(**kwargs: Any) -> Settings:
    """A bad value stops the server with its one-line message, not a traceback."""
    try:
        return Settings.from_env(**kwargs)
    except SettingsError as exc:
        raise SystemExit(str(exc)) from None


# Read when uvicorn imports the protocol class, i.e. at startup; forked workers inherit it.
_settings: Settings = _settings_or_exit()
_policy = KeepAlivePolicy(_settings)


def configure(**kwargs: Any) -> Settings:
    """Settings for code that starts uvicorn itself (uvicorn.run, uvicorn.Config): keyword
    arguments win over GRACEFUL_CLOSE_* variables. Call it before the server starts."""
    global _settings, _policy
    _settings = _settings_or_exit(**kwargs)
    _policy = KeepAlivePolicy(_settings)
    return _settings


def current_settings() -> Settings:
    return _settings


_metrics_started = False


def _forget_metrics_start() -> None:
    global _metrics_started
    _metrics_started = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_metrics_start)


class ClosingTransport(asyncio.Transport):
    """What the uvicorn protocol sees as its transport: close() lingers instead.

    Everything else goes to the real transport unchanged.
    """

    __slots__ = ("_real", "_on_close", "_closing")

    def __init__(self, real: asyncio.Transport, on_close: Any) -> None:
        self._real = real
        self._on_close = on_close
        self._closing = False

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._on_close()

    def is_closing(self) -> bool:
        return self._closing or self._real.is_closing()

    def write(self, data: Any) -> None:
        if not self._closing:  # nothing may follow the response we are lingering behind
            self._real.write(data)

    def writelines(self, list_of_data: Any) -> None:
        if not self._closing:
            self._real.writelines(list_of_data)

    def write_eof(self) -> None:
        self._real.write_eof()

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def abort(self) -> None:
        self._closing = True
        self._real.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._real.get_protocol()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _has_token(value: bytes, token: bytes) -> bool:
    return any(part.strip() == token for part in value.lower().split(b","))


class _LingeringCloseMixin:
    """What both protocols add to uvicorn's; the subclasses only say where a request starts."""

    # Attributes of uvicorn's protocols that we use.
    loop: asyncio.AbstractEventLoop
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
        self._gc_linger: Linger | None = None
        self._gc_lost = False
        self._gc_upgraded = False
        self._gc_requests = 0
        self._gc_accepted = self.loop.time()
        self._gc_close_decided = False
        self._gc_unanswered: deque[Any] = deque()  # cycles whose response is not complete
        super().connection_made(ClosingTransport(transport, self._gc_begin_linger))  # type: ignore[misc]

    # ---- the lingering close -------------------------------------------------------

    def _gc_begin_linger(self) -> None:
        if self._gc_linger is not None or self._gc_lost:
            return
        self._unset_keepalive_if_required()  # type: ignore[attr-defined]
        if self.flow is not None:
            self.flow.read_paused = False  # the engine resumes reading
        self._gc_linger = aio_lingerer(self.loop, _settings).start(self._gc_real)

    def data_received(self, data: bytes) -> None:
        linger = self._gc_linger
        if linger is not None:  # after the close: discard, never parse
            linger.data_received(len(data))
            return
        super().data_received(data)  # type: ignore[misc]
        if (self.timeout_keep_alive_task is None and self._gc_between_requests()
                and not self.transport.is_closing()):
            # uvicorn cancels the keep-alive timer on every read and re-arms it only when a
            # response completes; after an early response whose unread body arrives later,
            # nothing would ever re-arm it and the connection would stay open forever.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        if self._gc_linger is not None:
            return self._gc_linger.eof_received()
        return super().eof_received()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._gc_lost = True  # uvicorn calls transport.close() in here: nothing to linger on
        if self._gc_linger is not None:
            self._gc_linger.connection_lost(exc)
        super().connection_lost(exc)  # type: ignore[misc]

    def shutdown(self) -> None:
        engine = aio_lingerer(self.loop, _settings)
        engine.begin_shutdown(_shutdown_grace(self.config))
        if self._gc_linger is None:
            # Every unanswered request ends the connection, in particular the one in flight:
            # stock httptools marks only the last one parsed, and would first serve all the
            # pipelined ones. Our send wrapper adds the Connection: close header h11 omits.
            for cycle in self._gc_unanswered:
                cycle.keep_alive = False
            super().shutdown()  # type: ignore[misc]

    def handle_websocket_upgrade(self, *args: Any) -> None:
        # From here on the connection belongs to the WebSocket protocol: give it the real
        # transport so that it behaves exactly as in stock uvicorn.
        self._gc_upgraded = True
        self.transport = self._gc_real
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def _gc_between_requests(self) -> bool:
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
        decision: KeepAliveDecision | None = None
        if self._gc_close_decided or wants_close:
            self._gc_close_decided = True
            if not wants_close:
                cycle.keep_alive = False
        else:
            decision = _policy.decide(self._gc_requests, self._gc_accepted, self.loop.time(),
                                      user_agent, self.scope["method"])
            if not decision.keep_alive:
                cycle.keep_alive = False
                self._gc_close_decided = True
        _add_connection_headers(cycle, decision, self.timeout_keep_alive)


def _add_connection_headers(cycle: Any, decision: KeepAliveDecision | None,
                            idle_timeout: float) -> None:
    """Wrap the cycle's send: the response start gets Connection: close when the
    connection ends after it, or an accurate Keep-Alive header when it stays open.

    The instance attribute shadows the method; run_asgi looks up self.send only when
    the task first runs, after this.
    """
    send = cycle.send

    async def send_with_connection_headers(message: Any) -> None:
        if message["type"] == "http.response.start" and not cycle.response_started:
            message = _with_connection_headers(message, cycle.keep_alive, decision, idle_timeout)
        await send(message)

    cycle.send = send_with_connection_headers


def _with_connection_headers(message: Any, keep_alive: bool, decision: KeepAliveDecision | None,
                             idle_timeout: float) -> Any:
    headers = list(message.get("headers", ()))
    app_closes = has_keep_alive = False
    for name, value in headers:
        lower = bytes(name).lower()
        if lower == b"connection" and _has_token(bytes(value), b"close"):
            app_closes = True
        elif lower == b"keep-alive":
            has_keep_alive = True
    if app_closes:
        return message
    if not keep_alive:
        headers.append((b"connection", b"close"))  # h11 does not add it on its own
    elif decision is not None and not has_keep_alive:
        headers.append((b"keep-alive", decision.keep_alive_header(idle_timeout)))
    else:
        return message
    return {**message, "headers": headers}


def _shutdown_grace(config: Any) -> float:
    """Lingering connections end by linger_time after shutdown begins, and before uvicorn's
    own --timeout-graceful-shutdown if that is shorter."""
    grace = _settings.linger_time
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
        if self.cycle is not before and self._gc_linger is None:
            self._gc_on_request(self.cycle)

    def _gc_between_requests(self) -> bool:
        return self.cycle is not None and self.cycle.response_complete and not self._gc_upgraded


if httptools_impl is not None:
    class HttpToolsProtocol(_LingeringCloseMixin, httptools_impl.HttpToolsProtocol):
        """uvicorn's httptools protocol with the lingering close and the keep-alive policy."""

        def on_headers_complete(self) -> None:
            before = self.cycle
            super().on_headers_complete()
            if self.cycle is not before:  # not a WebSocket upgrade
                self._gc_on_request(self.cycle)

        def _gc_between_requests(self) -> bool:
            return (self.cycle is not None and self.cycle.response_complete and not self.pipeline
                    and not self._gc_upgraded)

    AutoHTTPProtocol: type[asyncio.Protocol] = HttpToolsProtocol
else:  # pragma: no cover - without httptools
    AutoHTTPProtocol = H11Protocol

__all__ = ["AutoHTTPProtocol", "ClosingTransport", "H11Protocol", "HttpToolsProtocol",
           "configure", "current_settings"]
