"""Per-process counters of the engines and the keep-alive policy.

Plain integer attributes. Every update goes through a method that takes one
process-wide lock: updates come from several threads (gthread's pool threads
decide keep-alive, the loop ends lingering connections), and `x += 1` on an
attribute is not atomic under the GIL. Only rare paths count (a connection that
ends, a keep-alive cap that is hit), so the keep-alive hot path never takes it.
"""

from __future__ import annotations

import dataclasses
import threading

from .linger import EndReason

_LOCK = threading.Lock()
_END_FIELDS = {reason: "ended_" + reason.value for reason in EndReason}


@dataclasses.dataclass
class Counters:
    lingering_started: int = 0
    ended_eof: int = 0
    ended_idle_timeout: int = 0
    ended_total_timeout: int = 0
    ended_byte_cap: int = 0
    ended_error: int = 0
    ended_evicted: int = 0
    ended_shutdown: int = 0
    aborted_with_rst: int = 0
    bytes_discarded: int = 0
    keepalive_cap_hits: int = 0
    keepalive_age_hits: int = 0
    user_agent_disables: int = 0
    # issue 16, the stop's drain (core.stopping): requests answered with Connection: close
    # on connections kept open for the drain, idle connections closed at once at the stop
    # (unused for longer than the window), and those still idle when the window ended.
    drain_answered_close: int = 0
    drain_idle_closed: int = 0
    drain_window_closed: int = 0

    def count(self, field: str, amount: int = 1) -> None:
        """Add to one counter, exactly, from any thread."""
        with _LOCK:
            setattr(self, field, getattr(self, field) + amount)

    def started(self) -> None:
        self.count("lingering_started")

    def record_end(self, reason: EndReason, discarded: int, aborted: bool) -> None:
        field = _END_FIELDS[reason]
        with _LOCK:
            setattr(self, field, getattr(self, field) + 1)
            self.bytes_discarded += discarded
            if aborted:
                self.aborted_with_rst += 1

    @property
    def ended(self) -> int:
        return sum(getattr(self, "ended_" + reason.value) for reason in EndReason)

    @property
    def lingering_now(self) -> int:
        return self.lingering_started - self.ended

    def snapshot(self) -> dict[str, int]:
        with _LOCK:
            data = dataclasses.asdict(self)
        data["lingering_now"] = data["lingering_started"] - sum(
            data["ended_" + reason.value] for reason in EndReason)
        return data

    def summary(self) -> str:
        """One log line; only non-zero counters, in field order."""
        parts = [f"{k}={v}" for k, v in self.snapshot().items() if v]
        return "graceful-close: " + (" ".join(parts) if parts else "no lingering close")


# One set per process: engines and policies of a worker process all count here.
PROCESS_COUNTERS = Counters()
