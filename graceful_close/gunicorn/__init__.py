"""gunicorn worker classes whose every client close is a lingering close.

    gunicorn -k graceful_close.gunicorn.ThreadWorker app:app   # gthread + keep-alive policy
    gunicorn -k graceful_close.gunicorn.SyncWorker app:app     # sync
    gunicorn -k graceful_close.gunicorn.UvicornWorker app:app  # ASGI (imported lazily)

gunicorn closes client sockets with util.close_graceful (end of every sync
response, error after headers, gthread connections ending) and gthread's
TConn.close (keep-alive expiry, pending expiry, errors, graceful stop). That
close_graceful half-closes and reads on the worker's own thread (the gthread
poller): a client that never closes stalls the whole worker for 2 s, and more
than 64 KiB of unread upload still ends in RST. Here both paths hand the socket
to the process's lingerer thread and return at once.

Settings come from configure(**kwargs) in gunicorn.conf.py, else from the
GRACEFUL_CLOSE_* environment variables; the master validates them at startup.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import gunicorn.util
from gunicorn.http import parser as gunicorn_parser
from gunicorn.workers import gthread, sync

from .. import metrics
from ..core.keepalive import KeepAliveDecision, KeepAlivePolicy
from ..engines.threaded import Lingerer, process_lingerer
from ..settings import Settings, SettingsError

__all__ = ["ASGIWorker", "SyncWorker", "ThreadWorker", "UvicornWorker", "configure", "current_settings"]

# Leave this much of gunicorn's graceful_timeout for the exit itself: the arbiter
# sends SIGKILL when it runs out, and a killed worker resets what still lingers.
STOP_MARGIN = 1.0
# Out of descriptors (lingering sockets hold some): stop accepting this long instead of
# letting accept() raise out of the worker loop; nginx pauses 500 ms as well.
ACCEPT_PAUSE = 0.5
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Attribute on a gunicorn Request: the keep-alive decision for its response.
DECISION_ATTR = "graceful_close_keepalive"
# gthread reads at most this much of a body the app left unread, then closes.
DRAIN_LIMIT: int = getattr(gunicorn_parser, "_DRAIN_MAX_BYTES", 65536)

_settings: Settings | None = None


def configure(**kwargs: Any) -> Settings:
    """Set this server's settings from gunicorn.conf.py; kwargs win over GRACEFUL_CLOSE_* env.

    Validated at once. A bad value exits with the one-line message: this runs while
    gunicorn reads its config file, where an exception would print a traceback.
    The settings live at module level, so the forked workers inherit them.
    """
    global _settings
    try:
        _settings = Settings.from_env(**kwargs)
    except SettingsError as exc:
        raise SystemExit(str(exc)) from None
    return _settings


def current_settings() -> Settings:
    """The configured settings, else those of the environment (raises SettingsError)."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def _hand_off(sock: socket.socket, *_args: Any, **_kwargs: Any) -> None:
    """Drop-in for gunicorn.util.close_graceful(sock, timeout, max_drain)."""
    process_lingerer(current_settings()).hand_off(sock)


def __getattr__(name: str) -> Any:
    # gunicorn resolves "-k graceful_close.gunicorn.UvicornWorker" with getattr:
    # importing this module must not import uvicorn.
    if name == "UvicornWorker":
        from ..uvicorn.worker import UvicornWorker

        return UvicornWorker
    if name == "ASGIWorker":  # gunicorn's own asgi worker, lingering (imports asyncio code)
        from .asgi_worker import ASGIWorker

        return ASGIWorker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _log_to_gunicorn(gunicorn_log: Any) -> None:
    """Our log lines (engine errors, the exit summary) go where gunicorn's error log goes,
    unless the application configured the "graceful_close" logger itself."""
    ours = logging.getLogger("graceful_close")
    error_log = getattr(gunicorn_log, "error_log", None)
    if ours.handlers or not isinstance(error_log, logging.Logger):
        return
    for handler in error_log.handlers:
        ours.addHandler(handler)
    ours.setLevel(error_log.level)
    ours.propagate = False


