"""KeepAliveMiddleware: the User-Agent keep-alive rule for any ASGI server.

    app = KeepAliveMiddleware(app)                       # rules from GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS
    app = KeepAliveMiddleware(app, user_agents=("legacy", "msie6"))
    Starlette(middleware=[Middleware(KeepAliveMiddleware)])

For a request whose User-Agent matches a nokeepalive rule, the response start
gets `Connection: close`, which the server turns into closing the connection
after that response. Stock uvicorn (h11 and httptools) and hypercorn's HTTP/1.1
honour it. It only applies to HTTP/1.x: HTTP/2 and HTTP/3 forbid the header.

What it cannot do:
- Lingering close: the server still closes with a plain close(). Only
  graceful_close.uvicorn's protocol classes (or graceful_close.uvicorn_worker)
  close with FIN and drain; with them this middleware is unnecessary, since they
  apply the same rule themselves.
- Request cap and connection age: an ASGI app is not told which connection a
  request came on, nor how many it carried before, so neither can be counted here.
- WSGI servers: gunicorn drops an app's Connection header (hop-by-hop) and keeps
  the connection open; use the gunicorn hooks there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .core.counters import PROCESS_COUNTERS, Counters
from .core.keepalive import UserAgentRules
from .settings import Settings, SettingsError, current_settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CLOSE = (b"connection", b"close")


class KeepAliveMiddleware:
    def __init__(self, app: ASGIApp, user_agents: tuple[str, ...] | list[str] | None = None,
                 counters: Counters = PROCESS_COUNTERS) -> None:
        """user_agents: regexes and/or presets (legacy, msie6, safari, none); None reads the
        GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS setting (default: legacy). A bad value fails
        the server's lifespan startup with one line naming the setting."""
        self.app = app
        self.counters = counters
        try:
            if user_agents is None:
                rules = current_settings().nokeepalive_user_agents
            else:  # validated like every setting
                rules = Settings(nokeepalive_user_agents=tuple(user_agents)).nokeepalive_user_agents
        except SettingsError as exc:
            # Raised here it would be a traceback: from uvicorn's app loader, or swallowed as
            # "lifespan unsupported" when Starlette builds its middleware lazily. Instead the
            # lifespan startup fails with the one line, and the server exits non-zero.
            self.app = _refuse_to_start(str(exc))
            self.rules = UserAgentRules(("none",))
            return
        self.rules = UserAgentRules(rules)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.rules.active
                or scope.get("http_version") not in ("1.0", "1.1")
                or not self.rules.disables(_user_agent(scope), scope.get("method", "GET"))):
            await self.app(scope, receive, send)
            return
        self.counters.count("user_agent_disables")

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(bytes(name).lower() == b"connection" and b"close" in bytes(value).lower()
                           for name, value in headers):
                    message = {**message, "headers": [*headers, _CLOSE]}
            await send(message)

        await self.app(scope, receive, send_closing)


def _refuse_to_start(message: str) -> ASGIApp:
    """An app that fails the lifespan startup with `message` (one line) and serves nothing."""

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            if (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.failed", "message": message})
            return
        raise SettingsError(message)  # a server without lifespan: every request fails loudly

    return refuse


def _user_agent(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            return bytes(value)
    return None


__all__ = ["KeepAliveMiddleware"]
