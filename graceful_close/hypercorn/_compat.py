"""Every reach into hypercorn's internals (and the asyncio streams it uses), in one place.

check() runs when our config module is imported (in hypercorn's parent process and in
every worker it spawns) and again when a worker starts: if the running hypercorn no
longer works the way these reaches assume, the server refuses to start with one line
naming the version and what changed, instead of silently serving stock closes.

Tested with hypercorn 0.18.0. The checks judge the internals, never the version number.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import hypercorn.asyncio.run as hypercorn_run
import hypercorn.protocol as hypercorn_protocol
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.protocol.h11 import H11Protocol

try:
    VERSION = version("hypercorn")
except PackageNotFoundError:  # pragma: no cover - a source checkout
    VERSION = "unknown"

# ---- what is replaced -----------------------------------------------------------------------
# H1. hypercorn.asyncio.run.worker_serve's _server_callback builds every connection's server
#     from the module-level name TCPServer(app, loop, config, context, state, reader, writer),
#     looked up per connection: replacing the name gives every new connection our subclass.
# H2. hypercorn.asyncio.run.asyncio_worker / uvloop_worker look up worker_serve at call time
#     (partial(worker_serve, ...)): replacing it lets the process wait for its lingering
#     connections after hypercorn's own stop (gather of the connection tasks, lifespan).
# H3. hypercorn.protocol.ProtocolWrapper builds HTTP/1.1 connections from the module-level
#     name H11Protocol (HTTP/2 ones from H2Protocol, which we leave alone).
# ---- what is relied on ----------------------------------------------------------------------
# T1. TCPServer._close() is the only close of a connection (write_eof(), writer.close()):
#     protocol_send(Closed()) and the end of run() call it; _initiate_server_close() (idle
#     timeout, and every idle connection at a stop) closes the writer itself.
# T2. TCPServer attributes: writer (asyncio.StreamWriter), reader, context (its `terminated`
#     event is set when the worker stops), config (graceful_timeout, keep_alive_timeout),
#     protocol (a ProtocolWrapper; its .protocol is the H11Protocol or H2Protocol), loop.
# P1. H11Protocol.stream_send(event) turns the stream's Response into h11 (appending
#     Connection: close once keep_alive_requests >= config.keep_alive_max_requests);
#     _create_stream(request) runs once per request; `connection` is the h11.Connection,
#     `can_read` the event its read loop waits on while h11 is PAUSED, `context` the worker's.
# A1. asyncio.StreamWriter keeps its transport in `_transport` and closes it in __del__
#     unless it is closing: a handed-off transport must not be reachable from it.
# A2. asyncio.StreamReaderProtocol.connection_lost(None) feeds EOF to the reader and wakes
#     drain() waiters: the stream side's bookkeeping of a connection we took over.
# A3. asyncio.StreamReader keeps what it received and nobody read yet in `_buffer`
#     (lingering_close=auto: such bytes are input still pending).

_TCP_SERVER_PARAMS = ["self", "app", "loop", "config", "context", "state", "reader", "writer"]


def problems() -> list[str]:
    """What no longer holds; empty when everything we rely on is there."""
    found: list[str] = []
    if not isinstance(getattr(hypercorn_run, "TCPServer", None), type):
        found.append("hypercorn.asyncio.run.TCPServer is gone")
    if not inspect.iscoroutinefunction(getattr(hypercorn_run, "worker_serve", None)):
        found.append("hypercorn.asyncio.run.worker_serve is gone")
    if not isinstance(getattr(hypercorn_protocol, "H11Protocol", None), type):
        found.append("hypercorn.protocol.H11Protocol is gone")
    try:
        params = list(inspect.signature(TCPServer.__init__).parameters)
    except (TypeError, ValueError):
        params = []
    if params != _TCP_SERVER_PARAMS:
        found.append(f"TCPServer.__init__ takes {params}, not {_TCP_SERVER_PARAMS}")
    for owner, names in ((TCPServer, ("_close", "_initiate_server_close", "run", "protocol_send")),
                         (H11Protocol, ("stream_send", "_create_stream", "_maybe_recycle",
                                        "handle"))):
        for name in names:
            if not inspect.iscoroutinefunction(getattr(owner, name, None)):
                found.append(f"{owner.__name__}.{name} is not a coroutine function")
    try:
        h11_params = list(inspect.signature(H11Protocol.__init__).parameters)
    except (TypeError, ValueError):
        h11_params = []
    if "context" not in h11_params or "send" not in h11_params:
        found.append("H11Protocol.__init__ takes no context or send")
    if not hasattr(asyncio.StreamWriter, "transport"):
        found.append("asyncio.StreamWriter has no transport")
    try:
        reader_init = inspect.getsource(asyncio.StreamReader.__init__)
    except (OSError, TypeError):
        reader_init = ""
    if "self._buffer = bytearray()" not in reader_init:
        found.append("asyncio.StreamReader keeps no _buffer")
    return found


def refusal(found: list[str]) -> str:
    return (f"graceful-close: hypercorn {VERSION} is not supported ({'; '.join(found)}); "
            "serve with stock hypercorn or a tested version (0.18)")


def check() -> None:
    found = problems()
    if found:
        raise SystemExit(refusal(found))


class _HandedOff:
    """What a StreamWriter holds instead of a transport the drain engine took over (A1):
    closing, and every call a no-op, so neither hypercorn nor the writer's __del__ can close
    or write to the lingering socket."""

    __slots__ = ()

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def write(self, data: Any) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


HANDED_OFF = _HandedOff()


def detach_writer(writer: asyncio.StreamWriter) -> None:
    """A1: the writer forgets the transport the engine now owns."""
    writer._transport = HANDED_OFF  # type: ignore[attr-defined]


def reader_saw_eof(reader: asyncio.StreamReader) -> bool:
    """The client's EOF (or an error) reached the stream already: nothing to linger for."""
    return bool(getattr(reader, "_eof", False)) or reader.exception() is not None


