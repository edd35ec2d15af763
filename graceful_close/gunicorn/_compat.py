"""Every reach into gunicorn's internals by our gunicorn workers, in one place.

Each reach says what it depends on. check() (sync and gthread), check_asgi_worker()
and check_gevent_worker() verify at start-up (the master's check_config) that the
running gunicorn still routes its closes and responses through the places we rebind;
if not, the server refuses to start with one line naming gunicorn's version and what
changed. Stock closes are never served silently.

Tested with gunicorn 27.0.1, with and without gunicorn_h1c 0.6.10 (gunicorn's C parser).
The checks judge the internals, never the version number: a release we have not seen
starts as long as what we rely on is still there.

The asgi and gevent sections import gunicorn.asgi, gunicorn.workers.gasgi and gevent
inside their checks only: importing graceful_close.gunicorn must not import them (nor
uvicorn).
"""

from __future__ import annotations

import inspect
import selectors
import socket
import types
from collections.abc import Callable
from typing import Any

import gunicorn
import gunicorn.config
import gunicorn.util
from gunicorn.http import body as gunicorn_body
from gunicorn.http import message as gunicorn_message
from gunicorn.http import parser as gunicorn_parser
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers import base, gthread, sync

from ..engines.sockets import unread_bytes

VERSION = gunicorn.__version__

# 1. gunicorn.util.close_graceful(sock, timeout, max_drain): every sync and gthread path
#    that ends a connection after a response calls it BY MODULE ATTRIBUTE (util.close_graceful):
#    SyncWorker.handle's finally, SyncWorker/ThreadWorker.handle_request after an error
#    mid-response, TConn.close(graceful=True). Rebinding the attribute in a worker process
#    routes them all to the drain engine. Checked: the name in those functions' code.
CLOSE_GRACEFUL_USERS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("sync.SyncWorker.handle", sync.SyncWorker.handle),
    ("sync.SyncWorker.handle_request", sync.SyncWorker.handle_request),
    ("gthread.TConn.close", gthread.TConn.close),
    ("gthread.ThreadWorker.handle_request", gthread.ThreadWorker.handle_request),
)

# 2. gthread.TConn: ThreadWorker.accept() builds every connection by the module-global
#    name TConn; rebinding it gives each connection our subclass (counters, close()).
#    TConn.close() without graceful (keep-alive expiry, errors) calls util.close, which we
#    override in the subclass; TConn.wait_for_data/data_ready is replaced the same way.

# 3. gunicorn.http.wsgi.Response: wsgi.create() builds the response of every HTTP/1
#    request with the module-global Response when no response_class is passed (gthread's
#    handle_request passes none). Response.send_headers() calls default_headers(), which
#    decides "Connection:" from should_close()/must_close: the last moment to choose it.

# 4. gunicorn.http.parser._DRAIN_MAX_BYTES: how much of an unread body gthread drains
#    before it gives up on keep-alive (Parser.finish_body). We announce "Connection: close"
#    up front when more than that is unread, instead of announcing keep-alive and closing.
DRAIN_LIMIT: int = getattr(gunicorn_parser, "_DRAIN_MAX_BYTES", 0)

# 5. Request bodies: req.body.reader is a LengthReader whose .length counts the bytes of a
#    Content-Length body not read yet, or a ChunkedReader whose .parser is None once the
#    last chunk was read. req.unreader/.sock is the connection's socket.
LengthReader = gunicorn_body.LengthReader
ChunkedReader = gunicorn_body.ChunkedReader

# 6. gthread.ThreadWorker.poller: a selectors object created in init_process() and used
#    by the main thread only; wait_for_and_dispatch_events(timeout) runs every turn of
#    run() (also while stopping) and calls key.data(key.fileobj) for each ready key.
#    method_queue.defer(callback, *args) runs a callback on that thread. The drain engine
#    registers lingering sockets in that poller and sweeps after each turn.

# 7. sync.SyncWorker.wait(timeout): select() over self.wait_fds, called by run_for_one and
#    run_for_multiple when no connection is waiting; the sync drain engine's descriptor is
#    added to wait_fds for that call.

