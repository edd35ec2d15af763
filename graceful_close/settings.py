"""One frozen settings object, built from keyword arguments and GRACEFUL_CLOSE_* variables.

Keyword arguments win over the environment; the environment wins over defaults.
Every bad value raises SettingsError whose message is one line naming the
setting, the value and the accepted range.

One path for every server: configure(**kwargs) validates, keeps the result for this
process and writes it back to os.environ as GRACEFUL_CLOSE_* variables. Forked
workers inherit the module state, and workers a server *spawns* (uvicorn --workers,
multiprocessing's spawn) inherit the environment, so both see the same settings.
current_settings() is what every adapter reads; startup_settings() is the same
for a server's start-up, where a bad value must end the process with one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

ENV_PREFIX = "GRACEFUL_CLOSE_"
MAX_SECONDS = 86400.0
UA_PRESETS = ("legacy", "msie6", "safari", "none")
# GRACEFUL_CLOSE_* variables that are not settings (read by graceful_close.metrics).
OTHER_ENV = frozenset({"METRICS_DIR", "METRICS_PORT", "METRICS_ADDR"})
_INT_FIELDS = frozenset({"linger_max_bytes", "max_lingering", "keepalive_requests"})

log = logging.getLogger("graceful_close")


class SettingsError(ValueError):
    """A setting has a value outside its accepted range (message is one line).

    `setting` is the Settings field the value was for and `accepted` what it accepts, so
    that from_env() can name the variable the user set instead (issue 17 item 8)."""

    setting: str | None = None
    accepted: str = ""


def _fail(name: str, value: Any, accepted: str) -> SettingsError:
    error = SettingsError(f"graceful-close: invalid {name}={value!r}: expected {accepted}")
    error.setting, error.accepted = name, accepted
    return error


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Limits of the lingering close and of keep-alive.

    Defaults follow nginx: lingering_time 30 s, lingering_timeout 5 s,
    keepalive_requests 1000, keepalive_time 1 h.
    """

    linger_time: float = 30.0
    linger_timeout: float = 5.0
    linger_max_bytes: int | None = None
    max_lingering: int = 10000
    # ---- issue 20: a deadline ends with FIN ----
    # false (nginx's reset_timedout_connection off, Apache): a deadline closes plainly; the
    # client had our FIN since the half-close, and the socket waits for the client's FIN in
    # FIN_WAIT_2, held by the kernel (net.ipv4.tcp_fin_timeout), not by us. true: RST once
    # the client acknowledged everything (SIOCOUTQ), which frees the socket at once; but
    # acknowledged is not read, and a client stack may drop unread bytes on RST.
    abort_on_timeout: bool = False
    keepalive_requests: int = 1000
    keepalive_time: float = 3600.0
    nokeepalive_user_agents: tuple[str, ...] = ("legacy",)
    # Send "Keep-Alive: timeout=..., max=..." on responses that keep the connection.
    # Off by default, like nginx: clients do not need it, and it costs per response.
    keepalive_header: bool = False
    # ---- issue 20: the stop rule (core.linger.stop_deadline) ----
    # When the server stops gracefully, a lingering connection with bytes at stake ends
    # this long after its half-close (Apache's short linger of a dying process, 2 s), and
    # never after the server's own graceful timeout. 0: every one ends at the stop.
    stop_linger: float = 2.0
    # ---- issue 18: which closes linger (core.closing) ----
    # auto: not the ones a client ended itself with an explicit Connection: close, its
    # request whole and nothing unread (no byte can meet an RST there: closed at once, as
    # stock does); always: every close lingers. The names of nginx's lingering_close.
    lingering_close: str = "auto"
    # ---- issue 16: a stop that drains by answering (core.stopping) ----
    # At a graceful stop an idle keep-alive connection the client used within drain_window
    # stays open until the window ends, and its next request is answered with
    # Connection: close; one idle longer closes at once. Bounded by the server's own
    # graceful timeout. 0: every idle connection closes at the stop, as stock uvicorn does.
    drain_window: float = 1.0
    # Keep serving normally this long after SIGTERM before the stop (and the drain) begins,
    # like Caddy's shutdown_delay: for orchestrators that take a pod out of the load balancer
    # only after signalling it. 0 (off) by default.
    stop_delay: float = 0.0

    def __post_init__(self) -> None:
        _check_seconds("linger_time", self.linger_time, allow_zero=False)
        _check_seconds("linger_timeout", self.linger_timeout, allow_zero=False)
        _check_seconds("keepalive_time", self.keepalive_time, allow_zero=True)
        _check_seconds("stop_linger", self.stop_linger, allow_zero=True)  # issue 20
        _check_seconds("drain_window", self.drain_window, allow_zero=True)  # issue 16
        _check_seconds("stop_delay", self.stop_delay, allow_zero=True)  # issue 16
        if self.linger_max_bytes is not None:
            _check_int("linger_max_bytes", self.linger_max_bytes, 1, 2**62, "None or an integer >= 1")
        _check_int("max_lingering", self.max_lingering, 1, 10_000_000, "an integer from 1 to 10000000")
        _check_int("keepalive_requests", self.keepalive_requests, 0, 2**62,
                   "an integer >= 0 (0 = no cap)")
        if self.lingering_close not in ("auto", "always"):
            raise _fail("lingering_close", self.lingering_close, "auto or always")
        for flag in ("abort_on_timeout", "keepalive_header"):
            if not isinstance(getattr(self, flag), bool):
                raise _fail(flag, getattr(self, flag), "true or false")
        rules = self.nokeepalive_user_agents
        if isinstance(rules, str) or not all(isinstance(r, str) for r in rules):
            raise _fail("nokeepalive_user_agents", rules,
                        f"a list of regexes and/or presets {', '.join(UA_PRESETS)}")
        object.__setattr__(self, "nokeepalive_user_agents", tuple(rules))
        for rule in self.nokeepalive_user_agents:
            _check_ua_rule(rule)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then GRACEFUL_CLOSE_<NAME> variables, then keyword arguments."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        raw_values: dict[str, str] = {}  # what the environment said, for the error messages
        for field in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _parse_env(field.name, raw)
                raw_values[field.name] = raw
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            names = ", ".join(name + _did_you_mean(name, known) for name in unknown)
            raise SettingsError(f"graceful-close: unknown setting(s) {names}; known: {', '.join(known)}")
        values.update(overrides)
        try:
            settings = cls(**values)
        except SettingsError as exc:
            # A value out of range from the environment: name the variable and the text the
            # user wrote there, not the field and the parsed value.
            if exc.setting in raw_values and exc.setting not in overrides:
                raise _fail(ENV_PREFIX + exc.setting.upper(), raw_values[exc.setting],
                            exc.accepted) from None
            raise
        _warn_once(environ, settings)
        return settings

    def to_env(self) -> dict[str, str]:
        """These settings as GRACEFUL_CLOSE_* variables; from_env() of them gives them back."""
        env = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                text = "none"
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = json.dumps(list(value))
            elif isinstance(value, str):
                text = value
            else:
                text = repr(value)
            env[ENV_PREFIX + field.name.upper()] = text
        return env

    def describe(self, where: str = "", unused: tuple[str, ...] = ()) -> str:
        """The one start-up log line of a server using these settings: every setting by name
        (every field, so a new setting shows without a change here), after `where`, what
        runs them (e.g. "gunicorn -k graceful_close.gunicorn.ThreadWorker"). `unused`: settings
        this server does not apply, named as such so the line never claims them."""
        values = " ".join(f"{field.name}={_describe(getattr(self, field.name))}"
                          for field in dataclasses.fields(self) if field.name not in unused)
        if unused:
            values += f" (not applied by this server: {', '.join(unused)})"
        return f"graceful-close: {where}; {values}" if where else f"graceful-close: {values}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _describe(value: Any) -> str:
    """A setting's value as the start-up line shows it (every float setting is in seconds)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}s"
    if isinstance(value, tuple):
        if any("," in item for item in value):
            return json.dumps(list(value))
        return ",".join(value) or "[]"
    return str(value)


def _check_seconds(name: str, value: Any, *, allow_zero: bool) -> None:
    low = ">= 0" if allow_zero else "> 0"
    accepted = f"a number of seconds {low} and <= {MAX_SECONDS:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, value, accepted)
    if math.isnan(value) or value > MAX_SECONDS or value < 0 or (value == 0 and not allow_zero):
        raise _fail(name, value, accepted)


def _check_int(name: str, value: Any, low: int, high: int, accepted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(name, value, accepted)


def _check_ua_rule(rule: str) -> None:
    if rule in UA_PRESETS:
        return
    if re.fullmatch(r"[a-z0-9_]+", rule):
        # Looks like a preset name, not a pattern: a typo should not silently match nothing.
        raise _fail("nokeepalive_user_agents", rule,
                    f"a preset ({', '.join(UA_PRESETS)}) or a regex; unknown preset"
                    + _did_you_mean(rule, list(UA_PRESETS)))
    try:
        re.compile(rule)
    except re.error as exc:
        raise _fail("nokeepalive_user_agents", rule, f"a valid regex ({exc})") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_env(name: str, raw: str) -> Any:
    """Turn one environment string into the field's type; errors name the variable."""
    text = raw.strip()
    env_name = ENV_PREFIX + name.upper()
    if name in ("abort_on_timeout", "keepalive_header"):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise _fail(env_name, raw, "one of 1/0, true/false, yes/no, on/off")
    if name == "nokeepalive_user_agents":
        if text[:1] in ('[', '{', '"'):
            # Looks like JSON: it must be a JSON list of strings, never a literal regex
            # (issue 17 item 7: '{"a": 1}' was taken as the regex {"a": 1}).
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
                raise _fail(env_name, raw, 'a JSON list of strings such as ["legacy", "Bot{1,3}"] '
                            "(a value starting with [, { or \" is read as JSON), or "
                            "comma-separated presets and regexes")
            return tuple(parsed)
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if name == "lingering_close":
        return text.lower()
    if name == "linger_max_bytes" and text.lower() in {"", "none"}:
        return None
    # Text that is not a number stays text: the field's own check then rejects it with the
    # accepted range ("a number of seconds > 0 and <= 86400"), not a bare "a number".
    if name in _INT_FIELDS:
        try:
            return int(text)
        except ValueError:
            return raw
    try:
        return float(text)
    except ValueError:
        return raw


