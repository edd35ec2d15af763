"""WSGI app for the gunicorn tests: the sample app plus two routes.

    GET /port                  the client's port, so a test can count connections server-side
    GET /slow?s=N              sleeps N seconds before answering (a request in flight at SIGTERM)
    POST /read-after-start     calls start_response, then reads the whole body (legal WSGI,
                               a streaming processor does this), answers with its length
    POST /unread?s=N           sleeps N seconds, answers without reading the body
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from graceful_close.diagnostics.sample_apps import wsgi_app


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
    if path == "/read-after-start":
        start_response("200 OK", [("Content-Type", "text/plain")])
        size = len(environ["wsgi.input"].read())
        return [str(size).encode()]
    if path == "/unread":
        time.sleep(seconds)
        body = b"not read\n"
    elif path == "/slow":
        time.sleep(seconds)
        body = b"slow done\n"
    elif path == "/port":
        body = environ["REMOTE_PORT"].encode()
    else:
        return wsgi_app(environ, start_response)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