class _GracefulWorker:
    """Shared by both workers: closes go to the lingerer; it is stopped within gunicorn's limits."""

    cfg: Any
    log: Any
    alive: bool
    notify: Callable[[], None]
    graceful_settings: Settings
    lingerer: Lingerer
    _quick_exit = False
    _term_at: float | None = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Runs in the master at startup: a bad setting stops gunicorn with one line."""
        if not hasattr(gunicorn.util, "close_graceful"):
            # Before 27, gunicorn closed with util.close and our rebinding would route nothing.
            print(f"graceful-close: needs gunicorn >= 27, found {gunicorn.__version__}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        try:
            settings = current_settings()
        except SettingsError as exc:
            print(exc, file=sys.stderr, flush=True)
            sys.exit(1)
        log.info(settings.describe())
        parent = getattr(super(), "check_config", None)
        if parent is not None:
            parent(cfg, log)

    def init_process(self) -> None:
        self.graceful_settings = current_settings()
        self.lingerer = process_lingerer(self.graceful_settings)
        # Every gunicorn path that ends a connection after a response calls
        # util.close_graceful by module attribute; rebinding it here, in the forked
        # worker process that runs only this worker class, routes them all to the
        # lingerer without copying gunicorn's methods.
        gunicorn.util.close_graceful = _hand_off
        _log_to_gunicorn(self.log)
        metrics.maybe_start_for_worker()
        super().init_process()  # type: ignore[misc]  # runs the worker loop; returns at exit

    def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM: graceful stop
        if self._term_at is None:
            self._term_at = time.monotonic()
        super().handle_exit(sig, frame)  # type: ignore[misc]

    def handle_quit(self, sig: int, frame: Any) -> None:  # SIGQUIT, SIGINT: quick stop
        self._quick_exit = True
        super().handle_quit(sig, frame)  # type: ignore[misc]

    def handle_abort(self, sig: int, frame: Any) -> None:  # the arbiter's timeout
        self._quick_exit = True
        super().handle_abort(sig, frame)  # type: ignore[misc]

    def run(self) -> None:
        try:
            super().run()  # type: ignore[misc]
        finally:  # also when handle_quit's sys.exit unwinds the loop
            self.lingerer.stop(self._stop_grace(), tick=self.notify)
            metrics.flush_at_worker_exit()

    def _stop_grace(self) -> float:
        """How long lingering sockets may still run once the worker loop has ended."""
        if self._quick_exit:
            return 0.0
        if self._term_at is not None:
            left = self.cfg.graceful_timeout - (time.monotonic() - self._term_at) - STOP_MARGIN
            return max(0.0, min(self.graceful_settings.linger_time, left))
        # max_requests restart or lost parent: nobody waits for us, but the replacement
        # worker starts only when this one exits, so keep it short.
        return self.graceful_settings.linger_timeout


class _DescriptorShortage:
    """Around accept(): EMFILE and its kin are noted (with a warning), not raised."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.until = 0.0  # when accepting may resume; 0 while nothing went wrong

    def __enter__(self) -> _DescriptorShortage:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if not isinstance(exc, OSError) or exc.errno not in _OUT_OF_DESCRIPTORS:
            return False
        self.log.warning("graceful-close: accept() failed (%s); pausing accepts for %gs",
                         exc.strerror, ACCEPT_PAUSE)
        self.until = time.monotonic() + ACCEPT_PAUSE
        return True


class SyncWorker(_GracefulWorker, sync.SyncWorker):
    """gunicorn's sync worker with lingering closes on the lingerer thread.

    The sync worker serves one request per connection and always answers
    "Connection: close" (gunicorn forces it), so the keep-alive policy has nothing
    to decide here; use ThreadWorker for keep-alive.

    Do not combine it with --threads > 1: gunicorn then replaces every worker class
    whose name ends in "SyncWorker" with its stock gthread worker.
    """

    def accept(self, listener: socket.socket) -> None:
        shortage = _DescriptorShortage(self.log)
        with shortage:
            super().accept(listener)
        if shortage.until:
            # The connection waits in the kernel's backlog; this single-threaded worker has
            # nothing else to do until the lingerer frees descriptors, so waiting blocks no one.
            time.sleep(ACCEPT_PAUSE)


