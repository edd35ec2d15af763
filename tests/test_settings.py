"""Settings: defaults follow nginx, env and kwargs layer correctly, bad values fail in one line."""

import pytest

from graceful_close.settings import Settings, SettingsError


def test_defaults_follow_nginx():
    s = Settings()
    assert (s.linger_time, s.linger_timeout, s.linger_max_bytes) == (30.0, 5.0, None)
    assert (s.max_lingering, s.abort_on_timeout) == (10000, True)
    assert (s.keepalive_requests, s.keepalive_time) == (1000, 3600.0)
    assert s.nokeepalive_user_agents == ("legacy",)


def test_env_then_kwargs_win():
    env = {"GRACEFUL_CLOSE_LINGER_TIME": "12.5", "GRACEFUL_CLOSE_LINGER_TIMEOUT": "2",
           "GRACEFUL_CLOSE_ABORT_ON_TIMEOUT": "off", "GRACEFUL_CLOSE_LINGER_MAX_BYTES": "1048576",
           "GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS": "legacy, msie6",
           "GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "0"}
    s = Settings.from_env(env, linger_timeout=3.0)
    assert s.linger_time == 12.5 and s.linger_timeout == 3.0
    assert s.abort_on_timeout is False and s.linger_max_bytes == 1 << 20
    assert s.nokeepalive_user_agents == ("legacy", "msie6") and s.keepalive_requests == 0


def test_env_user_agents_as_json_list_keeps_commas_in_regexes():
    s = Settings.from_env({"GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS": '["Bot{1,3}", "none"]'})
    assert s.nokeepalive_user_agents == ("Bot{1,3}", "none")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"linger_time": 0}, "linger_time=0"),
    ({"linger_time": -1}, "linger_time=-1"),
    ({"linger_time": float("nan")}, "linger_time=nan"),
    ({"linger_time": 1e9}, "linger_time=1000000000.0"),
    ({"linger_timeout": "5"}, "linger_timeout='5'"),
    ({"linger_max_bytes": 0}, "linger_max_bytes=0"),
    ({"max_lingering": 0}, "max_lingering=0"),
    ({"max_lingering": True}, "max_lingering=True"),
    ({"abort_on_timeout": "yes"}, "abort_on_timeout='yes'"),
    ({"keepalive_requests": -1}, "keepalive_requests=-1"),
    ({"keepalive_time": -5}, "keepalive_time=-5"),
    ({"nokeepalive_user_agents": ("legacyy",)}, "unknown preset"),
    ({"nokeepalive_user_agents": ("MSIE [",)}, "valid regex"),
    ({"nokeepalive_user_agents": "legacy"}, "nokeepalive_user_agents='legacy'"),
])
def test_invalid_values_fail_with_one_line(kwargs, fragment):
    with pytest.raises(SettingsError) as err:
        Settings(**kwargs)
    message = str(err.value)
    assert fragment in message and "expected" in message and "\n" not in message


@pytest.mark.parametrize("name, raw", [
    ("LINGER_TIME", "soon"), ("ABORT_ON_TIMEOUT", "maybe"), ("MAX_LINGERING", "1.5"),
    ("NOKEEPALIVE_USER_AGENTS", "[not json"),
])
def test_invalid_env_names_the_variable(name, raw):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"GRACEFUL_CLOSE_" + name: raw})
    assert "GRACEFUL_CLOSE_" + name in str(err.value) and "\n" not in str(err.value)


def test_unknown_keyword_is_named():
    with pytest.raises(SettingsError, match="linger_tme"):
        Settings.from_env({}, linger_tme=3)
