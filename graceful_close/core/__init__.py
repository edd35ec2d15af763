"""The sans-io core: pure decisions, no sockets, no threads, no event loop."""

from .counters import PROCESS_COUNTERS, Counters
from .keepalive import CloseReason, KeepAliveDecision, KeepAlivePolicy, UserAgentRules
from .linger import Ending, EndReason, LingerState, stop_deadline

__all__ = [
    "PROCESS_COUNTERS", "CloseReason", "Counters", "EndReason", "Ending", "KeepAliveDecision",
    "KeepAlivePolicy", "LingerState", "UserAgentRules", "stop_deadline",
]
