"""uvicorn's zttp protocol with the lingering close and the keep-alive policy.

    uvicorn app:app --http graceful_close.uvicorn:ZttpProtocol        # HTTP/1.1
    uvicorn app:app --http graceful_close.uvicorn:AutoZttpProtocol    # HTTP/1.1 ours, HTTP/2 stock

zttp is optional: pip install "graceful-close[zttp]". HTTP/2 is not lingered on: uvicorn's
--http2 switch only accepts --http zttp (with our class it refuses to start, saying
HTTP/2 requires zttp), so AutoZttpProtocol is the way to keep serving HTTP/2: it
dispatches each connection like uvicorn's AutoZttpProtocol (ALPN over TLS, the h2c
preface in cleartext), HTTP/2 to uvicorn's own ZttpH2Protocol, exactly as stock, and
HTTP/1.1 to ours. It logs one line (uvicorn's log) at its first connection saying so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

try:
    import zttp
    from uvicorn.protocols.http import auto_zttp_impl, zttp_impl
    from uvicorn.protocols.http.zttp_h2_impl import ZttpH2Protocol
except ImportError as exc:  # zttp is an optional extra
    raise ImportError(f'graceful_close.uvicorn.ZttpProtocol needs zttp ({exc}): '
                      f'pip install "graceful-close[zttp]"') from None

from ._mixin import LingeringCloseMixin

_stock_handle_events = zttp_impl.ZttpProtocol.handle_events

log = logging.getLogger("uvicorn.error")  # configured by uvicorn: the line shows in its log


class ZttpProtocol(LingeringCloseMixin, zttp_impl.ZttpProtocol):
    """uvicorn's zttp HTTP/1.1 protocol with the lingering close and the keep-alive policy."""

    def handle_events(self, event: zttp.Event) -> None:
        before = self.cycle
        _stock_handle_events(self, event)
        # At most one new request per call: the next waits until this response completes.
        if self.cycle is not before and not self._gc_done:
            self._gc_on_request(self.cycle)


class AutoZttpProtocol(auto_zttp_impl.AutoZttpProtocol):
    """uvicorn's AutoZttpProtocol with our ZttpProtocol for HTTP/1.1; HTTP/2 is stock."""

    _announced = False

    def _switch(self, http2: bool, initial_data: bytes = b"") -> None:
        # Stock _switch picks its module's ZttpProtocol by name: the same ten lines, ours.
        if not AutoZttpProtocol._announced:
            AutoZttpProtocol._announced = True
            log.info("graceful-close: lingering close on HTTP/1.1; HTTP/2 connections are "
                     "served by uvicorn's own protocol")
        protocol_class: Callable[..., asyncio.Protocol] = ZttpH2Protocol if http2 else ZttpProtocol
        protocol = protocol_class(config=self.config, server_state=self.server_state,
                                  app_state=self.app_state, _loop=self.loop)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if initial_data:
            protocol.data_received(initial_data)


__all__ = ["AutoZttpProtocol", "ZttpProtocol"]
