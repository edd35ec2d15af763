"""Every reach into uvicorn's and uvicorn-worker's internals, in one place.

Each reach says what it depends on. check() verifies them when uvicorn loads our
protocols and in gunicorn's master for the UvicornWorker; if the running version no
longer works the way they assume, the server refuses to start with one line naming
the version and what changed, instead of silently serving stock closes and stops.

Tested with uvicorn 0.55.0 (and 0.54.0 before it) and uvicorn-worker 0.4.0. The checks judge
the internals, never the version number: a release we have not seen starts as long as
what we rely on is still there.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import multiprocessing
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import uvicorn
import uvicorn.server
import uvicorn.supervisors.multiprocess as uvicorn_multiprocess
from uvicorn.config import STARTUP_FAILURE

VERSION = uvicorn.__version__

# ---- the server's start and stop ------------------------------------------------------------

# S1. uvicorn.server.Server.capture_signals(): while serve() runs, SIGINT and SIGTERM are
#     handled by the bound method Server.handle_exit, installed with signal.signal() (never
#     loop.add_signal_handler, so that it can restore the previous handlers). The handler is
#     how code that uvicorn loads (our protocols) finds the running Server.


def running_server() -> uvicorn.server.Server | None:
    """The uvicorn Server serving in this process, if one is running."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return server if isinstance(server, uvicorn.server.Server) else None


# S5. Server.config.http: the --http value the server was started with, the protocol's
#     "module:Class" string or the class itself.


def protocol_named(server: uvicorn.server.Server) -> str:
    """The HTTP protocol the running server was started with, as --http names it."""
    http = getattr(server.config, "http", None)
    if isinstance(http, str):
        return http
    return f"{getattr(http, '__module__', '?')}:{getattr(http, '__qualname__', http)}"


# S2. Server._captured_signals: the signals Server.handle_exit received, which capture_signals
#     re-raises once the server has stopped. SIGINT there means Ctrl-C (or, in our
#     UvicornWorker, gunicorn's quick stop SIGQUIT, which the worker turns into SIGINT).


def stopping_quickly(server: uvicorn.server.Server) -> bool:
    return signal.SIGINT in server._captured_signals


def stopping_on_signal(server: uvicorn.server.Server) -> bool:
    """Stopped by a signal (SIGTERM, SIGINT), not by --limit-max-requests."""
    return bool(server._captured_signals)


# S3. Server._serve() awaits self.shutdown(sockets=...) once its main loop ends, looked up
#     on the instance, and then returns into capture_signals, which re-raises the stop
#     signal: with the default action the process dies there, so no atexit hook runs. The
#     end of shutdown() is the last moment code of ours runs in a stopping uvicorn. Until
#     shutdown() begins, the server still listens (it closes its servers first thing).
#     Server.shutdown() asks every connection to shut down (connection.shutdown()) before
#     its first await, so a callback scheduled with call_soon() from before it runs after all
#     of them.


def around_shutdown(server: uvicorn.server.Server,
                    before: Callable[[uvicorn.server.Server, Any], Awaitable[None]],
                    after: Callable[[], None]) -> None:
    """Await `before(server, sockets)` as the server's shutdown begins (it still listens then)
    and call `after()` when it is over (connections, tasks, lifespan). `sockets`: the listening
    sockets it was given (uvicorn --workers, gunicorn), None when it created its own."""
    stock_shutdown: Callable[..., Awaitable[None]] = server.shutdown

    async def shutdown(sockets: Any = None) -> None:
        try:
            await before(server, sockets)
            await stock_shutdown(sockets=sockets)
        finally:
            after()

    setattr(server, "shutdown", shutdown)  # noqa: B010 - mypy forbids assigning to a method


# S6. Server.main_loop() calls self.on_tick(counter) every 0.1 s, looked up on the instance,
#     and stops serving when it returns True (should_exit, set by handle_exit on SIGTERM or
#     SIGINT, or --limit-max-requests reached). stop_delay (issue 16) keeps it False a while
#     after a SIGTERM alone.


