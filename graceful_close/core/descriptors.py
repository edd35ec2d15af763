"""Issue 20: running out of file descriptors, no worse than stock.

Lingering sockets hold descriptors that a stock server would have freed already, and
idle keep-alive connections hold them in both. Under pressure nginx reuses connections
("reusable connections": idle keep-alive ones first); we do the same before the process
reaches RLIMIT_NOFILE, so that a new client is accepted instead of waiting in the
backlog or being dropped (uvloop's EMFILE answer): close idle keep-alive connections
with nothing at stake (nothing unread, every byte acknowledged: a plain close loses
nothing), then evict the oldest lingering ones.

A DescriptorBudget says when and how many. The adapters ask it once per accepted
connection (never per request), with the number of descriptors their connections hold
(open connections plus lingering ones), which they already count.
"""

from __future__ import annotations

# Keep this share of the room free for what the application and the server open besides
# connections (files, database sockets, a connection being accepted).
RESERVE_SHARE = 16
# At most this many connections are freed at once, like nginx's drain of reusable ones.
MAX_BATCH = 32


class DescriptorBudget:
    """How many connections one process may hold before it frees reusable ones."""

    __slots__ = ("capacity", "batch")

    def __init__(self, limit: int, in_use: int) -> None:
        """`limit`: RLIMIT_NOFILE; `in_use`: descriptors open when serving begins
        (listeners, the loop's selector, pipes, logs)."""
        room = max(1, limit - in_use)
        reserve = max(2, room // RESERVE_SHARE)
        self.capacity = max(1, room - reserve)
        # Free a few at once, so that the next connections do not each pay a search.
        self.batch = max(1, min(MAX_BATCH, self.capacity // RESERVE_SHARE))

    def to_free(self, held: int) -> int:
        """How many reusable connections to close now, when connections hold `held`
        descriptors (the one being accepted included); 0 while there is room."""
        if held < self.capacity:
            return 0
        return held - self.capacity + self.batch
