"""A Starlette app with KeepAliveMiddleware: the User-Agent keep-alive rule on any ASGI server.

    uvicorn integrations.starlette_app:app                      # stock uvicorn: rule applied, plain close
    uvicorn integrations.starlette_app:app --http graceful_close.uvicorn:AutoHTTPProtocol
                                                                # ours: lingering close, cap and age too

The middleware adds `Connection: close` for matching User-Agents (presets and
regexes from GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS, default "legacy"). It does
not make the close lingering, and cannot apply the request or age caps.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from graceful_close.middleware import KeepAliveMiddleware


async def home(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def upload(request: Request) -> Response:
    # Answers before reading the body: the case where only a lingering close keeps the 413 intact.
    return PlainTextResponse("too large\n", status_code=413)


app = Starlette(
    routes=[Route("/", home), Route("/upload", upload, methods=["POST"])],
    middleware=[Middleware(KeepAliveMiddleware)],
)