def delay_stop(server: uvicorn.server.Server, delay: float, log: Callable[[str], None]) -> None:
    """After SIGTERM (not SIGINT, not --limit-max-requests) keep serving normally for `delay`
    seconds before the stop begins."""
    stock_on_tick: Callable[[int], Awaitable[bool]] = server.on_tick
    stop_at: list[float] = []

    async def on_tick(counter: int) -> bool:
        should_exit = await stock_on_tick(counter)
        if (should_exit and server.should_exit and not server.force_exit
                and server._captured_signals == [signal.SIGTERM]):
            now = time.monotonic()
            if not stop_at:
                stop_at.append(now + delay)
                log(f"graceful-close: SIGTERM; serving {delay:g}s more before the stop (stop_delay)")
            return now >= stop_at[0]
        return should_exit

    setattr(server, "on_tick", on_tick)  # noqa: B010 - mypy forbids assigning to a method


# S4. uvicorn --workers N (uvicorn.supervisors.multiprocess): each worker is a spawned
#     multiprocessing process whose target is the bound method Process.target of the
#     supervisor's Process object (kept in the child's multiprocessing.current_process()
#     ._kwargs["target"]). Its always_pong() thread answers each health-check ping of the
#     parent with the pickled value of Process.server.started; the parent unpickles it in
#     Multiprocess.keep_subprocess_alive(). A worker exiting with STARTUP_FAILURE makes the
#     parent stop, but with exit status 0, and every worker prints its own error; a worker
#     exiting otherwise is respawned forever. So a worker that cannot start with our settings
#     answers the ping with an object whose unpickling, in the parent, stops every worker and
#     exits the parent non-zero with the one line.


def exit_at_startup(message: str) -> NoReturn:
    """A uvicorn server cannot start with our settings: exit with one line and a non-zero
    status; under `uvicorn --workers N` stop the supervisor too, instead of being respawned."""
    process = _supervised_worker()
    if process is None:
        raise SystemExit(message)
    server = process.server
    # The pong's payload (a bool to uvicorn's typing, hence setattr).
    setattr(server, "started", _StopSupervisor(message))  # noqa: B010
    deadline = time.monotonic() + 2 * process.config.timeout_worker_healthcheck + 1
    while time.monotonic() < deadline and not server.should_exit:
        time.sleep(0.05)  # the parent pings every 0.5 s; its SIGTERM sets should_exit
    if not server.should_exit:  # never pinged: uvicorn's own stop, status 0
        print(message, file=sys.stderr, flush=True)
    raise SystemExit(STARTUP_FAILURE)


def _supervised_worker() -> uvicorn_multiprocess.Process | None:
    if multiprocessing.parent_process() is None:
        return None
    kwargs = getattr(multiprocessing.current_process(), "_kwargs", None) or {}
    process = getattr(kwargs.get("target"), "__self__", None)
    if isinstance(process, uvicorn_multiprocess.Process) and process._server is not None:
        return process
    return None


