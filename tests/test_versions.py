"""Issue 17 item 2: the start-up self-checks judge a server's internals, never its version
number. A release we have not seen, whose internals still route closes to us, starts and
serves; a changed internal is refused (the refusal tests live beside each adapter's tests:
test_gunicorn_compat, test_gunicorn_asgi_worker, test_gevent, test_uvicorn_compat)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import GUNICORN_WORKERS, ServerProcess
from tests.helpers import SAMPLE_ASGI, SAMPLE_WSGI, exchange_on_one_connection

PACKAGE = Path(__file__).resolve().parent.parent / "graceful_close"
UNSEEN = "99.0.0"

GUNICORN = textwrap.dedent("""
    import sys
    import gunicorn
    gunicorn.__version__ = {version!r}  # a release we have never seen
    sys.argv = ["gunicorn", "-b", "127.0.0.1:0", "-w", "1", "--log-level", "info",
                "-k", {worker!r}, {app!r}]
    from gunicorn.app.wsgiapp import run
    run()
""")
UVICORN = textwrap.dedent("""
    import sys
    import uvicorn
    uvicorn.__version__ = {version!r}
    sys.argv = ["uvicorn", "--host", "127.0.0.1", "--port", "0", "--http", {http!r}, {app!r}]
    uvicorn.main()
""")


def _serves_with_our_cap(server: ServerProcess) -> None:
    """Started, and our class answers: the request cap of 2 ends the connection."""
    with server:
        responses, ending = exchange_on_one_connection(server.port, [{}] * 3)
        assert [r.status for r in responses] == [200, 200], server.log_text()[-2000:]
        assert responses[-1].header("connection") == "close" and ending == "FIN"


@pytest.mark.parametrize("kind", ["gthread", "asgi", "gevent", "uvicorn-worker"])
def test_gunicorn_of_an_unseen_version_with_the_same_internals_serves(kind: str) -> None:
    app = SAMPLE_ASGI if kind in ("asgi", "uvicorn-worker") else SAMPLE_WSGI
    code = GUNICORN.format(version=UNSEEN, worker=GUNICORN_WORKERS[kind][1], app=app)
    _serves_with_our_cap(ServerProcess([sys.executable, "-c", code],
                                       {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "2"}))


@pytest.mark.parametrize("http", ["graceful_close.uvicorn:H11Protocol",
                                  "graceful_close.uvicorn:HttpToolsProtocol"])
def test_uvicorn_of_an_unseen_version_with_the_same_internals_serves(http: str) -> None:
    code = UVICORN.format(version="9.99.0", http=http, app=SAMPLE_ASGI)
    _serves_with_our_cap(ServerProcess([sys.executable, "-c", code],
                                       {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "2"}))


def test_no_adapter_compares_version_numbers() -> None:
    """The version appears in our messages only, never in a comparison."""
    done = subprocess.run(["grep", "-rnE", r"(__version__|VERSION)\s*(<|>|==|!=|\[)|version_info|"
                           r"packaging\.version|parse_version", str(PACKAGE / "gunicorn"),
                           str(PACKAGE / "uvicorn")], capture_output=True, text=True)
    assert done.stdout == "", done.stdout
