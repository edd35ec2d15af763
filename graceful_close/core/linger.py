"""Sans-io decisions of a lingering close: when to stop reading and how to close.

A LingerState is created when a connection's write side has been shut down.
The engine feeds it events (bytes read, EOF, error, timer) with a clock value
and gets back None (keep draining) or an Ending (close now, and how).
No sockets, no clocks of its own: everything is an argument.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..settings import Settings


class EndReason(str, enum.Enum):
    EOF = "eof"                      # the client closed: the clean end
    IDLE_TIMEOUT = "idle_timeout"    # nothing read for linger_timeout
    TOTAL_TIMEOUT = "total_timeout"  # linger_time since the half-close
    BYTE_CAP = "byte_cap"            # linger_max_bytes discarded
    ERROR = "error"                  # read failed (e.g. the client reset)
    EVICTED = "evicted"              # the lingering set was full; oldest goes first
    SHUTDOWN = "shutdown"            # the server is stopping


# Endings where the client may still be sending: a close there can turn into RST,
# so the engine may send it on purpose, but only once the client acked everything.
_MAY_ABORT = frozenset({EndReason.IDLE_TIMEOUT, EndReason.TOTAL_TIMEOUT, EndReason.BYTE_CAP,
                        EndReason.EVICTED, EndReason.SHUTDOWN})


# The RST rule, in one place. RST destroys nothing of ours only when the peer has
# acknowledged every byte we sent. After shutdown(SHUT_WR) our FIN takes one sequence
# number of its own and cannot be acked before the data ahead of it: 1 outstanding then
# means only the FIN is unacked (the client delays that ACK), and no data can be lost.
# Engines pass the kernel's count (engines.sockets.unacked_bytes: SIOCOUTQ); None means
# the platform cannot tell, and then nothing is ever aborted.


def nothing_unacked(unacked: int | None, fin_sent: bool) -> bool:
    """True when an RST could not destroy any byte we sent."""
    return unacked is not None and unacked <= (1 if fin_sent else 0)


def bytes_at_stake(unread: int | None, unacked: int | None, fin_sent: bool) -> bool:
    """Whether closing a connection at once (a stopping server) could lose anything:
    unread client bytes (closing over them sends RST) or response bytes not yet
    acknowledged. Unknown counts are at stake."""
    return unread is None or unread > 0 or not nothing_unacked(unacked, fin_sent)


# ---- the stop rule (issue 20), one for every engine ------------------------------------------
# A graceful stop (a quick one ends everything at once) decides once per lingering
# connection, when the stop begins or when the connection is handed off during it (the
# engines first read what had already arrived: bytes in flight at that instant would
# otherwise count as at stake):
# - nothing at stake (bytes_at_stake is false): close at once with a plain close, as the
#   stock servers have closed it already: a stop never waits for it;
# - bytes at stake: the short stop linger. Like Apache's event MPM, whose dying process
#   gives every lingering connection its short linger (2 s since the lingering began,
#   SECONDS_TO_LINGER), it ends settings.stop_linger after its half-close (at once if it
#   has lingered that long), and never after `limit`: what the server's own graceful
#   timeout leaves. Stock gunicorn's close_graceful also lingers at most 2 s.


def stop_deadline(started: float, stop_linger: float, limit: float) -> float:
    """When a connection lingering since `started` ends, once its server stops with bytes
    at stake; `limit` is when the server's own graceful timeout runs out."""
    return min(started + stop_linger, limit)


@dataclass(frozen=True)
class Ending:
    reason: EndReason
    abort_if_acked: bool  # RST allowed when the send queue is empty (nothing unacked)

    @property
    def forced(self) -> bool:
        """Ended by us (a deadline, the byte cap, eviction, a stop), not by the client."""
        return self.reason in _MAY_ABORT

    def aborts(self, unacked: int | None) -> bool:
        """Close with RST (SO_LINGER 0)? `unacked` is the send queue after our half-close."""
        return self.abort_if_acked and nothing_unacked(unacked, fin_sent=True)


class LingerState:
    """One connection between its half-close and its close."""

    __slots__ = ("started", "last_read", "discarded", "ending", "_idle", "_total_deadline",
                 "_max_bytes", "_abort", "_stop_linger", "stopping")

    def __init__(self, settings: Settings, now: float) -> None:
        self.started = now
        self.last_read = now
        self.discarded = 0
        self.ending: Ending | None = None
        self._idle = settings.linger_timeout
        self._total_deadline = now + settings.linger_time
        self._max_bytes = settings.linger_max_bytes
        self._abort = settings.abort_on_timeout
        self._stop_linger = settings.stop_linger
        self.stopping = False  # on_stop() was called: the total deadline is the stop's

    @property
    def total_deadline(self) -> float:
        return self._total_deadline

    @property
    def idle_deadline(self) -> float:
        return self.last_read + self._idle

    @property
    def deadline(self) -> float:
        """When on_timer must next be called; never later than started + linger_time."""
        return min(self.last_read + self._idle, self._total_deadline)

    def on_data(self, nbytes: int, now: float) -> Ending | None:
        """Bytes were read and discarded. Data never means 'done': only EOF does."""
        if self.ending:
            return None
        self.discarded += nbytes
        self.last_read = max(self.last_read, now)
        if self._max_bytes is not None and self.discarded >= self._max_bytes:
            return self._end(EndReason.BYTE_CAP)
        return self.on_timer(now)

    def on_eof(self) -> Ending | None:
        return None if self.ending else self._end(EndReason.EOF)

    def on_error(self) -> Ending | None:
        return None if self.ending else self._end(EndReason.ERROR)

    def on_evict(self) -> Ending | None:
        return None if self.ending else self._end(EndReason.EVICTED)

    def on_shutdown(self) -> Ending | None:
        return None if self.ending else self._end(EndReason.SHUTDOWN)

    def on_quiet_shutdown(self) -> Ending | None:
        """The server stops and nothing is at stake (see bytes_at_stake): a plain close,
        the FIN that went out at the half-close being all the client needs."""
        if self.ending:
            return None
        self.ending = _ENDINGS[EndReason.SHUTDOWN, False]
        return self.ending

    def on_stop(self, now: float, limit: float, at_stake: bool) -> Ending | None:
        """The server stops gracefully (the stop rule above). `at_stake`: what the engine
        learnt from the kernel (bytes_at_stake). Later calls (a closer limit) only ever
        bring the end closer."""
        if self.ending:
            return None
        if not at_stake and not self.stopping:
            return self.on_quiet_shutdown()
        self.stopping = True
        self._total_deadline = min(self._total_deadline,
                                   stop_deadline(self.started, self._stop_linger, limit))
        return self.on_timer(now)

    def on_timer(self, now: float) -> Ending | None:
        if self.ending:
            return None
        if now >= self._total_deadline:
            return self._end(EndReason.SHUTDOWN if self.stopping else EndReason.TOTAL_TIMEOUT)
        if now >= self.last_read + self._idle:
            return self._end(EndReason.IDLE_TIMEOUT)
        return None

    def _end(self, reason: EndReason) -> Ending:
        self.ending = _ENDINGS[reason, self._abort and reason in _MAY_ABORT]
        return self.ending


# Endings are immutable: one of each, not one per closed connection.
_ENDINGS = {(reason, abort): Ending(reason, abort) for reason in EndReason for abort in (False, True)}