class _StopSupervisor:
    """Pickled in a worker, unpickled in uvicorn's supervisor: there it stops everything."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __reduce__(self) -> tuple[Callable[[str], NoReturn], tuple[str]]:
        return _stop_supervisor, (self.message,)


def _stop_supervisor(message: str) -> NoReturn:
    """Runs in uvicorn's supervisor process, inside its health check: every worker fails the
    same way, so end them all (multiprocessing joins them at exit) and exit with the line."""
    for child in multiprocessing.active_children():
        child.terminate()
    raise SystemExit(message)


# ---- uvicorn-worker (gunicorn's UvicornWorker) -------------------------------------------------

# W1. uvicorn_worker.UvicornWorker._install_sigquit_handler() routes SIGQUIT (gunicorn's quick
#     stop) to self.handle_exit(SIGQUIT, None) with loop.add_signal_handler(); the stock
#     handle_exit (gunicorn's Worker) only clears self.alive, which uvicorn never reads. Our
#     worker overrides handle_exit to stop uvicorn quickly.
# W2. uvicorn_worker.UvicornWorker.__init__ builds self.config (a uvicorn Config) from
#     CONFIG_KWARGS and gunicorn's settings; our worker adjusts timeout_graceful_shutdown there.


# ---- the check ---------------------------------------------------------------------------------

@functools.cache
def _source(obj: Any) -> str:
    """Source of a function, once per process: a check costs ~0.1 s of tokenizing, and the
    workers gunicorn forks (every --max-requests restart) inherit their master's answers."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def problems() -> list[str]:
    """What no longer holds in the running uvicorn (empty when all is well)."""
    found = []
    server_cls = uvicorn.server.Server
    if "self.handle_exit" not in _source(server_cls.capture_signals):
        found.append("Server.capture_signals no longer installs Server.handle_exit")
    if "_captured_signals" not in _source(server_cls.__init__):
        found.append("Server has no _captured_signals")
    if "self.on_tick(" not in _source(server_cls.main_loop):
        found.append("Server.main_loop no longer calls self.on_tick()")
    if "self.shutdown(" not in _source(server_cls._serve):
        found.append("Server._serve no longer calls self.shutdown()")
    shutdown = _source(server_cls.shutdown)
    if not 0 <= shutdown.find("connection.shutdown()") < shutdown.find("await "):
        found.append("Server.shutdown no longer shuts connections down before it awaits")
    return found + protocol_problems()


def check_worker() -> list[str]:
    """problems() and protocol_problems() plus the uvicorn-worker reaches of the UvicornWorker."""
    found = problems() + protocol_problems()
    try:
        from uvicorn_worker import UvicornWorker
    except ImportError:
        return [*found, "uvicorn-worker is not installed"]
    if "self.handle_exit" not in _source(getattr(UvicornWorker, "_install_sigquit_handler", None)):
        found.append("uvicorn-worker no longer routes SIGQUIT to handle_exit")
    return found


def refusal(found: list[str]) -> str:
    return (f"graceful-close: uvicorn {VERSION} is not supported: {'; '.join(found)} "
            f"(tested with uvicorn 0.55.0, uvicorn-worker 0.4.0)")


# ---- the HTTP protocols (graceful_close.uvicorn._mixin, protocols, zttp) ----------------------
#
# P1. Every close of uvicorn's h11, httptools and zttp protocols goes through the transport
#     given to connection_made(): self.transport.close() (keep-alive timeout, 400, shutdown,
#     connection_lost) and cycle.transport.close() (Connection: close, HTTP/1.0, 500, app
#     errors), each RequestResponseCycle being built with transport=self.transport. Our
#     ClosingTransport's close() is where the lingering close starts.
# P2. connection_lost(None) is the protocol's whole connection-lost bookkeeping (it leaves
#     server_state.connections, wakes the request cycle, cancels the keep-alive timer and,
#     for httptools, drops the parser). We run it right after handing the socket off.
# P3. server_state.connections: the set of open connections whose shutdown() Server.shutdown
#     calls and which it waits for; the drain engine's LingeringConnection takes the
#     protocol's place in it.
# P4. timeout_keep_alive_task / timeout_keep_alive / timeout_keep_alive_handler: the
#     keep-alive timer, cancelled by every data_received() (its first call,
#     _unset_keepalive_if_required(), which the mixin replaces with the same body) and armed by
#     on_response_complete(). Armed means "idle since the last response" (a stop, or a
#     process short of descriptors, closes such a connection at once when nothing is at
#     stake), and we re-arm it after an early response's unread body.
# P5. self.cycle is the request cycle the protocol creates per request (in httptools'
#     on_headers_complete, in h11's and zttp's handle_events), before the task that runs it
#     starts; its keep_alive, response_started, response_complete, default_headers (written
#     before the app's headers) and send (looked up by run_asgi when the task starts).
#     httptools writes Connection: close itself when keep_alive is False; h11 and zttp do not.
# P6. httptools: self.pipeline, the cycles queued behind the one in flight.
# P7. self.headers (lowercase names) and self.scope["method"] of the current request, for the
#     User-Agent rule; handle_websocket_upgrade() hands self.transport to the WebSocket protocol.
# P8. (issue 18, lingering_close=auto) cycle.scope["headers"] are the cycle's request headers
#     (lowercase names) and cycle.more_body turns False once its whole body was received (no
#     body: at once). send_400_response(msg) is the protocol's answer to a request it cannot
#     parse, which ends the connection. What a protocol holds received and unparsed: h11's
#     conn.trailing_data; httptools parses all it is fed (a new message makes a new
#     self.scope in on_message_begin, a complete one a cycle in self.pipeline); zttp shows
#     nothing, so its adapter notes data arriving after the last message was complete.


