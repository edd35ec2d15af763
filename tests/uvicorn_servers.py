"""Real uvicorn processes for the uvicorn tests: stock and ours, side by side.

A Fleet starts each (kind, http, loop, args, env) server once and stops them all
at the end of the module that owns it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from graceful_close.diagnostics.launch import UVICORN_PROTOCOLS, ServerProcess, uvicorn_server
from graceful_close.diagnostics.scenarios import Target
from tests.helpers import SAMPLE_ASGI

REPO = Path(__file__).resolve().parent.parent
TEST_APP = "tests.uvicorn_apps:app"
LINGER_TIMEOUT = 1.0
LINGER_TIME = 3.0
KEEP_ALIVE = 1  # uvicorn --timeout-keep-alive, seconds
SHORT = {"GRACEFUL_CLOSE_LINGER_TIMEOUT": str(LINGER_TIMEOUT),
         "GRACEFUL_CLOSE_LINGER_TIME": str(LINGER_TIME)}


def protocol(kind: str, http: str) -> str:
    stock, ours = UVICORN_PROTOCOLS[http]
    return {"stock": stock, "ours": ours}[kind]


def make_server(kind: str, http: str, loop: str = "asyncio", args: tuple[str, ...] = (),
                env: dict[str, str] | None = None, app: str = SAMPLE_ASGI,
                keep_alive: int = KEEP_ALIVE) -> ServerProcess:
    return uvicorn_server(app, protocol(kind, http), loop,
                          args=["--app-dir", str(REPO), "--timeout-keep-alive", str(keep_alive),
                                *args],
                          env={**SHORT, **(env or {})})


class Fleet:
    def __init__(self) -> None:
        self._servers: dict[tuple[object, ...], ServerProcess] = {}

    def get(self, kind: str, http: str, loop: str = "asyncio", args: tuple[str, ...] = (),
            env: dict[str, str] | None = None, app: str = SAMPLE_ASGI) -> ServerProcess:
        key = (kind, http, loop, args, tuple(sorted((env or {}).items())), app)
        server = self._servers.get(key)
        if server is None:
            server = self._servers[key] = make_server(kind, http, loop, args, env, app).start()
        return server

    def target(self, *args: object, **kwargs: object) -> Target:
        return Target("127.0.0.1", self.get(*args, **kwargs).port)  # type: ignore[arg-type]

    def stop(self) -> None:
        for server in self._servers.values():
            server.stop()


def tls_server(kind: str, http: str, loop: str, certdir: Path,
               client_context: ssl.SSLContext, env: dict[str, str] | None = None) -> ServerProcess:
    plain = make_server(kind, http, loop, env=env,
                        args=("--ssl-keyfile", str(certdir / "key.pem"),
                              "--ssl-certfile", str(certdir / "cert.pem")))
    return ServerProcess(plain.argv, plain.env, tls=client_context)
