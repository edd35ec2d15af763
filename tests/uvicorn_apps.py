"""ASGI apps that the uvicorn tests run in real uvicorn processes.

    app:                  the sample app plus
        GET  /port                    the client's port (tells connections apart)
        GET  /slow?s=S&size=N         sleeps S seconds, then N bytes
        GET  /stream                  a chunked response (no Content-Length)
        POST /echo                    reads the whole body, answers its length
        websocket                     accepts, echoes one text message, closes
    plain_close_cap_app:  the sample app with a 10-request cap done the stock way, by
                          answering Connection: close; uvicorn then closes plainly.
    legacy_closing_app:   the sample app behind KeepAliveMiddleware (legacy preset).
    generator_headers_app: answers with its headers given as a generator (the ASGI spec
                          allows any iterable); GET /?close=1 adds Connection: close.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

from graceful_close.diagnostics.sample_apps import asgi_app
from graceful_close.middleware import KeepAliveMiddleware

PLAIN_CAP = 10


async def _respond(send: Any, body: bytes, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _websocket_echo(receive: Any, send: Any) -> None:
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    message = await receive()
    await send({"type": "websocket.send", "text": "echo:" + (message.get("text") or "")})
    await send({"type": "websocket.close", "code": 1000})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await _websocket_echo(receive, send)
        return
    if scope["type"] != "http":
        await asgi_app(scope, receive, send)
        return
    path = scope["path"]
    query = parse_qs(scope.get("query_string", b"").decode())
    if path == "/port":
        await _respond(send, str(scope["client"][1]).encode())
    elif path == "/slow":
        await asyncio.sleep(float(query.get("s", ["1"])[0]))
        await _respond(send, b"s" * int(query.get("size", ["3"])[0]))
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/echo":
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await _respond(send, str(size).encode())
    else:
        await asgi_app(scope, receive, send)


_served: dict[tuple[str, int], int] = {}


async def plain_close_cap_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await asgi_app(scope, receive, send)
        return
    # A connection is its client address while it is open; tests use fresh ones.
    client = tuple(scope["client"])
    served = _served[client] = _served.get(client, 0) + 1

    async def send_capped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and served >= PLAIN_CAP:
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    await asgi_app(scope, receive, send_capped)


# The sample app behind KeepAliveMiddleware: legacy User-Agents get Connection: close.
legacy_closing_app = KeepAliveMiddleware(asgi_app, user_agents=("legacy",))


async def generator_headers_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await asgi_app(scope, receive, send)
        return
    closing = b"close=1" in scope.get("query_string", b"")

    def headers() -> Any:
        yield (b"content-type", b"text/plain")
        yield (b"content-length", b"2")
        yield (b"x-from-generator", b"yes")
        if closing:
            yield (b"connection", b"close")

    await send({"type": "http.response.start", "status": 200, "headers": headers()})
    await send({"type": "http.response.body", "body": b"ok"})
