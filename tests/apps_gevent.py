"""WSGI app for the gevent tests: the sample app plus a route whose app asks to close.

    GET /app-close?size=N   N bytes with the app's own "Connection: close" header
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from graceful_close.diagnostics.sample_apps import wsgi_app


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") != "/app-close":
        return wsgi_app(environ, start_response)
    size = int(parse_qs(environ.get("QUERY_STRING", "")).get("size", ["100000"])[0])
    body = b"x" * size
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(size)), ("Connection", "close")])
    return [body]
