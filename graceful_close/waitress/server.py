"""create_server and serve: waitress's, with GracefulChannel and the drain engine."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import waitress.server

from .. import metrics
from ..engines.poll import PollDrainEngine
from ..engines.sockets import descriptor_budget
from ..settings import announce, current_settings
from . import _compat
from .channel import GracefulChannel, LingerDispatcher

log = logging.getLogger("waitress")
# waitress has no reload, no recycling and no graceful stop of its own for keep-alive
# connections: the stop's drain and its delay (issue 16) have nothing to hook into.
NOT_APPLIED = ("drain_window", "stop_delay")


def create_server(application: Any, map: dict[int, Any] | None = None, **kw: Any) -> Any:
    """waitress.create_server(app, **adjustments) whose connections close lingering."""
    _compat.check()
    announce("graceful_close.waitress.create_server", log.info, unused=NOT_APPLIED)  # once per process
    if map is None:
        map = {}
    # poll(), not select(), unless asked: lingering sockets hold descriptors a stock server
    # would have closed, and select() fails on any descriptor above 1023, which would end
    # waitress's loop.
    kw.setdefault("asyncore_use_poll", True)
    server = waitress.server.create_server(application, map=map, **kw)
    engine = PollDrainEngine(current_settings())
    budget = descriptor_budget()  # issue 20: None when RLIMIT_NOFILE is unknown
    for each in _compat.servers_in(server):
        each.channel_class = GracefulChannel
        each._gc_engine = engine
        each._gc_budget = budget
    LingerDispatcher(engine, map)
    server._gc_engine = engine
    return server


def finish(server: Any) -> None:
    """The loop ended (a stop): what lingers ends by the stop rule, within stop_linger (waitress
    has no graceful timeout of its own), then the exit summary."""
    engine: PollDrainEngine | None = getattr(server, "_gc_engine", None)
    if engine is not None:
        engine.finish(current_settings().stop_linger)
    metrics.flush_at_worker_exit()


def _stop(signum: int, frame: Any) -> None:
    # Issue 16's drain (core.stopping) is not wired here yet. waitress has no graceful stop of
    # its own to extend: no worker processes, no recycling (--max-requests), no reload, and
    # stock dies at once on SIGTERM; the stop paths the drain exists for are those of servers
    # that restart under a pool. A drain would have to be a stop of ours, run in waitress's
    # loop (stop accepting, Connection: close on every response, close the long-idle channels,
    # end when none is left or at the window), which this SIGTERM handler does not do.
    raise SystemExit(0)  # waitress's run() ends its loop on it, as on Ctrl-C


def serve(app: Any, **kw: Any) -> None:
    """waitress.serve(app, **adjustments) with our channel: logs like waitress-serve, stops on
    SIGTERM as on Ctrl-C (stock waitress dies on SIGTERM without running any code)."""
    _serve(app, "graceful_close.waitress.serve", **kw)


def _serve(app: Any, where: str, **kw: Any) -> None:
    logging.basicConfig()
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    announce(where, log.info, unused=NOT_APPLIED)
    metrics.maybe_start_for_worker()
    server = create_server(app, **kw)
    server.print_listen("Serving on http://{}:{}")
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        finish(server)


def main(argv: list[str] | None = None) -> int:
    """python -m graceful_close.waitress: waitress-serve's options and arguments."""
    def serve_from_cli(app: Any, **kw: Any) -> None:
        _serve(app, "python -m graceful_close.waitress", **kw)

    return _compat.run_cli(sys.argv if argv is None else argv, serve_from_cli)
