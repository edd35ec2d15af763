"""A uvicorn server's start and stop, as graceful-close needs them.

- At start (uvicorn loads our protocols in Server._serve -> Config.load, in every worker it
  spawns too): the settings and the compat points are checked; a bad value ends the server
  with one line and a non-zero status, `uvicorn --workers N` included (no endless respawn).
- A quick stop (SIGINT to uvicorn; gunicorn's SIGQUIT to our UvicornWorker) ends every
  connection at once, the lingering ones and those closed by the stop itself.
- A graceful stop drains (issue 16, core.stopping): idle connections used within the drain
  window stay open for it and answer their next request with Connection: close. With
  stop_delay, SIGTERM first keeps the server serving normally that long.
- At the end of the stop the exit summary is logged, with or without open connections:
  uvicorn leaves by re-raising the stop signal, so no atexit hook would ever run.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import uvicorn.server

from .. import metrics
from ..core.stopping import drain_window
from ..engines.aio import drain_engine
from ..settings import SettingsError, announce, announced, current_settings
from . import _compat, _mixin


def protocols_loaded() -> None:
    """Our protocols module was imported. Inside a running uvicorn (the CLI, uvicorn.run with
    the protocol named by a string, each spawned worker): the server is starting. Anywhere
    else (tests, gunicorn's master, an application importing the class) nothing happens."""
    server = _compat.running_server()
    if server is not None:
        server_starting(server)


def server_starting(server: uvicorn.server.Server) -> None:
    found = _compat.problems() + _compat.protocol_problems()
    if found:
        _compat.exit_at_startup(_compat.refusal(found))
    try:
        current_settings()  # validates: here a bad value can still stop the start cleanly
    except SettingsError as exc:
        _compat.exit_at_startup(str(exc))
    _announce(_compat.protocol_named(server))
    metrics.maybe_start_for_worker()
    watch_stop(server)


def first_connection(protocol: type) -> None:
    """The first connection of this process: when uvicorn imported our protocols before its
    server ran (uvicorn.run with the class, gunicorn's UvicornWorker), this is where we first
    see the server."""
    metrics.maybe_start_for_worker()
    server = _compat.running_server()
    if server is not None:
        watch_stop(server)
    if not announced():  # imported before the server ran: the line comes now
        _announce(_compat.protocol_named(server) if server is not None
                  else f"{protocol.__module__}:{protocol.__qualname__}")


def _announce(protocol: str) -> None:
    """The one start-up line, in uvicorn's own log (issue 17 item 6)."""
    announce(f"uvicorn --http {protocol}", logging.getLogger("uvicorn.error").info)


_watched: weakref.WeakSet[uvicorn.server.Server] = weakref.WeakSet()


def watch_stop(server: uvicorn.server.Server) -> None:
    """Make the server's stop quick when asked, and log the summary when it is over."""
    if server not in _watched:
        _watched.add(server)
        _compat.around_shutdown(server, before=_before_shutdown, after=_after_shutdown)
        delay = current_settings().stop_delay
        graceful = server.config.timeout_graceful_shutdown
        if graceful:  # the stop itself needs the rest (under gunicorn: its graceful timeout)
            delay = min(delay, graceful / 2)
        if delay > 0:
            _compat.delay_stop(server, delay, logging.getLogger("uvicorn.error").info)


def _after_shutdown() -> None:
    _mixin.end_drain()
    metrics.flush_at_worker_exit()


async def _before_shutdown(server: uvicorn.server.Server, sockets: Any) -> None:
    loop = asyncio.get_running_loop()
    if _compat.stopping_quickly(server):
        _mixin.begin_drain(loop, 0.0)  # no drain: idle connections close at once
        # Server.shutdown() first asks every connection to shut down, which hands the idle
        # and half-received ones to the drain engine, and only then awaits: ending what
        # lingers right after that ends those too, as stock closes them at once.
        loop.call_soon(drain_engine(loop).begin_stop, 0.0)
        return
    if not sockets or _compat.stopping_on_signal(server):
        # Accepting during the drain only helps a worker that recycles itself (--limit-max-
        # requests, gunicorn's --max-requests) while others hold the listening socket. Under
        # a signal the server may be going away for good (gunicorn's master closes its copy
        # on SIGTERM), and when the server made its own sockets (uvicorn alone) nobody else
        # holds them: connections still in the backlog when the last copy closes are reset.
        # Stop accepting first, as stock does; new clients are refused, never reset.
        for listener in server.servers:
            listener.close()
    await _drain(server, loop)


async def _drain(server: uvicorn.server.Server, loop: asyncio.AbstractEventLoop) -> None:
    """Issue 16 (core.stopping): before uvicorn's own shutdown, while the server still
    listens (when its listening sockets are shared with other workers), every response says
    Connection: close; idle connections the client used within the drain window stay open
    (the others close now) until the window ends or none is left (a new connection is served
    once, with Connection: close). Then uvicorn's shutdown closes what is still idle and
    waits for the rest, as it always does."""
    window = drain_window(current_settings(), server.config.timeout_graceful_shutdown)
    drain = _mixin.begin_drain(loop, window)
    connections = server.server_state.connections
    now = loop.time()
    open_at_stop = [c for c in connections if isinstance(c, _mixin.LingeringCloseMixin)]
    for connection in open_at_stop:
        connection._gc_begin_drain(drain, now)
    # Until every connection open at the stop has been answered and closed (a handed-off one
    # leaves the set: lingering closes are the engine's) or the window ends. Connections
    # accepted meanwhile are each answered once, with Connection: close, and uvicorn's
    # shutdown waits for those.
    while not drain.over(loop.time()) and not server.force_exit:
        if not any(connection in connections for connection in open_at_stop):
            break
        await asyncio.sleep(min(0.05, max(0.0, drain.ends - loop.time())))
    drain.quicken(loop.time())