# 9. gunicorn.http.message.Request: req_number (this request's number on its connection,
#    1 for the first), unreader (one per connection), must_close (forces "Connection:
#    close"). Used by keepalive_header_for and by the hooks (gunicorn_hooks), which run on
#    stock workers and check this reach in on_starting.

# 8. gunicorn.config.Config.worker_class (and .worker_class_str, the name gunicorn logs): swap
#    any worker class whose name ends in "SyncWorker" for stock gthread when --threads > 1,
#    without importing it. Our sync worker is therefore named SyncLingerWorker; its old name
#    SyncWorker is an alias, and the guard (install_sync_worker_guard) lets gunicorn load it
#    with --threads > 1 too, so that it serves our ThreadWorker (reach 10). The guard acts
#    only when graceful_close is imported in the master (gunicorn.conf.py calling
#    configure(), or the hooks); without it the old name with --threads runs stock gthread.

# 10. gunicorn.arbiter.Arbiter.spawn_worker builds each worker as
#    worker_class(age, ppid, sockets, app, timeout, cfg, log) (base.Worker.__init__'s
#    parameters, positionally): SyncLingerWorker.__new__ reads cfg.threads there and builds our
#    ThreadWorker instead when --threads > 1, as gunicorn builds gthread for sync.
WORKER_CFG_INDEX = 5  # after self: age, ppid, sockets, app, timeout, cfg, log

# 11. Issue 20, idle connections under descriptor pressure: ThreadWorker.keepalived_conns
#     (kept-alive connections waiting for their next request, oldest first, each registered
#     in the poller under its .sock) and .pending_conns (accepted, waiting for their first
#     byte), both deques of TConn, counted in .nr_conns; murder_keepalived() is how gthread
#     itself drops one (deque, poller, nr_conns, close).
# 12. Issue 16, the stop's drain: gthread's run() calls self._cap_keepalive(deadline) once
#     the worker stops, to close kept-alive connections by then (STOP_KEEPALIVE_LINGER, 2 s);
#     TConn.set_timeout() sets conn.timeout = now + cfg.keepalive after each response, so
#     conn.timeout - keepalive is when the connection was last used.


def _names(code: types.CodeType) -> set[str]:
    """Global and attribute names a function (and functions nested in it) looks up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _uses(func: Any, *names: str) -> bool:
    code = getattr(func, "__code__", None)
    return code is not None and set(names) <= _names(code)


def request_problems() -> list[str]:
    """Reach 9, alone: what the hooks need of gunicorn's Request."""
    source = inspect.getsource(gunicorn_message)  # Request and its base Message
    if not isinstance(getattr(gunicorn_message, "Request", None), type):
        return ["gunicorn.http.message.Request is gone"]
    return [f"Request no longer keeps .{name}" for name in ("req_number", "unreader", "must_close")
            if f"self.{name}" not in source]


