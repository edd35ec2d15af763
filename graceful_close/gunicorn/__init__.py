"""gunicorn worker classes whose every client close is a lingering close.

    gunicorn -k graceful_close.gunicorn.ThreadWorker app:app      # gthread + keep-alive policy
    gunicorn -k graceful_close.gunicorn.SyncLingerWorker app:app  # sync (--threads N: ThreadWorker)
    gunicorn -k graceful_close.gunicorn.UvicornWorker app:app     # ASGI on uvicorn (lazy)
    gunicorn -k graceful_close.gunicorn.ASGIWorker app:app        # gunicorn's own asgi (lazy)
    gunicorn -k graceful_close.gunicorn.GeventWorker app:app      # gevent (lazy)

SyncWorker is SyncLingerWorker's first name, an alias: gunicorn swaps any "*SyncWorker" for
stock gthread when --threads > 1 (see _compat, reach 8).

Settings come from `from graceful_close import configure; configure(**kwargs)` in
gunicorn.conf.py, else from the GRACEFUL_CLOSE_* environment variables; the master
validates them at start-up and logs one line with every setting.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..settings import configure, current_settings
from . import _compat
from .workers import SyncLingerWorker, SyncWorker, ThreadWorker
from .workers import _log_to_gunicorn as _log_to_gunicorn  # for asgi_worker, gevent_worker

__all__ = ["ASGIWorker", "GeventWorker", "SyncLingerWorker", "SyncWorker", "ThreadWorker",
           "UvicornWorker", "configure", "current_settings"]

# gunicorn resolves "-k graceful_close.gunicorn.X" with getattr: importing this module must
# not import uvicorn, gevent or gunicorn's asgi package.
_LAZY = {
    "UvicornWorker": "graceful_close.uvicorn.worker",
    "ASGIWorker": "graceful_close.gunicorn.asgi_worker",
    "GeventWorker": "graceful_close.gunicorn.gevent_worker",
}

# Imported in the master only through gunicorn.conf.py (configure) or the hooks: then
# `-k graceful_close.gunicorn.SyncWorker --threads N` is served by our ThreadWorker instead of
# stock gthread (see _compat, reach 8).
_compat.install_sync_worker_guard()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

