"""Issue 17 item 5: every class with a keep-alive policy honours every policy setting against a
real server: keepalive_requests, keepalive_time, nokeepalive_user_agents and keepalive_header
(which ASGIWorker and GeventWorker used to ignore, although the README listed them).

One server per class, started with all four settings; each test exercises one on a
connection of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import ServerProcess, gunicorn_server, uvicorn_server
from graceful_close.diagnostics.wire import Response
from tests.helpers import SAMPLE_ASGI, SAMPLE_WSGI, exchange_on_one_connection

CAP = 3
AGE = 2.0
IDLE = 5  # the server's keep-alive idle timeout, seconds
BAD_AGENT = "BadBot/1.0"
ENV = {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": str(CAP), "GRACEFUL_CLOSE_KEEPALIVE_TIME": str(AGE),
       "GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS": "BadBot/", "GRACEFUL_CLOSE_KEEPALIVE_HEADER": "true",
       "GRACEFUL_CLOSE_LINGER_TIMEOUT": "1", "GRACEFUL_CLOSE_LINGER_TIME": "2"}

CLASSES = {  # every class of ours that has a keep-alive policy
    "gunicorn ThreadWorker": ("graceful_close.gunicorn.ThreadWorker", SAMPLE_WSGI, ["--threads", "2"]),
    "gunicorn ASGIWorker": ("graceful_close.gunicorn.ASGIWorker", SAMPLE_ASGI, []),
    "gunicorn GeventWorker": ("graceful_close.gunicorn.GeventWorker", SAMPLE_WSGI, []),
    "gunicorn UvicornWorker": ("graceful_close.gunicorn.UvicornWorker", SAMPLE_ASGI, []),
    "uvicorn H11Protocol": ("graceful_close.uvicorn:H11Protocol", SAMPLE_ASGI, []),
    "uvicorn HttpToolsProtocol": ("graceful_close.uvicorn:HttpToolsProtocol", SAMPLE_ASGI, []),
    "uvicorn ZttpProtocol": ("graceful_close.uvicorn:ZttpProtocol", SAMPLE_ASGI, []),
    # The hooks on stock gthread: the policy without the lingering close; they cannot add a
    # Keep-Alive header (a hook never sees the response), as the README and their start-up
    # line say.
    "gunicorn hooks": ("gthread", SAMPLE_WSGI, ["--threads", "2"]),
}
HOOKS_CONF = "from graceful_close.gunicorn_hooks import on_starting, pre_request  # noqa: F401\n"


def _server(name: str, conf_dir: Path) -> ServerProcess:
    spec, app, args = CLASSES[name]
    if name == "gunicorn hooks":
        (conf_dir / "hooks.conf.py").write_text(HOOKS_CONF)
        args = [*args, "-c", str(conf_dir / "hooks.conf.py")]
    if name.startswith("gunicorn"):
        return gunicorn_server(app, spec, args=["--keep-alive", str(IDLE), *args], env=ENV)
    return uvicorn_server(app, spec, args=["--timeout-keep-alive", str(IDLE)], env=ENV)


@pytest.fixture(scope="module", params=list(CLASSES))
def server(request, tmp_path_factory):
    with _server(request.param, tmp_path_factory.mktemp("conf")) as started:
        started.name = request.param  # which class, for the one setting the hooks cannot do
        yield started


def _kept(response: Response) -> bool:
    return response.header("connection") != "close"


def test_keepalive_requests(server) -> None:
    responses, ending = exchange_on_one_connection(server.port, [{}] * (CAP + 2))
    assert len(responses) == CAP and ending == "FIN", (len(responses), ending)
    assert [_kept(r) for r in responses] == [True] * (CAP - 1) + [False]


def test_keepalive_time(server) -> None:
    """Two requests on one connection, AGE + 1.5 s apart (under the idle timeout and the request
    cap): the second response ends the connection. (ASGIWorker and GeventWorker check the age
    against a clock their heartbeat refreshes once a second, hence the margin.)"""
    responses, ending = exchange_on_one_connection(server.port, [{}] * 2, pause=AGE + 1.5)
    assert [_kept(r) for r in responses] == [True, False] and ending == "FIN", \
        ([r.header("connection") for r in responses], ending)


def test_nokeepalive_user_agents(server) -> None:
    responses, ending = exchange_on_one_connection(server.port, [{"User-Agent": BAD_AGENT}] * 2)
    assert len(responses) == 1 and not _kept(responses[0]) and ending == "FIN"
    assert responses[0].header("keep-alive") is None
    normal, _ = exchange_on_one_connection(server.port, [{"User-Agent": "curl/8.5"}] * 2)
    assert [_kept(r) for r in normal] == [True, True]


def test_keepalive_header(server) -> None:
    if server.name == "gunicorn hooks":
        pytest.skip("the hooks cannot add a Keep-Alive header (documented; their start-up line says so)")
    responses, _ = exchange_on_one_connection(server.port, [{}] * CAP)
    assert [r.header("keep-alive") for r in responses] == [
        f"timeout={IDLE}, max={CAP - n}" for n in range(1, CAP)] + [None]
