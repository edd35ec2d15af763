"""Settings: defaults follow nginx, env and kwargs layer correctly, bad values fail in one line."""

import dataclasses
import logging
import os
import subprocess
import sys

import pytest

from graceful_close import settings
from graceful_close.settings import Settings, SettingsError


def test_defaults_follow_nginx():
    s = Settings()
    assert (s.linger_time, s.linger_timeout, s.linger_max_bytes) == (30.0, 5.0, None)
    assert (s.max_lingering, s.abort_on_timeout) == (10000, False)  # issue 20: FIN, like nginx
    assert (s.keepalive_requests, s.keepalive_time) == (1000, 3600.0)
    assert s.nokeepalive_user_agents == ("legacy",)
    assert s.stop_linger == 2.0  # Apache's short linger of a dying process (issue 20)


def test_env_then_kwargs_win():
    env = {"GRACEFUL_CLOSE_LINGER_TIME": "12.5", "GRACEFUL_CLOSE_LINGER_TIMEOUT": "2",
           "GRACEFUL_CLOSE_ABORT_ON_TIMEOUT": "off", "GRACEFUL_CLOSE_LINGER_MAX_BYTES": "1048576",
           "GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS": "legacy, msie6",
           "GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "0", "GRACEFUL_CLOSE_STOP_LINGER": "0.5"}
    s = Settings.from_env(env, linger_timeout=3.0)
    assert s.stop_linger == 0.5
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
    ({"stop_linger": -1}, "stop_linger=-1"),
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


# ---- issue 12 item 11: valid but suspicious settings, and the one settings path ------------

@pytest.fixture
def fresh_settings(monkeypatch):
    """No GRACEFUL_CLOSE_* variable from outside, nothing configured, no warning given yet;
    configure()'s exports to os.environ are undone afterwards."""
    for name in [n for n in os.environ if n.startswith("GRACEFUL_CLOSE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    settings.reset_for_tests()
    yield
    settings.reset_for_tests()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_unknown_variable_warns_once_with_the_known_names(fresh_settings, caplog):
    env = {"GRACEFUL_CLOSE_LINGER_TIMOUT": "3", "GRACEFUL_CLOSE_METRICS_DIR": "/tmp/m"}
    Settings.from_env(env)
    Settings.from_env(env)
    warned = _warnings(caplog)
    assert len(warned) == 1, warned
    assert "GRACEFUL_CLOSE_LINGER_TIMOUT" in warned[0] and "\n" not in warned[0]
    assert "GRACEFUL_CLOSE_LINGER_TIMEOUT" in warned[0]  # the known names, to spot the typo
    ignored = warned[0].split("; known")[0]
    assert "LINGER_TIMOUT" in ignored and "METRICS_DIR" not in ignored  # metrics variables are known


def test_known_variables_give_no_warning(fresh_settings, caplog):
    Settings.from_env({"GRACEFUL_CLOSE_LINGER_TIMEOUT": "3", "GRACEFUL_CLOSE_METRICS_PORT": "9"})
    assert _warnings(caplog) == []


def test_linger_timeout_longer_than_linger_time_warns(fresh_settings, caplog):
    s = Settings.from_env({"GRACEFUL_CLOSE_LINGER_TIME": "2", "GRACEFUL_CLOSE_LINGER_TIMEOUT": "5"})
    assert (s.linger_time, s.linger_timeout) == (2.0, 5.0)  # accepted: linger_time bounds it
    warned = _warnings(caplog)
    assert len(warned) == 1 and "linger_timeout=5" in warned[0] and "linger_time=2" in warned[0]


@pytest.mark.parametrize("raw", ["1.5", "ten", "1e3"])
def test_non_integer_keepalive_requests_says_an_integer(raw):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": raw})
    assert "GRACEFUL_CLOSE_KEEPALIVE_REQUESTS" in str(err.value)
    assert "expected an integer" in str(err.value) and "a number" not in str(err.value)


@pytest.mark.parametrize(("name", "raw", "accepted"), [
    ("LINGER_TIME", "abc", "a number of seconds > 0 and <= 86400"),
    ("DRAIN_WINDOW", "soon", "a number of seconds >= 0 and <= 86400"),
    ("KEEPALIVE_REQUESTS", "1.5", "an integer >= 0 (0 = no cap)"),
    ("MAX_LINGERING", "lots", "an integer from 1 to 10000000"),
])
def test_text_that_is_no_number_gets_the_accepted_range(name, raw, accepted):
    """Not a number at all: the one line still names the variable, the text and the range."""
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"GRACEFUL_CLOSE_" + name: raw})
    assert str(err.value) == f"graceful-close: invalid GRACEFUL_CLOSE_{name}={raw!r}: expected {accepted}"


def test_configure_exports_to_the_environment_for_spawned_workers(fresh_settings):
    """A spawned process sees what configure() set (uvicorn --workers uses spawn)."""
    configured = settings.configure(keepalive_requests=2, linger_timeout=1.5)
    assert settings.current_settings() is configured
    code = ("from graceful_close.settings import current_settings as c; s = c(); "
            "print(s.keepalive_requests, s.linger_timeout, s.nokeepalive_user_agents)")
    done = subprocess.run([sys.executable, "-c", code], env=os.environ, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.split() == ["2", "1.5", "('legacy',)"], done.stderr


def test_configure_and_startup_exit_with_one_line(fresh_settings):
    with pytest.raises(SystemExit) as ended:
        settings.configure(linger_time="abc")
    assert "linger_time='abc'" in str(ended.value.code) and "\n" not in str(ended.value.code)
    os.environ["GRACEFUL_CLOSE_LINGER_TIME"] = "abc"
    with pytest.raises(SettingsError):
        settings.current_settings()
    with pytest.raises(SystemExit) as ended:
        settings.startup_settings()
    assert "GRACEFUL_CLOSE_LINGER_TIME" in str(ended.value.code) and "\n" not in str(ended.value.code)


def test_to_env_round_trips():
    s = Settings(linger_time=7.5, linger_max_bytes=4096, abort_on_timeout=False,
                 nokeepalive_user_agents=("Bot{1,3}", "msie6"))
    assert Settings.from_env(s.to_env()) == s


def test_keepalive_header_is_off_by_default_and_parsed_from_the_environment():
    """keepalive_header (the gunicorn engineer's addition): off like nginx; env true/false."""
    assert Settings().keepalive_header is False
    assert Settings.from_env({"GRACEFUL_CLOSE_KEEPALIVE_HEADER": "on"}).keepalive_header is True
    assert Settings.from_env({"GRACEFUL_CLOSE_KEEPALIVE_HEADER": "0"}).keepalive_header is False
    with pytest.raises(SettingsError, match="GRACEFUL_CLOSE_KEEPALIVE_HEADER='maybe'"):
        Settings.from_env({"GRACEFUL_CLOSE_KEEPALIVE_HEADER": "maybe"})
    with pytest.raises(SettingsError, match="keepalive_header=1: expected true or false"):
        Settings(keepalive_header=1)  # type: ignore[arg-type]
    assert Settings.from_env(Settings(keepalive_header=True).to_env()).keepalive_header is True


# ---- issue 17 items 7 and 8: errors name what the user wrote, where they wrote it ----------

@pytest.mark.parametrize("raw", ['{"a": 1}', '"legacy"', '["a", 1]', "[not json", "{", '[["a"]]'])
def test_user_agents_that_look_like_json_must_be_a_json_list_of_strings(raw):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS": raw})
    message = str(err.value)
    assert f"GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS={raw!r}" in message, message
    assert "JSON list of strings" in message and "\n" not in message


def test_a_json_list_of_strings_and_comma_separated_rules_are_accepted():
    env = "GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS"
    assert Settings.from_env({env: ' ["Bot{1,3}", "msie6"] '}).nokeepalive_user_agents == \
        ("Bot{1,3}", "msie6")
    assert Settings.from_env({env: "[]"}).nokeepalive_user_agents == ()
    assert Settings.from_env({env: "safari, Bot/1"}).nokeepalive_user_agents == ("safari", "Bot/1")


@pytest.mark.parametrize("name, raw", [
    ("LINGER_TIME", "-1"), ("LINGER_TIMEOUT", "0"), ("KEEPALIVE_TIME", "1e9"),
    ("MAX_LINGERING", "0"), ("KEEPALIVE_REQUESTS", "-3"), ("LINGER_MAX_BYTES", "0"),
    ("NOKEEPALIVE_USER_AGENTS", "MSIE ["), ("NOKEEPALIVE_USER_AGENTS", "legacyy"),
])
def test_env_range_errors_name_the_variable_and_the_text_written(name, raw):
    """Not `invalid linger_time=-1.0` (the field and the parsed value): the variable the user
    set and exactly what they wrote there."""
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"GRACEFUL_CLOSE_" + name: raw})
    message = str(err.value)
    assert message.startswith(f"graceful-close: invalid GRACEFUL_CLOSE_{name}={raw!r}: expected "), message
    assert f"{name.lower()}=" not in message and "\n" not in message


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(SettingsError, match=r"did you mean legacy\?"):
        Settings.from_env({"GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS": "legacyy"})


