"""KeepAliveMiddleware: the User-Agent rule for ASGI servers used without our classes.

In-process tests pin down the ASGI messages; real stock uvicorn shows the rule
honoured (Connection: close, then the connection ends) and that the close it
causes is still a plain one (RST under pipelined requests) unless our protocol
classes serve the app. The integrations/ recipes run as shipped.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from graceful_close.core import Counters
from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.scenarios import Target, pipelined, pipelined_after_close
from graceful_close.diagnostics.wire import ResponseReader, request_bytes
from graceful_close.middleware import KeepAliveMiddleware
from graceful_close.settings import SettingsError
from tests.uvicorn_servers import REPO, Fleet

LEGACY_UA = "Mozilla/4.0 (compatible; MSIE 5.5; Windows 98)"
MODERN_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
MSIE6_UA = "Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1)"


# ---- in process ------------------------------------------------------------------------

async def _app(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-length", b"2")]
    if scope.get("path") == "/app-closes":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def _call(middleware: KeepAliveMiddleware, user_agent: str | None, method: str = "GET",
          http_version: str = "1.1", path: str = "/") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    headers = [(b"host", b"x")] + ([(b"user-agent", user_agent.encode())] if user_agent else [])
    scope = {"type": "http", "http_version": http_version, "method": method, "path": path,
             "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return sent


def _connection_headers(sent: list[dict[str, Any]]) -> list[bytes]:
    return [value for name, value in sent[0]["headers"] if name == b"connection"]


def test_matching_user_agent_gets_connection_close_once() -> None:
    counters = Counters()
    middleware = KeepAliveMiddleware(_app, user_agents=("legacy",), counters=counters)
    assert _connection_headers(_call(middleware, LEGACY_UA)) == [b"close"]
    assert _connection_headers(_call(middleware, LEGACY_UA, path="/app-closes")) == [b"close"]
    assert counters.user_agent_disables == 2


@pytest.mark.parametrize("user_agent", [MODERN_UA, None])
def test_other_agents_are_untouched(user_agent) -> None:
    sent = _call(KeepAliveMiddleware(_app, user_agents=("legacy",)), user_agent)
    assert _connection_headers(sent) == []


def test_msie6_preset_closes_on_post_only_like_nginx() -> None:
    middleware = KeepAliveMiddleware(_app, user_agents=("msie6",))
    assert _connection_headers(_call(middleware, MSIE6_UA, method="GET")) == []
    assert _connection_headers(_call(middleware, MSIE6_UA, method="POST")) == [b"close"]


def test_http2_responses_never_get_the_header() -> None:
    """HTTP/2 and HTTP/3 forbid connection-specific headers."""
    sent = _call(KeepAliveMiddleware(_app, user_agents=("legacy",)), LEGACY_UA, http_version="2")
    assert _connection_headers(sent) == []


def _lifespan_startup(middleware: KeepAliveMiddleware) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    return sent


@pytest.mark.parametrize("rules", [("MSIE [",), ("legacyy",)])
def test_bad_rule_fails_the_lifespan_startup_in_one_line(rules) -> None:
    """Not an exception from the constructor: uvicorn would print it as a traceback, and
    Starlette (which builds its middleware inside the lifespan call) would lose it."""
    sent = _lifespan_startup(KeepAliveMiddleware(_app, user_agents=rules))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "nokeepalive_user_agents" in sent[0]["message"] and "\n" not in sent[0]["message"]
    with pytest.raises(SettingsError):  # a server without lifespan serves nothing
        _call(KeepAliveMiddleware(_app, user_agents=rules), MODERN_UA)


WRAPPED_AT_IMPORT = """
from graceful_close.diagnostics.sample_apps import asgi_app
from graceful_close.middleware import KeepAliveMiddleware

