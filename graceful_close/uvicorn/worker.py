"""gunicorn worker running uvicorn with the lingering-close protocols.

    gunicorn -k graceful_close.uvicorn_worker.UvicornWorker app:app
    gunicorn -k graceful_close.gunicorn.UvicornWorker app:app       # the same class

Built on the `uvicorn-worker` package's UvicornWorker. What changes:
- the protocol: graceful_close.uvicorn's (httptools when installed, else h11);
- settings and the uvicorn/uvicorn-worker internals we rely on (graceful_close.uvicorn._compat)
  are checked in gunicorn's master: one line and no worker boots if either is wrong;
- uvicorn's stop is bounded inside gunicorn's --graceful-timeout, and drains first while the
  worker still accepts on gunicorn's shared socket (issue 16, graceful_close.uvicorn.lifecycle);
- SIGQUIT (gunicorn's quick stop, which SIGINT to the master sends) stops uvicorn at once:
  lingering connections and half-received requests end now. Stock ignored it until SIGKILL;
- the counters are flushed (snapshot, summary line) when the worker exits.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from uvicorn_worker import UvicornWorker as _StockUvicornWorker

from .. import metrics
from ..settings import announce
from . import _compat, lifecycle

# gunicorn SIGKILLs a worker graceful_timeout seconds after SIGTERM; uvicorn must be
# done (requests finished, lingering connections ended) a little before that.
GRACEFUL_MARGIN = 1.0


class UvicornWorker(_StockUvicornWorker):
    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto",
                                     "http": "graceful_close.uvicorn:AutoHTTPProtocol"}

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Runs in gunicorn's master: a bad GRACEFUL_CLOSE_* value, or a uvicorn that no longer
        works the way we rely on, stops it with one line instead of every worker failing."""
        found = _compat.check_worker()
        if found:
            raise SystemExit(_compat.refusal(found))
        announce(f"gunicorn -k {cfg.worker_class_str}", log.info)
        parent = getattr(super(), "check_config", None)
        if parent is not None:
            parent(cfg, log)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.timeout_graceful_shutdown is None:
            graceful = float(self.cfg.graceful_timeout)
            self.config.timeout_graceful_shutdown = max(graceful - GRACEFUL_MARGIN, graceful / 2)

    def init_signals(self) -> None:
        super().init_signals()
        # uvicorn re-raises SIGTERM/SIGINT once it has stopped, and with the default action
        # the worker dies before any `finally`: flush the counters on the way out instead.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _flush_then_die)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn-worker's SIGQUIT handler (gunicorn's quick stop, and what SIGINT to the
        arbiter sends): the stock one only clears self.alive, which uvicorn never reads, so
        the worker ran on until gunicorn's SIGKILL. Stop uvicorn as on SIGINT, which our
        stop watch turns into ending every connection at once."""
        super().handle_exit(sig, frame)
        server = _compat.running_server()
        if server is not None:
            lifecycle.watch_stop(server)
        signal.raise_signal(signal.SIGINT)

    def run(self) -> None:
        try:
            super().run()
        finally:
            metrics.flush_at_worker_exit()


def _flush_then_die(sig: int, frame: FrameType | None) -> None:
    metrics.flush_at_worker_exit()
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)


class UvicornH11Worker(UvicornWorker):
    """The h11 protocol on the asyncio loop (pure Python, like uvicorn-worker's)."""

    CONFIG_KWARGS = {"loop": "asyncio", "http": "graceful_close.uvicorn:H11Protocol"}


__all__ = ["UvicornH11Worker", "UvicornWorker"]
