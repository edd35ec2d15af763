"""Issue 17 item 6: every entry point logs ONE line at start, in the server's own log, saying
graceful-close runs there with every effective setting (max_lingering, the User-Agent rules
and keepalive_header included). Before, plain `uvicorn --http graceful_close.uvicorn:...` and
the gunicorn hooks logged nothing, and the workers' line left settings out."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import ServerProcess, gunicorn_server, uvicorn_server
from tests.helpers import SAMPLE_ASGI, SAMPLE_WSGI, exchange_on_one_connection

ENV = {"GRACEFUL_CLOSE_KEEPALIVE_HEADER": "true", "GRACEFUL_CLOSE_MAX_LINGERING": "77",
       "GRACEFUL_CLOSE_NOKEEPALIVE_USER_AGENTS": "msie6,Bot/1", "GRACEFUL_CLOSE_LINGER_TIME": "12"}
SHOWN = ("linger_time=12s", "max_lingering=77", "nokeepalive_user_agents=msie6,Bot/1",
         "keepalive_header=true", "keepalive_requests=1000", "abort_on_timeout=")
HOOKS_CONF = textwrap.dedent("""
    from graceful_close.gunicorn_hooks import on_starting, pre_request  # noqa: F401
""")

GUNICORN = {  # entry point: (worker class, app, extra arguments)
    "ThreadWorker": ("graceful_close.gunicorn.ThreadWorker", SAMPLE_WSGI, ["--threads", "2"]),
    "SyncLingerWorker": ("graceful_close.gunicorn.SyncLingerWorker", SAMPLE_WSGI, []),
    "SyncLingerWorker --threads 2": ("graceful_close.gunicorn.SyncLingerWorker", SAMPLE_WSGI,
                                     ["--threads", "2"]),
    "ASGIWorker": ("graceful_close.gunicorn.ASGIWorker", SAMPLE_ASGI, []),
    "GeventWorker": ("graceful_close.gunicorn.GeventWorker", SAMPLE_WSGI, []),
    "UvicornWorker": ("graceful_close.gunicorn.UvicornWorker", SAMPLE_ASGI, []),
    "UvicornH11Worker": ("graceful_close.uvicorn_worker.UvicornH11Worker", SAMPLE_ASGI, []),
    "hooks on stock gthread": ("gthread", SAMPLE_WSGI, ["--threads", "2"]),
}
UVICORN = ["H11Protocol", "HttpToolsProtocol", "AutoHTTPProtocol", "ZttpProtocol", "AutoZttpProtocol"]
# uvicorn.run() given our class itself, imported before the server runs: the line comes with
# the first connection.
PROGRAMMATIC = textwrap.dedent("""
    import uvicorn
    from graceful_close.uvicorn import H11Protocol
    uvicorn.run({app!r}, host="127.0.0.1", port=0, http=H11Protocol)
""")


def _our_start_lines(server: ServerProcess) -> list[str]:
    """One request (first-connection lines show too), then the log's graceful-close lines that
    carry settings."""
    responses, _ = exchange_on_one_connection(server.port, [{}])
    assert responses and responses[0].status == 200, server.log_text()[-2000:]
    return [line for line in server.log_text().splitlines()
            if "graceful-close" in line and "linger_time=" in line]


def _assert_one_line(lines: list[str], where: str) -> None:
    assert len(lines) == 1, lines
    assert where in lines[0], lines[0]
    for shown in SHOWN:
        assert shown in lines[0], (shown, lines[0])


@pytest.mark.parametrize("entry", list(GUNICORN))
def test_every_gunicorn_entry_point_logs_one_line_with_every_setting(start_server, tmp_path: Path,
                                                                     entry: str) -> None:
    worker, app, args = GUNICORN[entry]
    if entry.startswith("hooks"):
        conf = tmp_path / "gunicorn.conf.py"
        conf.write_text(HOOKS_CONF)
        args = [*args, "-c", str(conf)]
    server = start_server(gunicorn_server(app, worker, args=args, env=ENV))
    where = {"hooks on stock gthread": "gunicorn hooks on -k gthread (keep-alive policy only",
             "SyncLingerWorker --threads 2": "served by graceful_close.gunicorn.ThreadWorker"
             }.get(entry, f"gunicorn -k {worker};")
    _assert_one_line(_our_start_lines(server), where)


@pytest.mark.parametrize("protocol", UVICORN)
def test_every_uvicorn_protocol_logs_one_line_with_every_setting(start_server, protocol: str) -> None:
    http = f"graceful_close.uvicorn:{protocol}"
    server = start_server(uvicorn_server(SAMPLE_ASGI, http, env=ENV))
    _assert_one_line(_our_start_lines(server), f"uvicorn --http {http};")
    assert "INFO:" in next(line for line in server.log_text().splitlines()
                           if "linger_time=" in line)  # uvicorn's own log format


def test_uvicorn_run_with_our_class_logs_the_line_at_its_first_connection(start_server) -> None:
    code = PROGRAMMATIC.format(app=SAMPLE_ASGI)
    server = start_server(ServerProcess([sys.executable, "-c", code], dict(ENV)))
    _assert_one_line(_our_start_lines(server), "uvicorn --http graceful_close.uvicorn.protocols:H11Protocol;")