class UvicornHTTPProtocol(asyncio.Protocol):
    """What the mixin uses of uvicorn's HTTP protocols, for the type checker only (the
    mixin's base when type checking; object at run time)."""

    loop: asyncio.AbstractEventLoop
    config: Any
    server_state: Any
    transport: asyncio.Transport
    cycle: Any
    headers: list[tuple[bytes, bytes]]
    scope: Any
    timeout_keep_alive: int
    timeout_keep_alive_task: asyncio.TimerHandle | None

    def timeout_keep_alive_handler(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def handle_websocket_upgrade(self, *args: Any) -> None:
        raise NotImplementedError


_PROTOCOL_SOURCE = {
    # method: what its source must contain (P1-P7)
    "timeout_keep_alive_handler": ("self.transport.close()",),
    "connection_lost": ("self.connections.discard(self)", "self.transport.close()"),
    "on_response_complete": ("self.timeout_keep_alive_task = self.loop.call_later(",),
    "data_received": ("self._unset_keepalive_if_required()",),
    "shutdown": ("self.transport.close()", "self.cycle.keep_alive = False"),
    "handle_websocket_upgrade": ("connection_made(self.transport)",),
    "send_400_response": ("self.transport.close()",),
    # replaced by the mixin's, which keeps this body
    "_unset_keepalive_if_required": ("self.timeout_keep_alive_task.cancel()",
                                     "self.timeout_keep_alive_task = None"),
}
_CYCLE_SOURCE = {
    "run_asgi": ("self.send",),
    "send": ("self.default_headers + list(", "self.transport.close()", "self.keep_alive"),
}
_REQUEST_START = {"H11Protocol": "handle_events", "HttpToolsProtocol": "on_headers_complete",
                  "ZttpProtocol": "handle_events"}


def _check_protocol(module: Any, name: str) -> list[str]:
    protocol = getattr(module, name, None)
    cycle = getattr(module, "RequestResponseCycle", None)
    if protocol is None or cycle is None:
        return [f"{module.__name__} has no {name} / RequestResponseCycle"]
    found = []
    wanted = {**_PROTOCOL_SOURCE, _REQUEST_START[name]: ("self.cycle = RequestResponseCycle(",
                                                          "transport=self.transport")}
    for owner, table in ((protocol, wanted), (cycle, _CYCLE_SOURCE)):
        for method, needles in table.items():
            source = _source(getattr(owner, method, None))
            for needle in needles:
                if needle not in source:
                    found.append(f"{owner.__name__}.{method} no longer has `{needle}`")
    if name == "HttpToolsProtocol" and "self.pipeline" not in _source(protocol.on_headers_complete):
        found.append("HttpToolsProtocol no longer queues pipelined cycles in self.pipeline")
    if name == "HttpToolsProtocol" and "self.scope = {" not in _source(protocol.on_message_begin):
        found.append("HttpToolsProtocol.on_message_begin no longer builds a new self.scope")
    if "more_body = False" not in _source(protocol):
        found.append(f"{name} no longer sets cycle.more_body = False at the end of a request")
    return found


def protocol_problems() -> list[str]:
    """What no longer holds in the running uvicorn's HTTP protocols (empty when all is well).
    Only the protocols importable here are checked (httptools and zttp are optional)."""
    import importlib

    found = []
    for module_name, name in (("h11_impl", "H11Protocol"), ("httptools_impl", "HttpToolsProtocol"),
                              ("zttp_impl", "ZttpProtocol")):
        try:
            module = importlib.import_module(f"uvicorn.protocols.http.{module_name}")
        except ImportError:
            continue
        found += _check_protocol(module, name)
    return found
