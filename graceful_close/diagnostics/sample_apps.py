"""Sample WSGI and ASGI apps with the routes the demo, tests and benchmarks use.

    GET  /[?close=1]               small 200 (close=1: Connection: close, as for /big)
    GET  /big?size=N[&close=1]     N bytes (close=1 asks for Connection: close where the server honours it)
    POST /upload?size=N            413 with an N-byte body, without reading the upload
    GET  /raise                    exception before the response: the server answers 500
    GET  /raise-after-headers      exception after the headers and part of the body
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

SMALL_BODY = b"ok\n"
DEFAULT_BIG = 2_000_000


def _size(query: str, default: int) -> int:
    values = parse_qs(query).get("size")
    return int(values[0]) if values else default


def _body(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = environ.get("QUERY_STRING", "")
    if path == "/big":
        body = _body(_size(query, DEFAULT_BIG))
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/upload":
        body = _body(_size(query, 1_000_000))  # the upload itself is never read
        start_response("413 Content Too Large", [("Content-Type", "text/plain"),
                                                 ("Content-Length", str(len(body)))])
        return [body]
    if path == "/raise":
        raise RuntimeError("sample failure before the response")
    if path == "/raise-after-headers":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _fail_midway()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(SMALL_BODY)))])
    return [SMALL_BODY]


def _fail_midway() -> Iterable[bytes]:
    yield b"partial "
    raise RuntimeError("sample failure after the headers")


async def asgi_app(scope: dict[str, Any], receive: Callable[..., Any],
                   send: Callable[..., Any]) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = (await receive())["type"]
            if event == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    headers = [(b"content-type", b"application/octet-stream")]
    if path == "/raise":
        raise RuntimeError("sample failure before the response")
    if path == "/raise-after-headers":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"partial ", "more_body": True})
        raise RuntimeError("sample failure after the headers")
    if path == "/big":
        status, body = 200, _body(_size(query, DEFAULT_BIG))
        if "close=1" in query:
            headers.append((b"connection", b"close"))
    elif path == "/upload":
        status, body = 413, _body(_size(query, 1_000_000))  # the upload itself is never read
    else:
        status, body = 200, SMALL_BODY
        if query == "close=1":  # the server-close benchmark workload
            headers.append((b"connection", b"close"))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
