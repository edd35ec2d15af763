"""Every reach into waitress's internals, in one place.

check() runs when a server of ours is created: if the running waitress no longer works
the way these reaches assume, the server refuses to start with one line naming the
version and what changed, instead of silently serving stock closes.

Tested with waitress 3.0.2. The checks judge the internals, never the version number.
"""

from __future__ import annotations

import inspect
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from waitress import runner, wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import WSGITask

try:
    VERSION = version("waitress")
except PackageNotFoundError:  # pragma: no cover - a source checkout
    VERSION = "unknown"

# W1. BaseWSGIServer.handle_accept() builds each connection with self.channel_class(server,
#     sock, addr, adj, map=...): an instance attribute on each server create_server()
#     returns (or registers in its socket map) gives every connection our channel.
# W2. HTTPChannel.handle_close() is the only close of a connection: it drops the output
#     buffers and calls wasyncore.dispatcher.close(), which removes the channel from the
#     socket map by its _fileno and closes self.socket. A socket whose descriptor has been
#     detached closes as a no-op. wasyncore.dispatcher.recv() calls handle_close() itself
#     when the client closed (recv() returned b"") or reset.
# W3. HTTPChannel.task_class(channel, request) answers each request; Task.set_close_on_finish()
#     before build_response_header() ends the connection after this response with
#     Connection: close; request.headers are keyed like USER_AGENT.
# W4. wasyncore.loop() calls readable() on every dispatcher of the map once per turn, at least
#     every adj.asyncore_loop_timeout seconds, and handle_read_event() when its descriptor is
#     readable: a dispatcher around an epoll descriptor runs the drain engine in that loop.
# W5. waitress.runner.run(argv, _serve=...) parses waitress-serve's options and calls
#     _serve(app, **adjustments).


def problems() -> list[str]:
    found: list[str] = []
    try:
        accept = inspect.getsource(BaseWSGIServer.handle_accept)
    except (OSError, TypeError):
        accept = ""
    if "self.channel_class(" not in accept:
        found.append("BaseWSGIServer.handle_accept no longer builds self.channel_class")
    try:
        close = inspect.getsource(HTTPChannel.handle_close)
    except (OSError, TypeError):
        close = ""
    if "dispatcher.close(self)" not in close:
        found.append("HTTPChannel.handle_close no longer closes through wasyncore.dispatcher.close")
    for owner, name in ((HTTPChannel, "recv"), (HTTPChannel, "del_channel"),
                        (WSGITask, "build_response_header"), (WSGITask, "set_close_on_finish"),
                        (wasyncore.dispatcher, "add_channel"),
                        (wasyncore.dispatcher, "handle_read_event")):
        if not callable(getattr(owner, name, None)):
            found.append(f"{owner.__name__}.{name} is gone")
    if getattr(HTTPChannel, "task_class", None) is not WSGITask:
        found.append("HTTPChannel.task_class is not WSGITask")
    try:
        serve_param = "_serve" in inspect.signature(runner.run).parameters
    except (TypeError, ValueError):
        serve_param = False
    if not serve_param:
        found.append("waitress.runner.run takes no _serve")
    return found


def refusal(found: list[str]) -> str:
    return (f"graceful-close: waitress {VERSION} is not supported ({'; '.join(found)}); "
            "serve with stock waitress or a tested version (3.0)")


def check() -> None:
    found = problems()
    if found:
        raise SystemExit(refusal(found))


def servers_in(server: Any) -> list[BaseWSGIServer]:
    """W1: the WSGI servers create_server() made: the one it returns, or those of a
    MultiSocketServer's socket map."""
    if isinstance(server, BaseWSGIServer):
        return [server]
    return [item for item in getattr(server, "map", {}).values() if isinstance(item, BaseWSGIServer)]


def socket_map(server: Any) -> dict[int, Any]:
    """The wasyncore socket map the server's loop runs (BaseWSGIServer._map)."""
    first = servers_in(server)[0]
    found: dict[int, Any] = first._map
    return found


def run_cli(argv: list[str], serve: Any) -> int:
    """W5."""
    result: int = runner.run(argv, _serve=serve)
    return result
