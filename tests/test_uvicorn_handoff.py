"""At a lingering close, uvicorn's protocol object is freed while the socket lingers
(issue 9): the drain engine owns the transport (set_protocol), the protocol has done its
connection-lost bookkeeping, and no reference cycle keeps it alive (checked with the
cyclic garbage collector off). In process, on real loopback sockets, for every protocol."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from graceful_close.engines.aio import DetachedConnections, LingeringConnection, drain_engine

RESPONSE_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": RESPONSE_HEADERS})
    await send({"type": "http.response.body", "body": b"ok"})


def _readme_protocol() -> type[asyncio.Protocol]:
    """The README's "any asyncio protocol that closes through its transport" recipe."""
    from uvicorn.protocols.http import h11_impl

    from graceful_close.uvicorn import LingeringCloseMixin

    class MyH11Protocol(LingeringCloseMixin, h11_impl.H11Protocol):
        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before and not self._gc_done:
                self._gc_on_request(self.cycle)  # the keep-alive policy: one increment per request

    return MyH11Protocol


def _protocol_class(http: str) -> type[asyncio.Protocol]:
    if http == "zttp":
        pytest.importorskip("zttp")
    if http == "readme-recipe":
        return _readme_protocol()
    import graceful_close.uvicorn as ours

    return {"h11": ours.H11Protocol, "httptools": ours.HttpToolsProtocol,
            "zttp": getattr(ours, "ZttpProtocol", None)}[http]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("http", ["h11", "httptools", "zttp", "readme-recipe"])
def test_protocol_is_freed_while_the_socket_lingers(http: str, loop_kind: str) -> None:
    protocol_class = _protocol_class(http)
    config = uvicorn.Config(app, lifespan="off", log_level="warning")
    config.load()
    state = ServerState()
    protocols: list[weakref.ref[asyncio.Protocol]] = []

    def factory() -> asyncio.Protocol:
        protocol = protocol_class(config=config, server_state=state, app_state={})  # type: ignore[call-arg]
        protocols.append(weakref.ref(protocol))
        return protocol

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # HTTP/1.0: the server ends the connection (an explicit Connection: close from the
        # client would close at once under lingering_close=auto)
        writer.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"ok"):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, data
            data += chunk
        assert await asyncio.wait_for(reader.read(1), 5) == b""  # our FIN
        for _ in range(20):
            await asyncio.sleep(0.01)
        # The client has not closed: the socket lingers, owned by the engine: its small drain
        # protocol, or past DETACH_ABOVE lingering ones, detached from its transport (one
        # stand-in in uvicorn's set for every detached one) ...
        assert drain_engine(loop).lingering == 1
        assert [type(c) for c in state.connections] in ([LingeringConnection],
                                                          [DetachedConnections])
        # ... and uvicorn's protocol, parser and cycle are gone.
        assert protocols and all(ref() is None for ref in protocols)
        writer.close()
        for _ in range(50):
            await asyncio.sleep(0.01)
            if not state.connections:
                break
        assert not state.connections and drain_engine(loop).lingering == 0
        server.close()

    gc.collect()
    gc.disable()
    try:
        if loop_kind == "uvloop":
            uvloop = pytest.importorskip("uvloop")
            uvloop.run(main())
        else:
            asyncio.run(main())
    finally:
        gc.enable()
