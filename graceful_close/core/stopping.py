"""Sans-io decisions of a stop that drains by answering (issue 16).

A load balancer or a client pool keeps connections open and reuses them. When a stopping
server closes an idle pooled connection at the instant the pool sends a request on it, the
request gets no answer (EOF or RST, a 502 behind a proxy). Like Envoy's drain and gunicorn
27's gthread, a graceful stop here keeps the idle connections that the client used recently
open for a short drain window and answers the next request on each with Connection: close,
so the pool retires the connection itself, after a complete response:

- an idle connection used within the window (its last response, or its accept, less than
  `window` seconds ago) stays open until the window ends; a request arriving on it is
  served, with Connection: close;
- an idle connection unused for longer closes at once: a pool that has not used it for
  that long is unlikely to fire on it within the next round trip, and a stop with
  long-idle clients stays as quick as stock's;
- when no connection is left the server stops at once (the servers wait for their open
  connections already); those still idle when the window ends close then, with the
  lingering close;
- requests in flight finish with Connection: close, as before; a quick stop (SIGINT,
  SIGQUIT) has no window.

The window is settings.drain_window, never beyond what the server's own graceful timeout
leaves. No sockets and no clocks: every time is an argument.
"""

from __future__ import annotations

from ..settings import Settings


def drain_window(settings: Settings, graceful_left: float | None) -> float:
    """How long the drain lasts: drain_window, within `graceful_left` (what the server's own
    graceful timeout leaves after the stop begins, None when it has none), keeping half a
    second of it for the lingering closes that follow."""
    window = settings.drain_window
    if graceful_left is not None:
        window = min(window, max(0.0, graceful_left - 0.5))
    return window


class StopDrain:
    """One server's graceful stop, from its start (`now`) to the end of the drain window."""

    __slots__ = ("started", "window", "ends")

    def __init__(self, window: float, now: float) -> None:
        self.started = now
        self.window = window
        self.ends = now + window

    def keeps_open(self, last_used: float, now: float) -> bool:
        """An idle keep-alive connection last used (last response completed, or accepted)
        at `last_used`: True to keep it open until the window ends and answer its next
        request with Connection: close, False to close it now."""
        return now < self.ends and now - last_used < self.window

    def over(self, now: float) -> bool:
        """The window has ended: what is still idle closes now."""
        return now >= self.ends

    def quicken(self, now: float) -> None:
        """A quick stop arrived during the drain: it ends now."""
        self.ends = min(self.ends, now)


__all__ = ["StopDrain", "drain_window"]