def test_configure_errors_name_the_keyword(fresh_settings):
    """A keyword argument's error names the keyword and the value passed, even when the
    environment sets the same setting."""
    os.environ["GRACEFUL_CLOSE_LINGER_TIME"] = "7"
    with pytest.raises(SystemExit) as ended:
        settings.configure(linger_time=-1)
    assert str(ended.value.code).startswith("graceful-close: invalid linger_time=-1: expected")
    with pytest.raises(SystemExit, match=r"linger_tme \(did you mean linger_time\?\)"):
        settings.configure(linger_tme=3)


def test_unknown_variable_suggests_the_nearest_known_name(fresh_settings, caplog):
    Settings.from_env({"GRACEFUL_CLOSE_LINGER_TIMOUT": "3", "GRACEFUL_CLOSE_KEEPALIVE_HEADERS": "1"})
    warned = _warnings(caplog)
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert "GRACEFUL_CLOSE_LINGER_TIMOUT (did you mean GRACEFUL_CLOSE_LINGER_TIMEOUT?)" in warned[0]
    assert "GRACEFUL_CLOSE_KEEPALIVE_HEADERS (did you mean GRACEFUL_CLOSE_KEEPALIVE_HEADER?)" in warned[0]


def test_describe_names_every_setting():
    """Issue 17 item 6: the start-up line shows every setting, new ones included."""
    line = Settings(keepalive_header=True, max_lingering=7,
                    nokeepalive_user_agents=("msie6", "Bot{1,3}")).describe("gunicorn X")
    assert line.startswith("graceful-close: gunicorn X; ") and "\n" not in line
    for field in dataclasses.fields(Settings):
        assert f" {field.name}=" in line, field.name
    assert "max_lingering=7" in line and "keepalive_header=true" in line
    assert 'nokeepalive_user_agents=["msie6", "Bot{1,3}"]' in line
    assert "linger_time=30s" in line and "linger_max_bytes=none" in line


def test_startup_line_names_settings_a_server_does_not_apply():
    """waitress has no stop drain and no stop delay: its start-up line must not claim them."""
    line = Settings().describe("waitress", unused=("drain_window", "stop_delay"))
    assert "drain_window=" not in line and "stop_delay=" not in line
    assert line.endswith("(not applied by this server: drain_window, stop_delay)")
    assert "stop_linger=2s" in line