app = KeepAliveMiddleware(asgi_app)
"""


@pytest.mark.parametrize("recipe", ["starlette", "wrapped"])
def test_bad_setting_under_uvicorn_is_one_line_and_a_failed_exit(recipe, tmp_path) -> None:
    """uvicorn with the Starlette recipe (the middleware is built lazily, inside the
    lifespan call) and with an app wrapped at import: one stderr line names the setting,
    no traceback, non-zero exit. (On the old main: a traceback per request, exit 0.)"""
    (tmp_path / "wrapped.py").write_text(WRAPPED_AT_IMPORT)
    app_dir, app = ((REPO, "integrations.starlette_app:app") if recipe == "starlette"
                    else (tmp_path, "wrapped:app"))
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--host", "127.0.0.1",
         "--port", "0", app],
        env={**os.environ, "GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS": "MSIE ["},
        capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stderr
    about = [line for line in done.stderr.splitlines() if "NOKEEPALIVE_USER_AGENTS" in line]
    assert len(about) == 1 and "expected a valid regex" in about[0], done.stderr
    assert "GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS='MSIE ['" in about[0]  # as the user wrote it
    assert "Traceback" not in done.stderr and "Uvicorn running" not in done.stderr, done.stderr


# ---- real uvicorn ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    yield fleet
    fleet.stop()


def _get(t: Target, user_agent: str) -> tuple[dict[str, str], str]:
    """One request; (response headers, how the connection ends right after)."""
    with t.connect(5) as sock:
        sock.sendall(request_bytes("GET", "/", t.authority, {"User-Agent": user_agent}))
        reader = ResponseReader(sock, time.monotonic() + 5)
        response = reader.read_response()
        assert response.status == 200 and response.complete
        reader.deadline = time.monotonic() + 0.5
        return response.headers, reader.read_end()


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_starlette_recipe_on_stock_uvicorn_applies_the_user_agent_rule(fleet, http) -> None:
    t = fleet.target("stock", http, app="integrations.starlette_app:app")
    headers, ending = _get(t, LEGACY_UA)
    assert headers.get("connection") == "close" and ending == "FIN"
    headers, ending = _get(t, MODERN_UA)
    assert "connection" not in headers and ending == "TIMEOUT"  # kept alive


@pytest.mark.parametrize("kind", [
    pytest.param("stock", marks=pytest.mark.xfail(
        strict=False, raises=AssertionError,
        reason="stock uvicorn closes with a plain close: RST cuts the response (XPASS: fixed upstream)")),
    "ours",
])
def test_the_close_the_middleware_causes_lingers_only_with_our_protocols(fleet, kind) -> None:
    """A legacy agent pipelining behind a 2 MB response: stock uvicorn honours the
    Connection: close with a plain close and cuts the response; ours keeps it whole."""
    t = fleet.target(kind, "httptools", app="tests.uvicorn_apps:legacy_closing_app")
    first = request_bytes("GET", "/big?size=2000000", t.authority, {"User-Agent": LEGACY_UA})
    follow = request_bytes("GET", "/", t.authority, {"User-Agent": LEGACY_UA}) * 5
    result = pipelined(t, [first, follow], expected=1)
    assert result.responses and result.responses[0].header("connection") == "close"
    assert result.intact and result.ending == "FIN", result.as_dict()


def test_uvicorn_launch_recipe_serves_with_the_lingering_close(start_server) -> None:
    server = start_server(ServerProcess(
        [sys.executable, str(REPO / "integrations" / "uvicorn_launch.py"), "--port", "0",
         "--timeout-keep-alive", "1"],
        {"GRACEFUL_CLOSE_LINGER_TIMEOUT": "1", "GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "3"}))
    t = Target("127.0.0.1", server.port)
    result = pipelined_after_close(t, "/big?close=1&size=2000000")
    assert result.intact and result.ending == "FIN", result.as_dict()
    request = request_bytes("GET", "/", t.authority)
    result = pipelined(t, [request] * 10, expected=3)  # the cap from the environment
    assert result.complete_responses == 3 and result.ending == "FIN", result.as_dict()


MYAPP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"6")]})
    await send({"type": "http.response.body", "body": b"myapp\\n"})
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_uvicorn_launch_recipe_imports_the_app_from_the_current_directory(start_server, tmp_path,
                                                                          workers) -> None:
    """`python integrations/uvicorn_launch.py myapp:app` run where myapp.py is, as with
    uvicorn's own command; with --workers 2 the spawned workers find it too.
    (On the old main: ModuleNotFoundError: No module named 'myapp'.)"""
    (tmp_path / "myapp.py").write_text(MYAPP)
    server = start_server(ServerProcess(
        [sys.executable, str(REPO / "integrations" / "uvicorn_launch.py"), "myapp:app",
         "--port", "0", "--workers", workers], cwd=str(tmp_path)))
    with Target("127.0.0.1", server.port).connect(5) as sock:
        sock.sendall(request_bytes("GET", "/", "x", {"Connection": "close"}))
        response = ResponseReader(sock, time.monotonic() + 5).read_response()
    assert response.status == 200 and response.body_prefix == b"myapp\n", server.log_text()
