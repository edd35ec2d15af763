"""Keep-alive policy for stock gunicorn workers, as server hooks in gunicorn.conf.py.

    from graceful_close.gunicorn_hooks import on_starting, pre_request  # noqa: F401

What the hooks do: on stock gthread, the request cap, the connection age cap and
the User-Agent rules end a connection by setting req.must_close, so that
response carries "Connection: close" (gunicorn drops an app's own Connection
header). on_starting validates the settings in the master (one line, no traceback).

What they cannot do:
- no lingering close: the connection still ends with gunicorn's own
  util.close_graceful, which blocks the worker (the gthread poller) for up to 2 s
  per client that does not close and gives up after 64 KiB of unread data, then
  the kernel sends RST. Use graceful_close.gunicorn.ThreadWorker for that;
- no "Keep-Alive: timeout, max" header: hooks cannot add hop-by-hop headers;
- the age cap counts from the connection's first request, not from accept
  (a hook never sees the connection before it);
- on the sync worker they change nothing on the wire: it closes after every request.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..core.keepalive import KeepAlivePolicy
from ..settings import announce
from . import _compat, current_settings

__all__ = ["on_starting", "pre_request"]

# Attribute on the per-connection gunicorn unreader: when its first request arrived.
STARTED_ATTR = "graceful_close_started"

_policy: tuple[int, KeepAlivePolicy] | None = None


def _process_policy() -> KeepAlivePolicy:
    """One policy per process (its User-Agent cache is per worker)."""
    global _policy
    if _policy is None or _policy[0] != os.getpid():
        _policy = (os.getpid(), KeepAlivePolicy(current_settings()))
    return _policy[1]


def on_starting(server: Any) -> None:
    """Master, before any worker starts: a gunicorn whose requests no longer carry what
    the hooks use, or a bad setting, stops gunicorn with one line; else one line in
    gunicorn's log says what the hooks do there, with every setting."""
    problem = _compat.check(_compat.request_problems())
    if problem is not None:
        raise SystemExit(problem)
    announce(f"gunicorn hooks on -k {server.cfg.worker_class_str} (keep-alive policy only: "
             "no lingering close, no Keep-Alive header)", server.log.info)


def pre_request(worker: Any, req: Any) -> None:
    """Apply the cap, the age cap and the User-Agent rules to this HTTP/1 request."""
    worker.log.debug("%s %s", req.method, req.path)  # what gunicorn's default hook does
    number = getattr(req, "req_number", None)  # request count on this connection
    unreader = getattr(req, "unreader", None)  # one per connection
    if number is None or unreader is None or req.should_close():
        return  # HTTP/2, or the client closes anyway
    now = time.monotonic()
    started = getattr(unreader, STARTED_ATTR, None)
    if started is None:
        started = now
        setattr(unreader, STARTED_ATTR, now)
    user_agent = next((value for name, value in req.headers if name == "USER-AGENT"), None)
    if not _process_policy().decide(number, started, now, user_agent, req.method).keep_alive:
        req.must_close = True