def problems() -> list[str]:
    """What no longer holds in the running gunicorn (empty when every reach works)."""
    found: list[str] = request_problems()
    if not callable(getattr(gunicorn.util, "close_graceful", None)):
        found.append("gunicorn.util.close_graceful is gone")
    for where, func in CLOSE_GRACEFUL_USERS:
        if not _uses(func, "util", "close_graceful"):
            found.append(f"{where} no longer calls util.close_graceful")
    if sync.util is not gunicorn.util or gthread.util is not gunicorn.util:
        found.append("sync/gthread no longer use gunicorn.util")
    if not isinstance(getattr(gthread, "TConn", None), type):
        found.append("gthread.TConn is gone")
    elif not _uses(gthread.ThreadWorker.accept, "TConn"):
        found.append("gthread.ThreadWorker.accept no longer builds connections with TConn")
    if not isinstance(getattr(gunicorn_wsgi, "Response", None), type):
        found.append("gunicorn.http.wsgi.Response is gone")
    else:
        if not _uses(gunicorn_wsgi.create, "Response"):
            found.append("wsgi.create no longer builds responses with the module's Response")
        if not _uses(gunicorn_wsgi.Response.send_headers, "default_headers"):
            found.append("Response.send_headers no longer calls default_headers")
        if not _uses(gunicorn_wsgi.Response.default_headers, "should_close"):
            found.append("Response.default_headers no longer asks should_close")
    if not isinstance(getattr(gunicorn_parser, "_DRAIN_MAX_BYTES", None), int):
        found.append("gunicorn.http.parser._DRAIN_MAX_BYTES is gone")
    if "length" not in inspect.getsource(gunicorn_body.LengthReader.__init__):
        found.append("LengthReader no longer keeps .length")
    if not _uses(gunicorn_body.ChunkedReader.read, "parser"):
        found.append("ChunkedReader no longer keeps .parser")
    if not _uses(gthread.ThreadWorker.init_process, "poller", "method_queue"):
        found.append("gthread.ThreadWorker no longer creates self.poller in init_process")
    if not _uses(gthread.ThreadWorker.run, "wait_for_and_dispatch_events"):
        found.append("gthread.ThreadWorker.run no longer calls wait_for_and_dispatch_events")
    if not _uses(gthread.ThreadWorker.wait_for_and_dispatch_events, "data", "fileobj"):
        found.append("gthread's poller no longer dispatches key.data(key.fileobj)")
    if not callable(getattr(gthread.PollableMethodQueue, "defer", None)):
        found.append("gthread.PollableMethodQueue.defer is gone")
    if not _uses(sync.SyncWorker.wait, "wait_fds"):
        found.append("sync.SyncWorker.wait no longer selects on self.wait_fds")
    if not _uses(sync.SyncWorker.run_for_one, "wait", "accept"):
        found.append("sync.SyncWorker.run_for_one no longer calls accept() and wait()")
    parameters = list(inspect.signature(base.Worker.__init__).parameters)[1:]
    if parameters[WORKER_CFG_INDEX:WORKER_CFG_INDEX + 1] != ["cfg"]:
        found.append("base.Worker.__init__ no longer takes cfg as its sixth argument")
    if not (_uses(gthread.ThreadWorker.murder_keepalived, "keepalived_conns", "nr_conns", "poller")
            and _uses(gthread.ThreadWorker.murder_pending, "pending_conns")):
        found.append("gthread no longer keeps idle connections in keepalived_conns/pending_conns")
    if not _uses(gthread.ThreadWorker.run, "_cap_keepalive") or not _uses(
            gthread.TConn.set_timeout, "keepalive"):
        found.append("gthread.ThreadWorker.run no longer caps kept-alive connections with "
                     "_cap_keepalive(deadline) at a stop")
    return found