_warned: set[str] = set()


def _warn_once(environ: Mapping[str, str], settings: Settings) -> None:
    """Settings that are valid but probably not what was meant: one warning each per process."""
    known = {f.name.upper() for f in dataclasses.fields(Settings)} | OTHER_ENV
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):] not in known)
    if unknown and "unknown" not in _warned:
        _warned.add("unknown")
        names = sorted(ENV_PREFIX + n for n in known)
        log.warning("graceful-close: ignoring unknown variable(s) %s; known: %s",
                    ", ".join(name + _did_you_mean(name, names) for name in unknown), ", ".join(names))
    if settings.linger_timeout > settings.linger_time and "timeouts" not in _warned:
        _warned.add("timeouts")
        log.warning("graceful-close: linger_timeout=%g is longer than linger_time=%g; "
                    "linger_time bounds every lingering close", settings.linger_timeout,
                    settings.linger_time)


_current: Settings | None = None


def configure(**kwargs: Any) -> Settings:
    """Set this process's settings (keyword arguments win over GRACEFUL_CLOSE_* variables)
    and export them to os.environ, so that forked and spawned workers get the same.

    For gunicorn.conf.py and `if __name__ == "__main__":` blocks: a bad value ends the
    process with its one-line message instead of a traceback.
    """
    global _current
    try:
        settings = Settings.from_env(**kwargs)
    except SettingsError as exc:
        raise SystemExit(str(exc)) from None
    os.environ.update(settings.to_env())
    _current = settings
    if "gunicorn.config" in sys.modules:
        # A gunicorn.conf.py in gunicorn's master: serve `-k graceful_close.gunicorn.SyncWorker
        # --threads N` (the sync worker's old name) with our ThreadWorker instead of letting
        # gunicorn swap it for stock gthread (graceful_close.gunicorn._compat, reach 8).
        from .gunicorn import _compat

        _compat.install_sync_worker_guard()
    return settings


def current_settings() -> Settings:
    """The configured settings, else those of the environment (raises SettingsError)."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def startup_settings() -> Settings:
    """current_settings() for a server's start-up: a bad value exits with one line."""
    try:
        return current_settings()
    except SettingsError as exc:
        raise SystemExit(str(exc)) from None


# ---- issue 17 item 6: one start-up line per server ---------------------------------------

# Whether announce() has logged in this process. A worker that gunicorn forks inherits its
# master's answer, so the master's line is not repeated by each worker (UvicornWorker).
_announced = False


def announce(where: str, emit: Callable[[str], None], unused: tuple[str, ...] = ()) -> Settings:
    """At a server's start: validate the settings (a bad value exits with one line) and log the
    one line saying graceful-close runs there, with every effective setting, through `emit`
    (the server's own log), once per process; `unused` as in Settings.describe."""
    global _announced
    settings = startup_settings()
    if not _announced:
        _announced = True
        emit(settings.describe(where, unused))
    return settings


def announced() -> bool:
    return _announced


def reset_for_tests() -> None:
    """Forget configured settings and the warnings given (tests that configure more than
    once in one process)."""
    global _current, _announced
    _current = None
    _announced = False
    _warned.clear()