def reader_buffered(reader: asyncio.StreamReader) -> int:
    """A3. Bytes the stream reader received from the transport and hypercorn has not read
    yet (StreamReader._buffer); unknown counts as some."""
    buffer = getattr(reader, "_buffer", None)
    return 1 if buffer is None else len(buffer)


def wake(can_read: Any) -> None:
    """P1: set the protocol's can_read event (hypercorn's EventWrapper, whose set() is a
    coroutine) from synchronous code."""
    event = getattr(can_read, "_event", None)
    if isinstance(event, asyncio.Event):
        event.set()


def install(tcp_server: type, worker_serve: Any, h11_protocol: type) -> None:
    """H1-H3: the names hypercorn builds connections and workers from."""
    hypercorn_run.TCPServer = tcp_server  # type: ignore[misc,assignment]
    hypercorn_run.worker_serve = worker_serve
    hypercorn_protocol.H11Protocol = h11_protocol  # type: ignore[misc,assignment]


STOCK_WORKER_SERVE = hypercorn_run.worker_serve


def wrap_app(app: Any, wsgi_max_body_size: int, mode: Any) -> Any:
    """H4. hypercorn.utils.wrap_app: what hypercorn.asyncio.serve does with an app first."""
    from hypercorn.utils import wrap_app as stock

    return stock(app, wsgi_max_body_size, mode)


def run(config: Any) -> int:
    """hypercorn.run.run: the CLI's own start (sockets, workers, reload)."""
    from hypercorn.run import run as stock

    result: int = stock(config)
    return result


def statsd_logger_class() -> Any:
    """H5. hypercorn.asyncio.statsd.StatsdLogger: what worker_serve sets first, as the logger
    class when statsd_host is set and the logger class is hypercorn's own."""
    from hypercorn.asyncio.statsd import StatsdLogger

    return StatsdLogger


def guard_cli(check: Callable[[Any], None]) -> None:
    """H6. The hypercorn command (hypercorn.__main__.main, or `python -m hypercorn`, where it is
    __main__) loads the config, our module among it, then sets the worker class from its
    options and calls the module-level name `run`: wrapping it lets `check(config)` refuse a
    worker class in hypercorn's own process, before it spawns a worker."""
    import hypercorn.run

    stock = hypercorn.run.run
    for name in ("hypercorn.__main__", "__main__"):
        module = sys.modules.get(name)
        if module is None or getattr(module, "run", None) is not stock \
                or not hasattr(module, "_load_config"):
            continue

        def checked_run(config: Any) -> int:
            check(config)
            return stock(config)

        module.run = checked_run  # type: ignore[attr-defined]


def idle_timer_running(tcp_server: Any) -> bool:
    """T3. TCPServer.idle_task (hypercorn's AsyncioSingleTask) holds its keep-alive timer in
    _handle while the connection is idle between requests (restarted on Updated(idle=True),
    stopped on Updated(idle=False))."""
    handle = getattr(getattr(tcp_server, "idle_task", None), "_handle", None)
    return handle is not None and not handle.done()