def worker_cfg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Reach 10: the gunicorn Config among the arguments a worker class is called with."""
    if "cfg" in kwargs:
        return kwargs["cfg"]
    return args[WORKER_CFG_INDEX] if len(args) > WORKER_CFG_INDEX else None


def check(found: list[str] | None = None) -> str | None:
    """One line when the running gunicorn no longer routes closes to us, else None."""
    found = problems() if found is None else found
    if not found:
        return None
    return (f"graceful-close: gunicorn {VERSION} is not supported: {'; '.join(found)} "
            "(tested with gunicorn 27.0.1); refusing to serve stock closes")


def route_closes(hand_off: Callable[..., None]) -> None:
    """Reach 1: every close_graceful of this worker process goes to `hand_off`."""
    gunicorn.util.close_graceful = hand_off


def route_connections(connection_class: type) -> None:
    """Reach 2: gthread builds every connection of this worker process with our class."""
    gthread.TConn = connection_class


def route_responses(response_class: type) -> None:
    """Reach 3: every HTTP/1 response of this worker process is built with our class."""
    gunicorn_wsgi.Response = response_class


def unread_over(req: Any, limit: int) -> bool:
    """Reach 5: more than `limit` bytes of this request's body are unread.

    Content-Length: the reader's count. Chunked: the size is unknown until the last
    chunk, so count what has already arrived (the parser's buffer and the socket's
    receive queue); a chunked body still arriving beyond that is drained by gthread
    (up to DRAIN_LIMIT) and, past it, ends the connection with a lingering close.
    """
    reader = req.body.reader if req.body is not None else None
    if reader is None:
        return False
    if isinstance(reader, LengthReader):
        return bool(reader.length > limit)
    if isinstance(reader, ChunkedReader) and reader.parser is not None:
        unreader = req.unreader
        pending = len(unreader.buf.getbuffer())
        sock = getattr(unreader, "sock", None)
        if isinstance(sock, socket.socket) and sock.fileno() >= 0:
            pending += unread_bytes(sock.fileno()) or 0
        return pending > limit
    return False


def request_whole(req: Any) -> bool:
    """Reach 11 (issue 18): all of this request was received off the socket: no body or
    its body read to the end (LengthReader at 0, ChunkedReader done), and nothing of a
    next request buffered behind it in the unreader. Anything else (an EOF-framed body,
    a request object of another parser) is not known to be whole: False."""
    body = getattr(req, "body", None)
    reader = body.reader if body is not None else None
    if reader is None:
        done = True
    elif isinstance(reader, LengthReader):
        done = reader.length == 0
    elif isinstance(reader, ChunkedReader):
        done = reader.parser is None
    else:
        return False
    if not done:
        return False
    buf = getattr(getattr(req, "unreader", None), "buf", None)
    return buf is not None and buf.getbuffer().nbytes == 0


def poller(worker: Any) -> selectors.BaseSelector:
    """Reach 6: gthread's main-thread selector."""
    selector: selectors.BaseSelector = worker.poller
    return selector


def defer(worker: Any) -> Callable[..., None]:
    """Reach 6: run a callback on gthread's main thread."""
    method: Callable[..., None] = worker.method_queue.defer
    return method


def idle_connections(worker: Any) -> list[Any]:
    """Reach 11: gthread's idle connections, kept-alive ones (oldest first), then those
    waiting for their first byte."""
    return [*worker.keepalived_conns, *worker.pending_conns]


def forget_idle(worker: Any, conn: Any) -> None:
    """Reach 11: take an idle connection out of gthread's books (as murder_keepalived
    does), before the caller closes its socket."""
    for idle in (worker.keepalived_conns, worker.pending_conns):
        try:
            idle.remove(conn)
        except ValueError:
            continue
        break
    try:
        worker.poller.unregister(conn.sock)
    except (OSError, KeyError, ValueError):
        pass
    worker.nr_conns -= 1


_original_worker_class: Any = None


def _our_sync_name(cfg: Any) -> bool:
    """`-k graceful_close.gunicorn.SyncWorker` (or any name of ours ending so) with --threads > 1."""
    uri = cfg.settings["worker_class"].get()
    return (isinstance(uri, str) and uri.startswith("graceful_close.") and uri.endswith("SyncWorker")
            and cfg.threads > 1)


def install_sync_worker_guard() -> None:
    """Reach 8: gunicorn loads `-k graceful_close.gunicorn.SyncWorker --threads N` as named (our
    SyncLingerWorker, which then serves our ThreadWorker) instead of running stock gthread."""
    global _original_worker_class
    if _original_worker_class is not None:
        return
    original = gunicorn.config.Config.__dict__.get("worker_class")
    original_str = gunicorn.config.Config.__dict__.get("worker_class_str")
    if not isinstance(original, property) or original.fget is None or \
            not isinstance(original_str, property) or original_str.fget is None:
        return
    _original_worker_class = original
    getter, str_getter = original.fget, original_str.fget

    def worker_class(cfg: Any) -> Any:
        if not _our_sync_name(cfg):
            return getter(cfg)
        loaded = gunicorn.util.load_class(cfg.settings["worker_class"].get())
        if hasattr(loaded, "setup"):
            loaded.setup()
        return loaded

    def worker_class_str(cfg: Any) -> Any:
        return cfg.settings["worker_class"].get() if _our_sync_name(cfg) else str_getter(cfg)

    gunicorn.config.Config.worker_class = property(worker_class)
    gunicorn.config.Config.worker_class_str = property(worker_class_str)


