"""Sample apps that also say which HTTP parser gunicorn used for the request (issue 17 item 2).

    GET  /parser   "fast" or "python" (WSGI workers), or the ASGI protocol's parser class name
                   (H1CProtocol, PythonProtocol): read from the server's own objects up the stack
    POST /echo     reads the whole body and answers its length
    anything else  the sample app (/upload: an early 413, /big, ...)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from graceful_close.diagnostics.sample_apps import asgi_app, wsgi_app


def _parser_used() -> str:
    """The parser of the request being served, found in the server's frames that called us:
    a WSGI worker's `req` (gunicorn's Request knows whether it took the C parser), or the ASGI
    protocol (`self`) and its callback parser."""
    frame = sys._getframe(1)
    while frame is not None:
        req = frame.f_locals.get("req")
        if req is not None and hasattr(req, "_use_fast"):
            return "fast" if req._use_fast else "python"
        owner = frame.f_locals.get("self")
        parser = getattr(owner, "_callback_parser", None)
        if parser is not None:
            return type(parser).__name__
        frame = frame.f_back
    return "unknown"


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/parser":
        body = _parser_used().encode()
    elif path == "/echo":
        body = str(len(environ["wsgi.input"].read())).encode()
    else:
        return wsgi_app(environ, start_response)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    path = scope.get("path")
    if scope["type"] != "http" or path not in ("/parser", "/echo"):
        await asgi_app(scope, receive, send)
        return
    if path == "/parser":
        body = _parser_used().encode()
    else:
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
