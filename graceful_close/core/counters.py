"""Per-process counters of the engines and the keep-alive policy.

Plain integer attributes: each engine updates its counters from one thread (the
lingerer thread, or the event loop), so the hot path takes no extra lock.
"""

from __future__ import annotations

import dataclasses

from .linger import EndReason


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

    def record_end(self, reason: EndReason, discarded: int, aborted: bool) -> None:
        field = "ended_" + reason.value
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
        data = dataclasses.asdict(self)
        data["lingering_now"] = self.lingering_now
        return data

    def summary(self) -> str:
        """One log line; only non-zero counters, in field order."""
        parts = [f"{k}={v}" for k, v in self.snapshot().items() if v]
        return "graceful-close: " + (" ".join(parts) if parts else "no lingering close")


# One set per process: engines and policies of a worker process all count here.
PROCESS_COUNTERS = Counters()