# ---- gunicorn asgi worker (-k graceful_close.gunicorn.ASGIWorker) ----------------------
# What it depends on:
#   1. ASGIWorker._serve() builds each connection's protocol with `lambda: ASGIProtocol(self)`,
#      a lookup of the module-global name gasgi.ASGIProtocol when a connection arrives.
#   2. ASGIProtocol ends every HTTP/1.x and HTTP/2 connection through _close_transport()
#      (parse errors, keep-alive expiry, the end of _handle_connection and of HTTP/2).
#   3. ASGIProtocol._will_close(request, response_requires_close) is the one keep-alive
#      decision: it sets "Connection: close" and the loop ends the connection on True.
#   4. ASGIProtocol keeps self.transport, self._closed, self.req_count (this connection's
#      requests, the current one included) and does its bookkeeping in connection_lost().
#   5. ASGIWorker._shutdown() is the coroutine that ends _serve(); _quick_shutdown is True
#      after SIGINT/SIGQUIT; notify() is the heartbeat, called about once a second.
#   7. With keepalive_header=true: every HTTP/1.x response head is written by
#      _send_response_start(status, headers, request, close), close being what _will_close
#      decided; self._keepalive is gunicorn's --keep-alive.
#   8. Issue 20: ASGIProtocol._keepalive_handle is set while a connection waits for its next
#      request; _keepalive_timeout() ends such a connection (through _close_transport) and
#      wakes its task. ASGIWorker.nr_conns counts the open connections.
ASGI_PROTOCOL_METHODS = ("_close_transport", "_will_close", "connection_made", "connection_lost",
                         "_send_response_start", "_keepalive_timeout", "_arm_keepalive_timer")


def _code(function: object) -> types.CodeType | None:
    code = getattr(function, "__code__", None)
    return code if isinstance(code, types.CodeType) else None


def check_asgi_worker() -> str | None:
    """None when gasgi still routes what ASGIWorker needs; else what changed, in one line."""
    from gunicorn.asgi.protocol import ASGIProtocol
    from gunicorn.workers import gasgi

    version = f"gunicorn {VERSION}"
    serve = _code(getattr(gasgi.ASGIWorker, "_serve", None))
    handle = _code(getattr(ASGIProtocol, "_handle_connection", None))
    if getattr(gasgi, "ASGIProtocol", None) is not ASGIProtocol or serve is None or handle is None:
        return f"{version}: gunicorn.workers.gasgi no longer has ASGIWorker._serve and ASGIProtocol"
    if "ASGIProtocol" not in _names(serve):
        return f"{version}: gasgi.ASGIWorker._serve no longer builds connections from gasgi.ASGIProtocol"
    missing = [name for name in ASGI_PROTOCOL_METHODS if not callable(getattr(ASGIProtocol, name, None))]
    if missing or not callable(getattr(gasgi.ASGIWorker, "_shutdown", None)):
        return f"{version}: gasgi's ASGIProtocol/ASGIWorker lost {', '.join(missing) or '_shutdown'}"
    if not {"_close_transport", "req_count"} <= _names(handle):
        return (f"{version}: ASGIProtocol._handle_connection no longer counts requests in "
                "req_count and ends connections with _close_transport")
    start = _code(getattr(ASGIProtocol, "_send_response_start", None))
    init = _code(vars(ASGIProtocol).get("__init__"))
    if start is None or init is None or "_keepalive" not in _names(init) or \
            start.co_varnames[:5] != ("self", "status", "headers", "request", "close"):
        return f"{version}: ASGIProtocol._send_response_start(status, headers, request, close) changed"
    return asgi_parser_problem()


