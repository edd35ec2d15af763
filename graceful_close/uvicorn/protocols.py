"""uvicorn HTTP protocols whose every close is a lingering close.

    uvicorn app:app --http graceful_close.uvicorn:HttpToolsProtocol
    uvicorn app:app --http graceful_close.uvicorn:H11Protocol
    uvicorn app:app --http graceful_close.uvicorn:AutoHTTPProtocol   # httptools if installed
    uvicorn app:app --http graceful_close.uvicorn:ZttpProtocol       # pip install "graceful-close[zttp]"

uvicorn closes with transport.close() in a dozen places (Connection: close, HTTP/1.0,
400, 500, 503, keep-alive timeout, shutdown). Each class here is uvicorn's own protocol
with graceful_close.uvicorn._mixin.LingeringCloseMixin in front: every such close hands
the socket to the asyncio drain engine, which lingers, and the keep-alive policy
(request cap, connection age, User-Agent rules) applies. The classes only say where a
request cycle starts and how its response says "close".

Settings come from graceful_close.settings.current_settings(): GRACEFUL_CLOSE_*
variables, or configure(**kwargs) called before the server starts (it exports them,
so the workers `uvicorn --workers N` spawns get them too). They are checked when
uvicorn loads this module to start a server (graceful_close.uvicorn.lifecycle: a bad
value stops it with one line) and read at the first connection.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections import deque
from collections.abc import Iterator
from typing import Any

from uvicorn.protocols.http import h11_impl

from ..settings import configure, current_settings
from . import lifecycle
from ._mixin import ClosingTransport, LingeringCloseMixin

# The stock methods our hooks wrap, called directly: cheaper than super() per request.
_stock_h11_handle_events = h11_impl.H11Protocol.handle_events


class H11Protocol(LingeringCloseMixin, h11_impl.H11Protocol):
    """uvicorn's h11 protocol with the lingering close and the keep-alive policy."""

    def handle_events(self) -> None:
        before = self.cycle
        _stock_h11_handle_events(self)
        # h11 yields at most one new request per call (the next one waits, PAUSED).
        if self.cycle is not before and not self._gc_done:
            self._gc_on_request(self.cycle)

    def _gc_held_input(self, cycle: Any) -> bool:
        # h11 keeps what came after a request that ends the connection in its buffer.
        # (LingeringCloseMixin._gc_held_input's test written out: no super() frame per close)
        return cycle is not self.cycle or self._gc_input_after or bool(self.conn.trailing_data[0])


if importlib.util.find_spec("httptools") is not None:  # optional in uvicorn
    from uvicorn.protocols.http import httptools_impl

    _stock_on_headers_complete = httptools_impl.HttpToolsProtocol.on_headers_complete

    class HttpToolsProtocol(LingeringCloseMixin, httptools_impl.HttpToolsProtocol):
        """uvicorn's httptools protocol with the lingering close and the keep-alive policy."""

        # The unanswered cycles created while another was in flight (pipelining, rare):
        # with self.pipeline, what a stop must answer with Connection: close. None when
        # the last request was not pipelined.
        _gc_pipelined: deque[Any] | None = None

        def on_headers_complete(self) -> None:
            before = self.cycle
            _stock_on_headers_complete(self)
            cycle = self.cycle
            if cycle is not before:  # not a WebSocket upgrade
                if before is not None and not before.response_complete:
                    pipelined = self._gc_pipelined
                    if pipelined is None:
                        pipelined = self._gc_pipelined = deque([before])
                    while pipelined and pipelined[0].response_complete:
                        pipelined.popleft()  # answered: bounded however long it pipelines
                    pipelined.append(cycle)
                elif self._gc_pipelined is not None:
                    self._gc_pipelined = None
                self._gc_on_request(cycle)

        def _gc_say_close(self, cycle: Any) -> None:
            cycle.keep_alive = False  # httptools writes Connection: close itself then

        def _gc_unanswered(self) -> Iterator[Any]:
            # Stock marks only the last cycle parsed, and serves all the pipelined ones first.
            yield from self._gc_pipelined or ()
            yield from (cycle for cycle, _app in self.pipeline)
            if self.cycle is not None:
                yield self.cycle

        def _gc_idle(self) -> bool:
            return not self.pipeline

        def _gc_held_input(self, cycle: Any) -> bool:
            # httptools parses all it is fed: a next message began (its own scope) or is
            # queued. Bytes after a Connection: close request in the same read are dropped
            # by llhttp (uvicorn sets lenient_data_after_close) without a trace.
            # (LingeringCloseMixin._gc_held_input's test written out: no super() frame per close)
            return (cycle is not self.cycle or self._gc_input_after
                    or self.scope is not cycle.scope or bool(self.pipeline))

    AutoHTTPProtocol: type[asyncio.Protocol] = HttpToolsProtocol
else:  # pragma: no cover - without httptools
    AutoHTTPProtocol = H11Protocol


def __getattr__(name: str) -> Any:
    """ZttpProtocol and AutoZttpProtocol need the optional zttp package: imported on first use.
    HttpToolsProtocol exists when httptools is installed; without it, say what to install."""
    if name in ("ZttpProtocol", "AutoZttpProtocol"):
        from . import zttp

        return getattr(zttp, name)
    if name == "HttpToolsProtocol":
        raise ImportError('graceful_close.uvicorn.HttpToolsProtocol needs httptools: '
                          'pip install "graceful-close[uvicorn]"')
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AutoHTTPProtocol", "ClosingTransport", "H11Protocol", "HttpToolsProtocol",
           "configure", "current_settings"]

lifecycle.protocols_loaded()  # uvicorn is loading us to start a server: check, watch its stop
