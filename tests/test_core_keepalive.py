"""Keep-alive decisions: request cap, age cap, User-Agent presets (Apache and nginx semantics)."""

import pytest

from graceful_close.core import CloseReason, Counters, KeepAlivePolicy, UserAgentRules
from graceful_close.settings import Settings

MODERN_CHROME = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
                 "(KHTML, like Gecko) Chrome/120.0 Safari/537.36")
MAC_SAFARI = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko) Version/17.0 Safari/605.1.15")
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"


def policy(**kw):
    return KeepAlivePolicy(Settings(**kw), counters=Counters())


def test_request_cap_closes_on_the_nth_request():
    p = policy(keepalive_requests=3)
    assert p.decide(1, 0, 0).remaining_requests == 2
    assert p.decide(2, 0, 0).keep_alive
    d = p.decide(3, 0, 0)
    assert not d.keep_alive and d.reason is CloseReason.REQUEST_CAP
    assert p.counters.keepalive_cap_hits == 1


def test_zero_means_no_cap():
    p = policy(keepalive_requests=0, keepalive_time=0)
    d = p.decide(10**6, 0, 10**6)
    assert d.keep_alive and d.remaining_requests is None
    assert d.keep_alive_header(5) == b"timeout=5"


def test_age_cap():
    p = policy(keepalive_time=60)
    assert p.decide(1, 100, 159).keep_alive
    d = p.decide(2, 100, 160)
    assert d.reason is CloseReason.AGE_CAP and p.counters.keepalive_age_hits == 1


def test_keep_alive_header_is_accurate():
    d = policy(keepalive_requests=10).decide(4, 0, 0)
    assert d.keep_alive_header(2.0) == b"timeout=2, max=6"


@pytest.mark.parametrize("ua", [
    "Mozilla/2.02 (X11; I; FreeBSD 2.1.5-RELEASE i386)",
    "Mozilla/3.01 (X11; I; FreeBSD 2.1.5-RELEASE i386)",
    "Mozilla/3.01Gold (X11; I; SunOS 5.5 sun4m)",
    "Mozilla/2.0 (compatible; MSIE 3.01; Windows 95)",
    "Mozilla/3.0 (compatible; MSIE 3.01; Mac_PowerPC)",
    "Mozilla/4.0 (compatible; MSIE 4.0b2; Windows 95)",
    "Mozilla/4.0 (compatible; MSIE 5.5; Windows 98)",
])
def test_legacy_preset_disables(ua):
    assert UserAgentRules(("legacy",)).disables(ua)


@pytest.mark.parametrize("ua", [
    "Mozilla/3.01 (Win95; I)",  # the Apache notes found this build closing properly
    MODERN_CHROME, MAC_SAFARI, FIREFOX, "curl/8.5.0", "python-requests/2.31",
    "Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1)", "",
])
def test_legacy_preset_spares_working_clients(ua):
    assert not UserAgentRules(("legacy",)).disables(ua)


def test_msie6_preset_only_on_post_like_nginx():
    rules = UserAgentRules(("msie6",))
    old = "Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1)"
    assert not rules.disables(old, "GET") and rules.disables(old, "POST")
    assert rules.disables(b"Mozilla/4.0 (compatible; MSIE 5.01; Windows NT)", b"POST")
    assert not rules.disables("Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1; SV1)", "POST")
    assert not rules.disables("Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 6.0)", "POST")
    assert not rules.disables("Opera/9.0 (compatible; MSIE 6.0; Windows)", "POST")


def test_safari_preset_like_nginx():
    rules = UserAgentRules(("safari",))
    assert rules.disables(MAC_SAFARI)
    assert not rules.disables(MODERN_CHROME)  # Chrome/ excludes it
    assert not rules.disables("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0) Safari/604.1")  # no Mac OS X


def test_custom_regex_and_none():
    assert UserAgentRules((r"^BadBot/\d",)).disables("BadBot/2 (x)")
    none = UserAgentRules(("none",))
    assert not none.active and not none.disables("Mozilla/2.02 (X11)")


def test_decisions_are_cached_per_agent():
    rules = UserAgentRules(("legacy",))
    rules.disables("curl/8")
    rules.disables("curl/8")
    assert list(rules._cache) == ["curl/8"]


def test_user_agent_decision_counts():
    p = policy()
    d = p.decide(1, 0, 0, "Mozilla/2.02 (X11; I; FreeBSD)")
    assert d.reason is CloseReason.USER_AGENT and p.counters.user_agent_disables == 1