#   6. gunicorn_h1c, the C parser of gunicorn[fast] (--http-parser fast, and auto when it is
#      installed): ASGIProtocol caches what it found of gunicorn_h1c in class attributes _h1c_*.
#      The classmethod _check_h1c_protocol_available() writes them on `cls`, the class it is
#      called on, while _setup_callback_parser() and _handle_h1c_exception() read them from
#      ASGIProtocol itself. Called on our subclass first, the cache lands on the subclass and
#      ASGIProtocol's stays empty: `--http-parser fast` then raises in every connection_made()
#      (the client gets nothing) and `auto` silently takes the pure-Python parser where stock
#      takes H1CProtocol. share_asgi_parser_cache() fills ASGIProtocol's own cache, once per
#      process before any connection, so our subclass inherits it and never writes its own.
def share_asgi_parser_cache(protocol_class: Any) -> str | None:
    """Reach 6: make `protocol_class` (a subclass of ASGIProtocol) choose gunicorn's HTTP/1
    parser exactly as ASGIProtocol does. None when it does, else what differs, in words."""
    from gunicorn.asgi.protocol import ASGIProtocol

    check = getattr(ASGIProtocol, "_check_h1c_protocol_available", None)
    setup = _code(getattr(ASGIProtocol, "_setup_callback_parser", None))
    if check is None:
        # No class-level cache to share: acceptable only if the parser choice no longer uses one.
        if setup is not None and any(name.startswith("_h1c_") for name in _names(setup)):
            return ("ASGIProtocol._setup_callback_parser reads _h1c_* but "
                    "_check_h1c_protocol_available is gone")
        return None
    stock_answer = check()  # on ASGIProtocol: fills ASGIProtocol's cache (imports gunicorn_h1c)
    ours_answer = protocol_class._check_h1c_protocol_available()
    own = sorted(name for name in vars(protocol_class) if name.startswith("_h1c_"))
    differs = [name for name in vars(ASGIProtocol) if name.startswith("_h1c_")
               and getattr(protocol_class, name) is not getattr(ASGIProtocol, name)]
    if own or differs or ours_answer != stock_answer:
        return (f"{protocol_class.__name__} would not choose gunicorn's HTTP/1 parser as ASGIProtocol "
                f"does (own or differing {', '.join(own + differs) or '_h1c_available'})")
    return None


def asgi_parser_problem() -> str | None:
    """The start-up check of reach 6, for our ASGIWorker's protocol (also fills the cache)."""
    from .asgi_worker import LingeringASGIProtocol

    problem = share_asgi_parser_cache(LingeringASGIProtocol)
    return None if problem is None else f"gunicorn {VERSION}: {problem}"


# ---- gevent worker (-k graceful_close.gunicorn.GeventWorker) ---------------------------
# What it depends on:
#   1. AsyncWorker.handle() ends every connection with util.close(client), looked up on the
#      gunicorn.util module at call time (GeventWorker rebinds it in its worker process).
#   2. gevent's StreamServer closes the client socket object once the handler returns, so the
#      engine takes the descriptor out of it (socket.detach()).
#   3. gunicorn's Request numbers the requests of a connection (req_number) and keeps the
#      connection's unreader (req.unreader), where the policy keeps per-connection limits.
#   4. With keepalive_header=true: AsyncWorker.handle_request builds each response with
#      wsgi.create(), and so with the module-global wsgi.Response (reach 3), whose
#      default_headers() writes "Connection:" from should_close().
def check_gevent_worker() -> str | None:
    """None when gunicorn still routes what GeventWorker needs; else what changed, in one line."""
    from gunicorn.workers import ggevent  # imports gevent

    version = f"gunicorn {VERSION}"
    handle = _code(getattr(ggevent.AsyncWorker, "handle", None))
    if not callable(getattr(gunicorn.util, "close", None)) or handle is None or (
            "close" not in handle.co_names):
        return f"{version}: AsyncWorker.handle no longer ends connections with util.close"
    init = _code(gunicorn_message.Request.__init__)
    if init is None or not {"req_number", "unreader"} <= set(init.co_names) | set(init.co_varnames):
        return f"{version}: http.message.Request no longer has req_number and unreader"
    if not _uses(ggevent.AsyncWorker.handle_request, "wsgi", "create") or \
            not _uses(gunicorn_wsgi.create, "Response") or \
            not _uses(gunicorn_wsgi.Response.default_headers, "should_close"):
        return f"{version}: AsyncWorker.handle_request no longer builds responses with wsgi.Response"
    return None
