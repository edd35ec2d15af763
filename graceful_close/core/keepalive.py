"""Sans-io keep-alive decisions: request cap, connection age cap, User-Agent rules.

decide() is called once per request with what the server already knows: how
many requests this connection has carried (this one included), when the
connection was accepted, the clock, the request's User-Agent and method.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

from ..settings import Settings
from .counters import PROCESS_COUNTERS, Counters

# Apache's classic BrowserMatch nokeepalive rules, plus the clients that the Apache
# FIN_WAIT_2 notes found never closing idle keep-alive connections (the X11 Netscape
# 3.01 / 3.01Gold builds; Mozilla/2.02 and MSIE 3.01 are already covered).
LEGACY_PATTERNS = (
    r"Mozilla/2",
    r"MSIE 4\.0b2;",
    r"MSIE [2-5]",
    r"Mozilla/3\.01(?:Gold)? \(X11;",
)

UA_CACHE_SIZE = 4096


class CloseReason(str, enum.Enum):
    REQUEST_CAP = "request_cap"
    AGE_CAP = "age_cap"
    USER_AGENT = "user_agent"


class KeepAliveDecision(NamedTuple):
    # A NamedTuple, not a frozen dataclass: built per request, and about 4x cheaper to make.
    keep_alive: bool
    reason: CloseReason | None = None
    remaining_requests: int | None = None  # after this one; None = no cap

    def keep_alive_header(self, idle_timeout: float) -> bytes:
        """The value of an accurate Keep-Alive header for a response that keeps the connection."""
        return keep_alive_value(idle_timeout, self.remaining_requests).encode("latin-1")


def keep_alive_value(idle_timeout: float, remaining_requests: int | None) -> str:
    """The Keep-Alive header's value (keepalive_header=true), the same from every server:
    "timeout=<idle seconds>", and ", max=<requests left>" when the request cap is on."""
    value = f"timeout={int(idle_timeout)}"
    if remaining_requests is not None:
        value += f", max={max(remaining_requests, 0)}"
    return value


def _nginx_msie6(ua: str) -> bool:
    """nginx's msie6 test: 'MSIE 4.', 'MSIE 5.', or 'MSIE 6.' without 'SV1' after it; not Opera."""
    at = ua.find("MSIE ")
    if at < 0 or at + 7 >= len(ua) or "Opera" in ua or ua[at + 6] != ".":
        return False
    major = ua[at + 5]
    return major in "45" or (major == "6" and "SV1" not in ua[at + 8:])


def _nginx_safari(ua: str) -> bool:
    """nginx's safari test: 'Safari/' and 'Mac OS X', and not MSIE, Opera, Gecko/ or Chrome/."""
    if "Opera" in ua or ("MSIE " in ua and ua.find("MSIE ") + 7 < len(ua)):
        return False
    if "Gecko/" in ua or "Chrome/" in ua:
        return False
    return "Safari/" in ua and "Mac OS X" in ua


class UserAgentRules:
    """Compiled nokeepalive rules with a bounded per-User-Agent cache.

    A verdict is (always, on_post): nginx's msie6 preset only disables keep-alive
    once a POST arrives, every other rule disables it for any method.
    """

    def __init__(self, rules: tuple[str, ...]) -> None:
        patterns: list[str] = []
        self._msie6 = self._safari = False
        for rule in rules:
            if rule == "legacy":
                patterns.extend(LEGACY_PATTERNS)
            elif rule == "msie6":
                self._msie6 = True
            elif rule == "safari":
                self._safari = True
            elif rule != "none":
                patterns.append(rule)
        self._regex = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self._cache: dict[str | bytes, tuple[bool, bool]] = {}
        self.active = bool(self._regex or self._msie6 or self._safari)

    def verdict(self, user_agent: str | bytes) -> tuple[bool, bool]:
        """Cached by the raw header value (bytes or str): a repeat costs one dict lookup."""
        hit = self._cache.get(user_agent)
        if hit is None:
            text = user_agent.decode("latin-1") if isinstance(user_agent, bytes) else user_agent
            always = bool(self._regex and self._regex.search(text)) or (
                self._safari and _nginx_safari(text))
            hit = (always, self._msie6 and _nginx_msie6(text))
            if len(self._cache) >= UA_CACHE_SIZE:
                self._cache.clear()  # cheap bound; real traffic has few distinct agents
            self._cache[user_agent] = hit
        return hit

    def disables(self, user_agent: str | bytes | None, method: str | bytes = "GET") -> bool:
        if not self.active or not user_agent:
            return False
        always, on_post = self.verdict(user_agent)
        if always:
            return True
        return on_post and method in ("POST", b"POST")


class KeepAlivePolicy:
    def __init__(self, settings: Settings, counters: Counters = PROCESS_COUNTERS) -> None:
        self.max_requests = settings.keepalive_requests
        self.max_age = settings.keepalive_time
        self.user_agents = UserAgentRules(settings.nokeepalive_user_agents)
        self.counters = counters
        # Keep-alive decisions differ only by the requests left: build each once.
        self._keep: dict[int | None, KeepAliveDecision] = {}

    def decide(self, requests_served: int, connection_started: float, now: float,
               user_agent: str | bytes | None = None,
               method: str | bytes = "GET") -> KeepAliveDecision:
        """requests_served counts the current request (1 for the first one)."""
        remaining = None
        if self.max_requests:
            remaining = max(self.max_requests - requests_served, 0)
            if remaining == 0:
                self.counters.count("keepalive_cap_hits")
                return KeepAliveDecision(False, CloseReason.REQUEST_CAP, 0)
        if self.max_age and now - connection_started >= self.max_age:
            self.counters.count("keepalive_age_hits")
            return KeepAliveDecision(False, CloseReason.AGE_CAP, remaining)
        if self.user_agents.disables(user_agent, method):
            self.counters.count("user_agent_disables")
            return KeepAliveDecision(False, CloseReason.USER_AGENT, remaining)
        decision = self._keep.get(remaining)
        if decision is None:
            if len(self._keep) >= UA_CACHE_SIZE:
                self._keep.clear()
            decision = self._keep[remaining] = KeepAliveDecision(True, None, remaining)
        return decision