class _Connection(gthread.TConn):
    """gthread's connection plus what the keep-alive policy needs; every close lingers."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.accepted_at = time.monotonic()
        self.requests = 0

    def close(self, graceful: bool = False) -> None:
        # Keep-alive expiry and errors can leave unread client bytes too. Never raises:
        # TConn.close(graceful=True) on a socket already closed raises EBADF and makes
        # finish_request count the connection twice.
        _hand_off(self.sock)

    def wait_for_data(self, timeout: float) -> bool:
        # Copied from TConn.wait_for_data, with poll() for its per-connection epoll: poll()
        # takes no descriptor, so a worker short of them (lingering sockets hold some)
        # still serves the connections it has accepted instead of failing them.
        if self.data_ready:
            return True
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN)
            ready = bool(poller.poll(timeout * 1000))
        except (OSError, ValueError):
            return False
        self.data_ready = ready
        return ready


class ThreadWorker(_GracefulWorker, gthread.ThreadWorker):
    """gunicorn's gthread worker with lingering closes and the keep-alive policy.

    Per request: the request cap, the connection age cap and the User-Agent rules
    decide; a response that ends the connection carries "Connection: close", one
    that keeps it carries "Keep-Alive: timeout=<keepalive>, max=<requests left>".
    After SIGTERM, responses in flight carry "Connection: close".
    """

    keepalive_policy: KeepAlivePolicy

    def init_process(self) -> None:
        self.keepalive_policy = KeepAlivePolicy(current_settings())
        # gthread.accept() builds each connection by the module-global name TConn;
        # rebinding it in this worker process gives every connection our counters and
        # close() without copying accept().
        gthread.TConn = _Connection  # type: ignore[misc]
        super().init_process()

    _accept_paused_until = 0.0

    def accept(self, listener: socket.socket) -> None:
        shortage = _DescriptorShortage(self.log)
        with shortage:
            super().accept(listener)
        if shortage.until:
            # Stock gthread re-raises EMFILE and the worker dies. Unregister the listeners
            # for a moment instead: sleeping here would stall the poller and every
            # connection on it.
            self._accept_paused_until = shortage.until
            self.set_accept_enabled(False)

    def set_accept_enabled(self, enabled: bool) -> None:
        # gthread's loop re-enables accepting on every turn; hold off until the pause ends.
        if enabled and time.monotonic() < self._accept_paused_until:
            return
        super().set_accept_enabled(enabled)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _ConnectionHeaders(self.wsgi, self)

    def handle_request(self, req: Any, conn: _Connection) -> bool:
        conn.requests += 1
        if not req.should_close():  # a client that closes anyway needs no decision
            decision = self.keepalive_policy.decide(conn.requests, conn.accepted_at,
                                                    time.monotonic(), _user_agent(req),
                                                    req.method)
            if not decision.keep_alive:
                req.must_close = True  # gunicorn then answers "Connection: close"
            setattr(req, DECISION_ATTR, decision)
        return super().handle_request(req, conn)


def _user_agent(req: Any) -> str | None:
    for name, value in req.headers:  # gunicorn upper-cases header names
        if name == "USER-AGENT":
            return value
    return None


def _unread_body(req: Any) -> int:
    """Bytes of a Content-Length body the app has not read (0 when unknown)."""
    remaining = getattr(getattr(getattr(req, "body", None), "reader", None), "length", 0)
    return remaining if isinstance(remaining, int) else 0


class _ConnectionHeaders:
    """WSGI wrapper that finishes the connection headers of our HTTP/1 responses.

    gunicorn drops hop-by-hop headers an app sets, so the Keep-Alive header is added
    to gunicorn's Response (the object start_response is bound to) after its filter.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], worker: ThreadWorker) -> None:
        self.app = app
        self.worker = worker

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        resp = getattr(start_response, "__self__", None)
        decision: KeepAliveDecision | None = getattr(getattr(resp, "req", None), DECISION_ATTR, None)
        if decision is None:  # HTTP/2, or a client that asked to close
            return self.app(environ, start_response)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            write = start_response(status, headers, exc_info)
            if not self.worker.alive:
                resp.force_close()  # stopping: the response in flight ends the connection
            elif _unread_body(resp.req) > DRAIN_LIMIT:
                # gthread would announce keep-alive, then give up draining and close.
                resp.force_close()
            elif not resp.should_close() and not any(
                    name == "Keep-Alive" for name, _ in resp.headers):
                value = decision.keep_alive_header(self.worker.cfg.keepalive).decode("latin-1")
                resp.headers.append(("Keep-Alive", value))
            return write

        return self.app(environ, start)
